"""Two-tower model of the CLIP / SigLIP / LiT recipes: two encoders, a linear projection each
into a shared D-dimensional space, and the pair loss's learnable temperature (and bias).

    za = W_a f_a(a)    [N, D]      (a: images [N, H, W, C], or tokens for text-text pairs)
    zb = W_b f_b(b)    [N, D]      (b: tokens [N, L])

Contract with the losses: za and zb are NOT normalised. `losses.clip_loss` and
`losses.sigmoid_loss` L2-normalise their inputs and take the temperature (and bias) as
keyword arguments, which `LogitParams` returns ready to pass:

    za, zb, logit = model.apply(variables, images, tokens)
    loss, metrics = clip_loss(za, zb, **logit)          # loss_params='clip'
    loss, metrics = sigmoid_loss(za, zb, **logit)       # loss_params='siglip'
    loss, metrics = amcl(za, zb, **logit)               # loss_params='amcl', head_count=H

AMCL (Wang et al. 2024, `losses/amcl.py`): with `head_count` H >= 2 each projection maps
into H heads side by side, za, zb [N, H * D], each head with its own learned temperature.
Retrieval embeds with `normalize=True`: each head L2-normalised and scaled by 1/sqrt(H), so a
dot product of two embeddings is the mean of the heads' cosine similarities.

Retrieval and inference call `encode_image` / `encode_text` separately (e.g.
`model.apply(variables, images, method='encode_image', normalize=True)`).

A 'resnet' image tower has BatchNorm: with `train=True` pass `mutable=['batch_stats']`, and
its statistics are over the batch the step sees (see `resnet.py`). ViT and text towers have
no batch statistics (LayerNorm only), so image and text rows never interact in the model.

Mixed precision: each tower computes in its own `dtype` (`compute.py`) and each projection
in its tower's, unless `TwoTower.dtype` sets both projections'; za and zb come out in the
projections' compute dtype. `LogitParams` always computes in float32 (or float64 under x64).

References: Radford et al. 2021 (CLIP); Zhai et al. 2023 (SigLIP, Algorithm 1); Zhai et al.
2022 (LiT, which freezes the image tower: an optimizer matter, not a model one).
"""

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from contrastive.losses import amcl
from contrastive.losses import common
from contrastive.models import compute
from contrastive.models import resnet
from contrastive.models import text
from contrastive.models import vit

LOSS_PARAMS = ('clip', 'siglip', 'amcl')
CLIP_MAX_SCALE = 100.0  # CLIP clips the logit scale exp(log_scale) at 100 (Radford et al., 2.5)


class LogitParams(nn.Module):
  """The pair loss's learnable parameters, returned as loss keyword arguments.

  'clip' (Radford et al. 2021): one parameter `log_scale`, initialised to log(1/0.07);
  the scale min(exp(log_scale), 100) multiplies the cosine similarities:
      {'temperature': 1 / min(exp(log_scale), 100)}.
  'siglip' (Zhai et al. 2023): `log_scale` is SigLIP's t' (initialised to log 10, not
  clipped) and `bias` is b (initialised to -10):
      {'temperature': exp(-t'), 'bias': b}.
  'amcl' (Wang et al. 2024): one free parameter per head, `temperature_logit` [H], each
  temperature in (1e-5, 2) (`losses.amcl.head_temperatures`), initialised to 1/scale_init:
      {'temperatures': [H]}.

  Attributes:
    kind: 'clip', 'siglip' or 'amcl'.
    scale_init: initial exp(log_scale); None means 1/0.07 ('clip') or 10 ('siglip', 'amcl':
      the heads' initial temperature 0.1, that of the AMCL authors' code).
    bias_init: initial b ('siglip' only).
    count: the heads H ('amcl' only).
  """
  kind: str = 'clip'
  scale_init: float | None = None
  bias_init: float = -10.0
  count: int = 1

  @nn.compact
  def __call__(self):
    if self.kind not in LOSS_PARAMS:
      raise ValueError(f'loss_params must be one of {LOSS_PARAMS}, got {self.kind!r}.')
    default = 1 / 0.07 if self.kind == 'clip' else 10.0
    scale = default if self.scale_init is None else self.scale_init
    if not scale > 0 or not math.isfinite(scale):
      raise ValueError(f'logit_scale_init={self.scale_init} must be a finite number > 0 (the '
                       'initial scale exp(t)); None gives the default.')
    if self.kind == 'amcl':
      start = amcl.temperature_logit(1 / scale)
      logits = self.param('temperature_logit', nn.initializers.constant(start), (self.count,))
      return {'temperatures': amcl.head_temperatures(logits)}
    log_init = math.log(scale)
    log_scale = self.param('log_scale', nn.initializers.constant(log_init), ())
    if self.kind == 'clip':
      return {'temperature': jnp.exp(-jnp.minimum(log_scale, math.log(CLIP_MAX_SCALE)))}
    bias = self.param('bias', nn.initializers.constant(self.bias_init), ())
    return {'temperature': jnp.exp(-log_scale), 'bias': bias}


