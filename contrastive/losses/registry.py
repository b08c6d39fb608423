"""Losses selectable by name from a config: `config.loss = {'name': ..., **kwargs}`.

Every entry of PAIR_LOSSES is a two-view loss for the SimCLR recipe,
fn(z1 [B, D], z2 [B, D], **kwargs) -> (loss, metrics), whose keyword-only arguments are the
config's other fields (checked against the signature before anything is compiled):

  nt_xent                 temperature                 the 2B views, 2B - 2 negatives each
  info_nce                temperature                 1/2 (info_nce(z1, z2) + info_nce(z2, z1))
  clip_loss               temperature                 symmetric already; equals info_nce here
  sigmoid_loss            temperature, bias           SigLIP with a fixed tau and b
  dcl                     temperature                 DCL eq. 6: the 2B views, 2B - 2 negatives each
  dclw                    temperature, sigma          dcl with DCLW's weights on the positives
  debiased_info_nce       temperature, tau_plus       both directions, averaged
  hard_negative_info_nce  temperature, beta, tau_plus both directions, averaged
  supcon                  temperature                 on [z1; z2] with labels = pair ids (= nt_xent)
  amcl                    beta, kappa                 H heads (model.head_count), learned temperatures
  pamc_info_nce           temperature, num_clusters   info_nce with PamC's K meta-node negatives
                          (iterations, assignment_temperature optional), both directions, averaged

Every loss but nt_xent, dcl, dclw and supcon also takes `block_size` (None: dense; an int: the
blockwise path of `blockwise.py`, O(B D) memory), e.g. `--config.loss.block_size=1024`, and
with it `collective` ('ring' by default, or 'all_gather'), as `--config.loss.collective=...`.

Mixed precision: every loss here takes bfloat16 embeddings on every path (dense, blockwise,
fused, ring); `check_compute_dtype` refuses what is not a float dtype before compiling.

Asymmetric query/key losses are used in both directions and their metrics averaged. A learned
temperature or SigLIP bias is a model parameter, not a config value: call the loss functions
directly with traced scalars for that.
"""

import functools
import inspect

import jax
import jax.numpy as jnp

from contrastive.losses import blockwise
from contrastive.losses import common
from contrastive.losses import pamc
from contrastive.losses.amcl import amcl
from contrastive.losses.dcl import dcl
from contrastive.losses.dcl import dclw
from contrastive.losses.debiased import debiased_info_nce
from contrastive.losses.debiased import hard_negative_info_nce
from contrastive.losses.info_nce import clip_loss
from contrastive.losses.info_nce import info_nce
from contrastive.losses.nt_xent import nt_xent
from contrastive.losses.sigmoid import sigmoid_loss
from contrastive.losses.supcon import supcon


def _both_directions(loss_fn, z1, z2, **kwargs):
  """1/2 (f(z1, z2) + f(z2, z1)) with the metrics averaged the same way."""
  loss_12, metrics_12 = loss_fn(z1, z2, **kwargs)
  loss_21, metrics_21 = loss_fn(z2, z1, **kwargs)
  metrics = jax.tree.map(lambda a, b: 0.5 * (a + b), metrics_12, metrics_21)
  return 0.5 * (loss_12 + loss_21), metrics


RING = blockwise.DEFAULT_COLLECTIVE


def _info_nce_pair(z1, z2, *, temperature, block_size=None, mesh=None, collective=RING):
  return _both_directions(info_nce, z1, z2, temperature=temperature, block_size=block_size,
                          mesh=mesh, collective=collective)


def _debiased_pair(z1, z2, *, temperature, tau_plus, block_size=None, mesh=None,
                   collective=RING):
  return _both_directions(debiased_info_nce, z1, z2, temperature=temperature, tau_plus=tau_plus,
                          block_size=block_size, mesh=mesh, collective=collective)


def _hard_negative_pair(z1, z2, *, temperature, beta, tau_plus, block_size=None, mesh=None,
                        collective=RING):
  return _both_directions(hard_negative_info_nce, z1, z2, temperature=temperature, beta=beta,
                          tau_plus=tau_plus, block_size=block_size, mesh=mesh,
                          collective=collective)


