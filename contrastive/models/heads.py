"""Projection heads and the two-view encoder+head model of SimCLR."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from contrastive.models import resnet


class ProjectionHead(nn.Module):
  """MLP g(h): Dense -> BN -> ReLU (repeated) -> Dense, [N, F] -> [N, out_dim].

  SimCLR (Chen et al. 2020, section 2.1) uses one hidden layer; SimCLR v2 uses more.
  The output is not normalised: the losses normalise inside.
  """
  hidden_dims: Sequence[int] = (512,)
  out_dim: int = 128

  @nn.compact
  def __call__(self, h, *, train: bool):
    for i, dim in enumerate(self.hidden_dims):
      h = nn.Dense(dim, use_bias=False, name=f'hidden{i + 1}')(h)
      h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f'bn{i + 1}')(h))
    return nn.Dense(self.out_dim, name='out')(h)


class ContrastiveModel(nn.Module):
  """Encoder f followed by projection head g: images [N, H, W, C] -> (h [N, F], z [N, out_dim]).

  Evaluation (kNN, linear probe) uses h; the loss uses z.
  """
  encoder: nn.Module
  head: nn.Module

  def __call__(self, images, *, train: bool):
    h = self.encoder(images, train=train)
    return h, self.head(h, train=train)

  def embed(self, images):
    """Frozen features h for evaluation: BatchNorm in inference mode."""
    return self.encoder(images, train=False)


def build_model(cfg):
  """ContrastiveModel from config `cfg` (fields: encoder preset or stage_sizes/width/block, head)."""
  enc = dict(resnet.PRESETS[cfg.preset]) if cfg.get('preset') else {}
  for field in ('stage_sizes', 'width', 'block'):
    if cfg.get(field):  # empty / 0 = take it from the preset
      enc[field] = tuple(cfg[field]) if field == 'stage_sizes' else cfg[field]
  encoder = resnet.ResNet(**enc, stem_strides=cfg.get('stem_strides', 1))
  head = ProjectionHead(hidden_dims=tuple(cfg.head_hidden_dims), out_dim=cfg.head_out_dim)
  return ContrastiveModel(encoder=encoder, head=head)
