"""Projection heads and the two-view encoder + head (+ predictor) model of SimCLR and MoCo."""

from typing import Sequence

import flax.linen as nn

from contrastive.models import resnet
from contrastive.models import two_tower


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
  """Encoder f, projection head g and an optional predictor q (MoCo v3, BYOL).

  images [N, H, W, C] -> (h [N, F], z [N, out_dim]) with z = g(h), or z = q(g(h)) when
  `predict` is set and there is a predictor (the online branch of MoCo v3; the momentum
  branch calls it with predict=False). Evaluation (kNN, linear probe) uses h; the loss uses z.
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


def build_encoder(cfg):
  """The encoder of config `cfg`: `cfg.encoder`, a tower config such as
  {'name': 'vit', 'patch': 7, ...} (`two_tower.build_tower`), where set; else the ResNet of
  `preset` or stage_sizes/width/block/stem_strides."""
  if cfg.get('encoder'):
    return two_tower.build_tower(cfg.encoder)
  enc = dict(resnet.PRESETS[cfg.preset]) if cfg.get('preset') else {}
  for field in ('stage_sizes', 'width', 'block'):
    if cfg.get(field):  # empty / 0 = take it from the preset
      enc[field] = tuple(cfg[field]) if field == 'stage_sizes' else cfg[field]
  return resnet.ResNet(**enc, stem_strides=cfg.get('stem_strides', 1))


def build_model(cfg):
  """ContrastiveModel from config `cfg` (fields: the encoder's (`build_encoder`), head,
  optional predictor_hidden_dims)."""
  encoder = build_encoder(cfg)
  head = ProjectionHead(hidden_dims=tuple(cfg.head_hidden_dims), out_dim=cfg.head_out_dim)
  predictor = None
  if cfg.get('predictor_hidden_dims'):  # MoCo v3: 2-layer MLP, out_dim -> hidden -> out_dim
    predictor = ProjectionHead(hidden_dims=tuple(cfg.predictor_hidden_dims),
                               out_dim=cfg.head_out_dim)
  return ContrastiveModel(encoder=encoder, head=head, predictor=predictor)