def _clip_pair(z1, z2, *, temperature, block_size=None, mesh=None, collective=RING):
  return clip_loss(z1, z2, temperature=temperature, block_size=block_size, mesh=mesh,
                   collective=collective)


def _sigmoid_pair(z1, z2, *, temperature, bias, block_size=None, mesh=None, collective=RING):
  return sigmoid_loss(z1, z2, temperature=temperature, bias=bias, block_size=block_size,
                      mesh=mesh, collective=collective)


def _pamc_pair(z1, z2, *, temperature, num_clusters, iterations=pamc.DEFAULT_ITERATIONS,
               assignment_temperature=pamc.DEFAULT_ASSIGNMENT_TEMPERATURE, mesh=None):
  return _both_directions(pamc.pamc_info_nce, z1, z2, temperature=temperature,
                          num_clusters=num_clusters, iterations=iterations,
                          assignment_temperature=assignment_temperature, mesh=mesh)


def _supcon_pair(z1, z2, *, temperature):
  common.check_pair(z1, z2, 'z1', 'z2')
  pair_ids = jnp.tile(jnp.arange(z1.shape[0]), 2)  # view i and view B + i are one sample
  return supcon(jnp.concatenate([z1, z2]), pair_ids, temperature=temperature)


# Two-view losses for the SimCLR recipe: fn(z1 [B, D], z2 [B, D], **kwargs) -> (loss, metrics).
PAIR_LOSSES = {
    'nt_xent': nt_xent,
    'info_nce': _info_nce_pair,
    'clip_loss': _clip_pair,
    'sigmoid_loss': _sigmoid_pair,
    'dcl': dcl,  # symmetric in (z1, z2) already
    'dclw': dclw,
    'debiased_info_nce': _debiased_pair,
    'hard_negative_info_nce': _hard_negative_pair,
    'supcon': _supcon_pair,
    'amcl': amcl,  # the model's H heads ([B, H D]) and their learned temperatures
    'pamc_info_nce': _pamc_pair,  # O(B K D): takes the trainer's mesh on its only path
}
MESH_LOSSES = ('pamc_info_nce',)  # bound to the trainer's mesh without block_size
# Arguments the trainer binds (mesh), the model gives (AMCL's learned temperatures) or the
# two-tower objective passes (amcl's duplicate masks), not config fields.
BOUND_ARGUMENTS = ('mesh', 'temperatures', 'negative_mask', 'mask_ids')


def loss_arguments(name):
  """{argument: required} for the config arguments of PAIR_LOSSES[name]: its keyword-only
  arguments but BOUND_ARGUMENTS."""
  params = inspect.signature(PAIR_LOSSES[name]).parameters.values()
  return {p.name: p.default is p.empty for p in params
          if p.kind == p.KEYWORD_ONLY and p.name not in BOUND_ARGUMENTS}


def check_loss_config(cfg):
  """Raises ValueError for an unknown loss, unknown or missing arguments, or bad values.

  Args:
    cfg: the config's `loss` field (a ConfigDict or dict): `name` plus the loss's arguments.
  """
  name = cfg.get('name')
  if name not in PAIR_LOSSES:
    raise ValueError(f'config.loss.name={name!r} is unknown; choose one of {sorted(PAIR_LOSSES)}.')
  arguments = loss_arguments(name)
  given = [k for k in cfg.keys() if k != 'name']
  for field in given:
    if field not in arguments:
      raise ValueError(f'config.loss.{field} is not an argument of the {name!r} loss; it takes '
                       f'{sorted(arguments)}.')
  for field, required in arguments.items():
    if required and field not in given:
      raise ValueError(f'config.loss.{field} is missing: the {name!r} loss needs '
                       f'{sorted(arguments)}.')
  temperature = cfg.get('temperature')
  if temperature is not None and not temperature > 0:
    raise ValueError(f'config.loss.temperature={temperature} must be > 0 (e.g. 0.1-0.5).')
  collective = cfg.get('collective')
  if collective is not None and collective not in blockwise.COLLECTIVES:
    raise ValueError(f'config.loss.collective={collective!r} must be one of '
                     f'{blockwise.COLLECTIVES}.')
  if collective is not None and cfg.get('block_size') is None:
    raise ValueError('config.loss.collective only acts on the blockwise path: set '
                     'config.loss.block_size as well.')
  sigma = cfg.get('sigma')
  if sigma is not None and not sigma > 0:
    raise ValueError(f'config.loss.sigma={sigma} must be > 0 (0.5 in the DCL paper).')
  if name == 'amcl' and not (cfg.get('beta', 0.1) >= 0 and cfg.get('kappa', 0.5) > 0):
    raise ValueError(f'config.loss: amcl needs beta >= 0 and kappa > 0; got beta='
                     f'{cfg.get("beta")}, kappa={cfg.get("kappa")}.')
  for field, least in (('num_clusters', 1), ('iterations', 0)):
    value = cfg.get(field)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or
                              value < least):
      raise ValueError(f'config.loss.{field}={value!r} must be an int >= {least}.')
  tau_plus = cfg.get('tau_plus')
  if tau_plus is not None and not 0 <= tau_plus < 1:
    raise ValueError(f'config.loss.tau_plus={tau_plus} must be in [0, 1) (e.g. 0.1 for 10 '
                     'balanced classes).')


