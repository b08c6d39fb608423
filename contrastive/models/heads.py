"""Projection heads and the two-view encoder + head (+ predictor) model of SimCLR and MoCo."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from contrastive.losses import amcl
from contrastive.models import compute
from contrastive.models import resnet
from contrastive.models import two_tower

NORMS = ('batch', 'layer', 'none')


class ProjectionHead(nn.Module):
  """MLP g(h): Dense -> norm -> ReLU (repeated) -> Dense, [N, F] -> [N, out_dim].

  SimCLR (Chen et al. 2020, section 2.1) uses one hidden layer with BatchNorm; SimCLR v2 uses
  more. The output is not normalised: the losses normalise inside.

  Attributes:
    hidden_dims: widths of the hidden layers.
    out_dim: output width.
    norm: after each hidden Dense: 'batch' (BatchNorm `bn{i}`, statistics over the batch;
      batch_stats in training), 'layer' (LayerNorm `ln{i}`, per row: no batch statistics,
      rows never interact) or 'none'.
    dtype: compute dtype (`compute.py`); parameters and normalisation statistics stay float32.
  """
  hidden_dims: Sequence[int] = (512,)
  out_dim: int = 128
  norm: str = 'batch'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, *, train: bool):
    if self.norm not in NORMS:
      raise ValueError(f'norm must be one of {NORMS}, got {self.norm!r}.')
    dtype = compute.flax_dtype(self.dtype)
    for i, dim in enumerate(self.hidden_dims):
      h = nn.Dense(dim, use_bias=self.norm == 'none', dtype=dtype, name=f'hidden{i + 1}')(h)
      if self.norm == 'batch':
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=dtype,
                         name=f'bn{i + 1}')(h)
      elif self.norm == 'layer':
        h = nn.LayerNorm(dtype=dtype, name=f'ln{i + 1}')(h)
      h = nn.relu(h)
    return nn.Dense(self.out_dim, dtype=dtype, name='out')(h)


class MultiHead(nn.Module):
  """AMCL's H projection heads (`losses/amcl.py`), each with its own learned temperature.

  [N, F] -> [N, H * out_dim]: the heads' outputs side by side (the loss splits them); the
  parameter 'temperature_logit' [H] gives the temperatures `temperatures()` in (1e-5, 2).

  Attributes:
    count: H.
    hidden_dims, out_dim, norm, dtype: each head's (`ProjectionHead`).
    temperature: every head's initial temperature.
  """
  count: int = 2
  hidden_dims: Sequence[int] = (512,)
  out_dim: int = 128
  norm: str = 'batch'
  dtype: Any = jnp.float32
  temperature: float = 0.1

  def setup(self):
    self.heads = [ProjectionHead(hidden_dims=self.hidden_dims, out_dim=self.out_dim,
                                 norm=self.norm, dtype=self.dtype) for _ in range(self.count)]
    start = amcl.temperature_logit(self.temperature)
    self.temperature_logit = self.param('temperature_logit',
                                        lambda _: jnp.full((self.count,), start, jnp.float32))

  def __call__(self, h, *, train: bool):
    return jnp.concatenate([head(h, train=train) for head in self.heads], axis=-1)

  def temperatures(self):
    """[H] float32: the heads' temperatures."""
    return amcl.head_temperatures(self.temperature_logit)


def embedding_dim(head):
  """The width of a head's output z: out_dim, or H * out_dim for AMCL's `MultiHead`."""
  return head.out_dim * getattr(head, 'count', 1)