class TwoTower(nn.Module):
  """Two encoders with linear projections to `embed_dim` and the loss's logit parameters.

  Parameters: 'tower_a', 'proj_a', 'tower_b', 'proj_b' (absent when shared) and 'logit'
  (`LogitParams`; kept apart so an optimizer can give them their own learning rate).

  Attributes:
    tower_a: encoder of the first input (an image tower, or a text tower for text-text).
    tower_b: encoder of the second input; None shares tower_a and its projection (a
      siamese text-text model).
    embed_dim: D, the shared embedding dimension.
    loss_params, scale_init, bias_init: as `LogitParams` kind, scale_init, bias_init.
    dtype: compute dtype of the projections; None (default): each projection computes in
      its tower's `dtype` (float32 for a tower without one).
    proj_bias: the projections have a bias (big_vision's SigLIP heads); CLIP's have none.
    head_count: H, AMCL's heads (loss_params 'amcl'): each projection maps to H * D.
  """
  tower_a: nn.Module
  tower_b: nn.Module | None = None
  embed_dim: int = 512
  loss_params: str = 'clip'
  scale_init: float | None = None
  bias_init: float = -10.0
  dtype: Any = None
  proj_bias: bool = False
  head_count: int = 1

  def setup(self):
    def projection(tower):  # a linear map into the joint space, as CLIP's W_i, W_t
      dtype = getattr(tower, 'dtype', jnp.float32) if self.dtype is None else self.dtype
      return nn.Dense(self.embed_dim * self.head_count, use_bias=self.proj_bias,
                      dtype=compute.flax_dtype(dtype))
    self.proj_a = projection(self.tower_a)
    if self.tower_b is not None:
      self.proj_b = projection(self.tower_b)
    self.logit = LogitParams(self.loss_params, self.scale_init, self.bias_init,
                             self.head_count)

  def _normalize(self, z):
    """z [N, H * D] -> each head L2-normalised, over sqrt(H): a unit vector [N, H * D]."""
    if self.head_count == 1:
      return common.l2_normalize(z)
    heads = common.l2_normalize(z.reshape(*z.shape[:-1], self.head_count, self.embed_dim))
    return (heads / math.sqrt(self.head_count)).reshape(z.shape)

  def encode_a(self, a, *, train: bool = False, normalize: bool = False):
    """a [N, ...] -> za [N, H * D] (H = head_count, 1 but for AMCL); unit rows if
    `normalize` (`_normalize`)."""
    z = self.proj_a(self.tower_a(a, train=train))
    return self._normalize(z) if normalize else z

  def encode_b(self, b, *, train: bool = False, normalize: bool = False):
    """b [N, ...] -> zb [N, H * D] (through tower_a when shared); unit rows if `normalize`."""
    if self.tower_b is None:
      return self.encode_a(b, train=train, normalize=normalize)
    z = self.proj_b(self.tower_b(b, train=train))
    return self._normalize(z) if normalize else z

  def encode_image(self, images, *, train: bool = False, normalize: bool = False):
    """images [N, H, W, C] -> [N, D]: `encode_a` under the name retrieval and inference use."""
    return self.encode_a(images, train=train, normalize=normalize)

  def encode_text(self, tokens, *, train: bool = False, normalize: bool = False):
    """tokens [N, L] -> [N, D]: `encode_b` under the name retrieval and inference use."""
    return self.encode_b(tokens, train=train, normalize=normalize)

  def logit_params(self):
    """The loss keyword arguments: {'temperature'} ('clip'), {'temperature', 'bias'}
    ('siglip') or {'temperatures'} ('amcl')."""
    return self.logit()

  def __call__(self, a, b, *, train: bool = False):
    """(a [N, ...], b [N, ...]) -> (za [N, D], zb [N, D], loss keyword arguments), unnormalised."""
    return self.encode_a(a, train=train), self.encode_b(b, train=train), self.logit()


TOWERS = ('vit', 'resnet', 'text')