# Embedding dtypes the losses take: bfloat16 multiplied as it is (float32 accumulation, loss,
# metrics and statistics in float32, gradients in bfloat16); float16 computed in float32
# (bfloat16's exponent range, not float16's, is what the gradients 1/(B tau) need); float32 and
# float64 in themselves.
COMPUTE_DTYPES = ('bfloat16', 'float16', 'float32', 'float64')


def check_compute_dtype(loss_name, dtype, *, block_size=None):
  """Raises ValueError unless PAIR_LOSSES[loss_name] takes [B, D] embeddings of `dtype`.

  Every pair loss takes bfloat16 on every path: dense (nt_xent, info_nce, clip_loss,
  sigmoid_loss, dcl, dclw, debiased_info_nce, hard_negative_info_nce, supcon) and, for the
  losses with `block_size`, blockwise, fused and over a mesh (ring or all_gather). The
  similarity matmuls then run in bfloat16 with float32 accumulation (L2 normalisation in
  float32, rounded back to bfloat16); log-sum-exps, running statistics, the loss and metrics
  are float32; gradients come back in bfloat16. float16 inputs are computed in float32; float32
  and float64 as before. Anything else (integers, float8, an unknown name) is refused.

  Args:
    loss_name: a key of PAIR_LOSSES.
    dtype: anything `jnp.dtype` reads ('bfloat16', jnp.bfloat16, ...): the towers' output dtype.
    block_size: the loss's block_size (None: dense); refused for a loss without a blockwise path.
  """
  if loss_name not in PAIR_LOSSES:
    raise ValueError(f'loss {loss_name!r} is unknown; choose one of {sorted(PAIR_LOSSES)}.')
  if block_size is not None and 'block_size' not in loss_arguments(loss_name):
    raise ValueError(f'The {loss_name!r} loss has no blockwise path (block_size={block_size}); '
                     'use block_size=None, or info_nce / clip_loss / sigmoid_loss with it.')
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = repr(dtype)
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'The {loss_name!r} loss cannot take {name} embeddings; use one of '
                     f'{COMPUTE_DTYPES} (bfloat16 for mixed precision).')


def pair_loss_from_config(cfg, mesh=None):
  """fn(z1, z2) -> (loss, metrics) with the config's keyword arguments bound.

  With `block_size` set (the blockwise path), `mesh` (the trainer's) runs the loss per device
  under shard_map: each device keeps its rows and the key blocks travel around the ring
  (`collective`: 'ring', the default, or 'all_gather': faster for InfoNCE, whose gradient is
  then computed in the forward sweep, for B x D more memory per device).
  """
  check_loss_config(cfg)
  optional = {k for k, required in loss_arguments(cfg.get('name')).items() if not required}
  kwargs = {k: v for k, v in cfg.items()  # an unset optional one takes the loss's default
            if k != 'name' and not (k in optional and v is None)}
  if kwargs.get('block_size') is not None or cfg.get('name') in MESH_LOSSES:
    kwargs['mesh'] = mesh
  return functools.partial(PAIR_LOSSES[cfg.get('name')], **kwargs)