class ContrastiveModel(nn.Module):
  """Encoder f, projection head g and an optional predictor q (MoCo v3, BYOL).

  images [N, H, W, C] -> (h [N, F], z [N, out_dim]) with z = g(h), or z = q(g(h)) when
  `predict` is set and there is a predictor (the online branch of MoCo v3; the momentum
  branch calls it with predict=False). Evaluation (kNN, linear probe) uses h; the loss uses z.

  The model computes nothing itself: its compute dtype is that of its encoder, head and
  predictor (each module's `dtype`), which `build_model(cfg, dtype=...)` sets together; h and
  z come out in it.
  """
  encoder: nn.Module
  head: nn.Module
  predictor: nn.Module | None = None

  def __call__(self, images, *, train: bool, predict: bool = True):
    h = self.encoder(images, train=train)
    z = self.head(h, train=train)
    if predict and self.predictor is not None:
      z = self.predictor(z, train=train)
    return h, z

  def embed(self, images):
    """Frozen features h for evaluation: BatchNorm in inference mode."""
    return self.encoder(images, train=False)

  def loss_params(self):
    """The loss's learned arguments: {'temperatures': [H]} with AMCL's heads, else {}."""
    if isinstance(self.head, MultiHead):
      return {'temperatures': self.head.temperatures()}
    return {}


def build_encoder(cfg, dtype=None, remat=None):
  """The encoder of config `cfg`: `cfg.encoder`, a tower config such as
  {'name': 'vit', 'patch': 7, ...} (`two_tower.build_tower`), where set; else the ResNet of
  `preset` or stage_sizes/width/block/stem_strides, with the optional fields `dtype` (compute
  dtype, e.g. 'bfloat16') and `remat` (`compute.REMAT_POLICIES`). `dtype` and `remat`, when
  given, override the config's."""
  if cfg.get('encoder'):
    return two_tower.build_tower(cfg.encoder, dtype=dtype, remat=remat)
  enc = dict(resnet.PRESETS[cfg.preset]) if cfg.get('preset') else {}
  for field in ('stage_sizes', 'width', 'block'):
    if cfg.get(field):  # empty / 0 = take it from the preset
      enc[field] = tuple(cfg[field]) if field == 'stage_sizes' else cfg[field]
  dtype = compute.as_dtype(cfg.get('dtype', jnp.float32) if dtype is None else dtype)
  remat = cfg.get('remat', '') if remat is None else remat
  return resnet.ResNet(**enc, stem_strides=cfg.get('stem_strides', 1), dtype=dtype,
                       remat=remat, pool=cfg.get('pool', 'avg'))


def build_model(cfg, dtype=None, remat=None):
  """ContrastiveModel from config `cfg` (fields: the encoder's (`build_encoder`), head,
  optional head_count > 1 (AMCL's heads, `MultiHead`, starting at head_temperature),
  optional predictor_hidden_dims, optional head_norm: 'batch' (default), 'layer' or 'none',
  the norm of the head's and predictor's hidden layers (`ProjectionHead.norm`)).

  dtype: None, or a compute dtype (a dtype or its name) for the encoder, head and predictor,
    overriding the configs; with None the head and predictor compute in the encoder's dtype.
  remat: None, or a `remat` name ('' = none) for the encoder, overriding its config.
  """
  encoder = build_encoder(cfg, dtype=dtype, remat=remat)
  head_dtype = compute.as_dtype(encoder.dtype if dtype is None else dtype)
  norm = cfg.get('head_norm', 'batch')
  head_args = dict(hidden_dims=tuple(cfg.head_hidden_dims), out_dim=cfg.head_out_dim, norm=norm,
                   dtype=head_dtype)
  if cfg.get('head_count', 1) > 1:  # AMCL's heads
    head = MultiHead(count=cfg.head_count, temperature=cfg.get('head_temperature', 0.1),
                     **head_args)
  else:
    head = ProjectionHead(**head_args)
  predictor = None
  if cfg.get('predictor_hidden_dims'):  # MoCo v3: 2-layer MLP, out_dim -> hidden -> out_dim
    predictor = ProjectionHead(hidden_dims=tuple(cfg.predictor_hidden_dims),
                               out_dim=cfg.head_out_dim, norm=norm, dtype=head_dtype)
  return ContrastiveModel(encoder=encoder, head=head, predictor=predictor)