def build_tower(cfg, dtype=None, remat=None):
  """One encoder from a tower config: `name` in TOWERS, an optional `preset`, module fields.

  'vit': `vit.ViT` fields, preset in vit.VIT_PRESETS; 'text': `text.TextTransformer` fields,
  preset in text.TEXT_PRESETS; 'resnet': `resnet.ResNet` fields, preset in resnet.PRESETS.
  Given fields override the preset's. Every tower has the fields `dtype` (compute dtype: a
  dtype or its name, e.g. 'bfloat16') and `remat` ('' or a name in `compute.REMAT_POLICIES`);
  the arguments `dtype` and `remat`, when not None, override the config's.
  """
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
  if dtype is not None:
    fields['dtype'] = dtype
  if remat is not None:
    fields['remat'] = remat
  if 'dtype' in fields:
    fields['dtype'] = compute.as_dtype(fields['dtype'])
  if fields.get('remat'):
    compute.remat_policy(fields['remat'])  # a ValueError listing the names if unknown
  name, preset = fields.pop('name', None), fields.pop('preset', None)
  if name not in TOWERS:
    raise ValueError(f'unknown tower name {name!r}; choose one of {TOWERS}.')
  cls, presets = {'vit': (vit.ViT, vit.VIT_PRESETS), 'text': (text.TextTransformer,
                  text.TEXT_PRESETS), 'resnet': (resnet.ResNet, resnet.PRESETS)}[name]
  if preset is not None and preset not in presets:
    raise ValueError(f'unknown {name} preset {preset!r}; choose one of {tuple(presets)}.')
  allowed = set(cls.__dataclass_fields__) - {'parent', 'name'}
  if set(fields) - allowed:
    raise ValueError(f'unknown {name} tower fields {sorted(set(fields) - allowed)}; '
                     f'allowed: {sorted(allowed)}.')
  return cls(**{**(presets[preset] if preset else {}), **fields})


def build_two_tower(cfg, dtype=None, remat=None):
  """TwoTower from the model config (`config.model`; a whole config with a `model` field
  is accepted too).

  Fields: `image` (or `a`): tower A's config; `text` (or `b`): tower B's (see `build_tower`);
  `share` (default False): tower B = tower A, same weights (tower B's config then omitted);
  `embed_dim`; `loss_params`: 'clip', 'siglip' or 'amcl'; optional `logit_scale_init` (None:
  1/0.07 or 10), `logit_bias_init` (-10), `proj_bias` (False) and `head_count` (1; AMCL's
  H >= 2, with loss_params 'amcl' only).

  dtype: None (each tower's config field `dtype`, float32 by default; each projection in its
    tower's), or a compute dtype (a dtype or its name) for both towers and projections,
    overriding the tower configs. The logit parameters stay float32.
  remat: None (the tower configs' `remat`), or a `remat` name ('' = none) for both towers.
  """
  cfg = cfg.model if 'model' in cfg else cfg
  tower_a = cfg.get('image', cfg.get('a'))
  tower_b = cfg.get('text', cfg.get('b'))
  share = cfg.get('share', False)
  if cfg.get('loss_params', 'clip') not in LOSS_PARAMS:
    raise ValueError(f"loss_params must be one of {LOSS_PARAMS}, got {cfg.get('loss_params')!r}.")
  embed_dim = cfg.get('embed_dim')
  if not isinstance(embed_dim, int) or isinstance(embed_dim, bool) or embed_dim < 1:
    raise ValueError(f'embed_dim={embed_dim!r} must be an int >= 1.')
  heads = cfg.get('head_count', 1)
  if (not isinstance(heads, int) or isinstance(heads, bool) or heads < 1 or
      (heads > 1) != (cfg.get('loss_params') == 'amcl')):
    raise ValueError(f"head_count={heads!r} with loss_params={cfg.get('loss_params')!r}: "
                     "AMCL's loss_params 'amcl' takes head_count >= 2 heads and only it uses "
                     'them (e.g. loss_params=amcl, head_count=4).')
  scale = cfg.get('logit_scale_init')
  if heads > 1 and scale is not None and not (isinstance(scale, (int, float)) and
                                              amcl.TAU_LIMITS[0] < 1 / scale < amcl.TAU_LIMITS[1]):
    raise ValueError(f'logit_scale_init={scale!r}: AMCL\'s heads start at temperature '
                     f'1/logit_scale_init, which must lie in {amcl.TAU_LIMITS}.')
  if tower_a is None or (tower_b is None and not share):
    raise ValueError(f'the model config needs image (or a) and text (or b) tower configs, '
                     f'or share=True; got fields {sorted(cfg.keys())}.')
  return TwoTower(tower_a=build_tower(tower_a, dtype, remat),
                  tower_b=None if share else build_tower(tower_b, dtype, remat),
                  dtype=None if dtype is None else compute.as_dtype(dtype),
                  embed_dim=cfg.embed_dim, loss_params=cfg.get('loss_params', 'clip'),
                  scale_init=cfg.get('logit_scale_init'),
                  bias_init=cfg.get('logit_bias_init', -10.0),
                  proj_bias=bool(cfg.get('proj_bias', False)), head_count=heads)
