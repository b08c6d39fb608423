"""AMCL: several projection heads, each scored with its own learned temperature, and a
regulariser that keeps the temperatures from degenerate values.

Wang, Koniusz, Gedeon and Zheng 2024, "Adaptive Multi-head Contrastive Learning", ECCV
(arXiv 2310.05615). The encoder's features h go through H projection heads g_1 ... g_H
(`models.heads.MultiHead`), each giving its own embedding z^h and its own similarities
s^h_ij = cos(z^h_i, z^h_j). The loss is a maximum-likelihood objective over the heads' posteriors
of the positive: head h's posterior that key j is the positive of query i is

  p_h(j | i) = exp(s^h_ij / tau_h) / sum_k exp(s^h_ik / tau_h),

and the temperature tau_h of each head is learned with it. On its own that likelihood has a
degenerate maximum (tau_h -> 0 once every positive ranks first: the loss tends to 0 while the
embeddings stop learning), so each temperature pays

  R(tau) = kappa log tau + 1 / tau,

the negative log-normaliser of a Gaussian observation model whose variance is tau (its log tau
term grows with tau, its 1 / tau term stops tau -> 0; R alone is smallest at tau = 1 / kappa).
The objective, averaged over the heads (the paper sums them; the mean keeps the learning rate
of a one-head run), is

  L = (1 / H) sum_h [ 1/2 (InfoNCE(z1^h, z2^h; tau_h) + InfoNCE(z2^h, z1^h; tau_h))
                      + beta R(tau_h) ].

Each temperature lives in (tau_min, tau_max) as tau = tau_min + (tau_max - tau_min) sigmoid(t)
of a free parameter t (`head_temperatures`). The constants follow the authors' code
(github.com/LeiWangR/cl, src/amcl_components/adaptive_temperature.py: beta = 0.1, limits
(1e-5, 2.0), initial 0.1); kappa = 1/2 puts R's minimum at that upper limit, tau = 2. One
difference, said plainly: the paper predicts a temperature per pair with an MLP on [z_i; z_j],
which the blockwise loss cannot stream without a B x B MLP; here each head has one learned
temperature, so every path (dense, blockwise, ring over a mesh) is the plain InfoNCE per head.
"""

import math

import jax
import jax.numpy as jnp

from contrastive.losses import blockwise
from contrastive.losses import common
from contrastive.losses.info_nce import info_nce

RING = blockwise.DEFAULT_COLLECTIVE
TAU_LIMITS = (1e-5, 2.0)  # the authors' lower and upper temperatures


def head_temperatures(logits, limits=TAU_LIMITS):
  """[H] free parameters t -> [H] temperatures tau_min + (tau_max - tau_min) sigmoid(t)."""
  low, high = limits
  return low + (high - low) * jax.nn.sigmoid(logits)


def temperature_logit(tau, limits=TAU_LIMITS):
  """The free parameter t whose temperature is `tau` (the inverse of `head_temperatures`)."""
  low, high = limits
  if not low < tau < high:
    raise ValueError(f'the initial temperature {tau} must lie in ({low}, {high}).')
  p = (tau - low) / (high - low)
  return math.log(p) - math.log1p(-p)


def temperature_penalty(tau, kappa):
  """R(tau) = kappa log tau + 1 / tau, elementwise."""
  return kappa * jnp.log(tau) + 1.0 / tau


def amcl(z1, z2, *, temperatures, beta=0.1, kappa=0.5, negative_mask=None, mask_ids=None,
         block_size=None, mesh=None, collective=RING):
  """The AMCL loss of H heads' embeddings (module docstring).

  Args:
    z1, z2: [B, H * D] (the heads' embeddings side by side, as the model returns them) or
      [B, H, D]: view 1 and view 2 of each image; row i of z2 is row i of z1's positive.
    temperatures: [H] the heads' temperatures (`head_temperatures` of the model's parameter),
      traced: they are learned.
    beta: weight of the temperature penalty R (>= 0).
    kappa: R's log tau weight (> 0).
    negative_mask, mask_ids: as in `info_nce` (e.g. the two-tower recipes' duplicate texts:
      `blockwise.distinct_ids` with ids ([B], [B])), in both directions: the ids must be
      symmetric, the same for z1's rows as for z2's.
    block_size, mesh, collective: the InfoNCE paths (`info_nce`): None is dense, an int the
      blockwise loss, with `mesh` one shard per device.

  Returns:
    (loss, metrics): metrics are the heads' InfoNCE metrics averaged, 'contrastive' (the
    InfoNCE part), 'temperature_penalty' (beta times the mean R) and 'temperature/h' per head.
  """
  h = temperatures.shape[0]
  b = z1.shape[0]
  z1, z2 = z1.reshape(b, h, -1), z2.reshape(b, h, -1)
  common.check_pair(z1[:, 0], z2[:, 0], 'z1', 'z2')
  terms, metrics = [], []
  for head in range(h):  # a few heads: not a loop over rows or devices
    args = dict(temperature=temperatures[head], negative_mask=negative_mask,
                mask_ids=mask_ids, block_size=block_size, mesh=mesh, collective=collective)
    loss_12, m_12 = info_nce(z1[:, head], z2[:, head], **args)
    loss_21, m_21 = info_nce(z2[:, head], z1[:, head], **args)
    terms.append(0.5 * (loss_12 + loss_21))
    metrics.append(jax.tree.map(lambda a, c: 0.5 * (a + c), m_12, m_21))
  return combine(terms, metrics, temperatures, beta=beta, kappa=kappa)


def combine(terms, metrics, temperatures, *, beta=0.1, kappa=0.5):
  """AMCL's objective from its heads' contrastive losses: mean_h terms[h] + beta mean_h
  R(tau_h), with metrics (`amcl`'s Returns). terms: H scalars; metrics: H dicts of the same
  keys (averaged); temperatures: [H]. MoCo's heads (objectives.image_views) use it too."""
  contrastive = jnp.mean(jnp.stack(terms))
  penalty = beta * jnp.mean(temperature_penalty(temperatures.astype(contrastive.dtype), kappa))
  out = jax.tree.map(lambda *m: jnp.mean(jnp.stack(m)), *metrics)
  out.update(contrastive=contrastive, temperature_penalty=penalty)
  out.update({f'temperature/{k}': temperatures[k] for k in range(temperatures.shape[0])})
  return contrastive + penalty, out
