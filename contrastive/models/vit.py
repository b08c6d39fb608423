"""Vision Transformer image tower (Dosovitskiy et al. 2021), in Flax Linen.

images [N, H, W, C] -> features [N, width]:

    patches  = split into (H/p)(W/p) non-overlapping p x p patches, flattened: [N, T, p*p*C]
    x        = patches W_e + b_e + E_pos                 [N, T, width]
    x        = Encoder(x)     (pre-LN blocks + final LN, `transformer.Encoder`)
    features = pool(x)        'gap' | 'cls' | 'map'      [N, width]

The patch embedding is a Dense layer on flattened patches, which is the same linear map as
the usual p x p stride-p convolution (a kernel [p, p, C, width] reshaped to [p*p*C, width]),
but runs as one matmul: XLA's CPU convolutions are ~2.5x slower than its matmuls (DESIGN.md).

Position embeddings: 'learn' (the default, as SigLIP: a learned [1, T, width] table,
N(0, 1/width) as in big_vision) or 'sincos2d' (fixed 2D sine-cosine, no parameters; MoCo v3,
Chen et al. 2021, and big_vision `posemb_sincos_2d`). The learned table fixes the number of
patches T to the training image size; 'sincos2d' is computed from each input's patch grid.

Pooling: 'gap' averages the T tokens; 'cls' prepends a learned token (without position
embedding, as big_vision; with `cls_posemb` the table has T + 1 rows, the first the class
token's, as CLIP's) and returns it; 'map' is attention pooling with a learned probe
(`transformer.MAPHead`, the pooling of SigLIP). `pre_norm` adds CLIP's LayerNorm before the
blocks (`ln_pre`).

Inputs: integer images (uint8) are scaled to [0, 1] in float32, as `data.augment.to_float`
does; float images are used as they are (the pipeline's [0, 1] floats, or any normalisation),
and float64 stays float64. `pixel_mean` / `pixel_std` (per channel, on the [0, 1] scale) then
normalise them as a pretrained tower expects: (x - mean) / std (CLIP's statistics; (0.5, 0.5,
0.5) both for big_vision's [-1, 1]). `dtype` (`compute.py`) is the compute dtype from the patch
embedding on: bfloat16 gives bfloat16 features from float32 parameters.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from contrastive.models import compute
from contrastive.models import transformer

POOLS = ('gap', 'cls', 'map')
POSEMBS = ('learn', 'sincos2d')


# Preset sizes (fields of `ViT`). mlp_dim = 4 * width throughout.
VIT_SMALL = dict(patch=4, width=128, depth=4, heads=4, mlp_dim=512)  # CPU; 32x32 emoji
VIT_B16 = dict(patch=16, width=768, depth=12, heads=12, mlp_dim=3072)  # ViT-B/16, pod configs
# The public architectures (contrastive/weights: their checkpoints load into these).
_CLIP = dict(pool='cls', cls_posemb=True, pre_norm=True, ln_eps=1e-5, act='gelu',
             pixel_mean=(0.48145466, 0.4578275, 0.40821073),
             pixel_std=(0.26862954, 0.26130258, 0.27577711))
VIT_PRESETS = {'small': VIT_SMALL, 'B/16': VIT_B16,
               'open_clip/ViT-B-32': dict(_CLIP, patch=32, width=768, depth=12, heads=12,
                                          mlp_dim=3072),
               'open_clip/ViT-B-16': dict(_CLIP, patch=16, width=768, depth=12, heads=12,
                                          mlp_dim=3072),
               'open_clip/ViT-L-14': dict(_CLIP, patch=14, width=1024, depth=24, heads=16,
                                          mlp_dim=4096)}
# big_vision's SigLIP image towers: MAP pooling, images in [-1, 1] (value_range(-1, 1)).
_SIGLIP = dict(pool='map', pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5))
VIT_PRESETS.update({
    'big_vision/B/16': dict(_SIGLIP, patch=16, width=768, depth=12, heads=12, mlp_dim=3072),
    'big_vision/L/16': dict(_SIGLIP, patch=16, width=1024, depth=24, heads=16, mlp_dim=4096),
    'big_vision/So400m/14': dict(_SIGLIP, patch=14, width=1152, depth=27, heads=16,
                                 mlp_dim=4304)})


def posemb_sincos_2d(h, w, width, temperature=10_000.0, dtype=jnp.float32):
  """Fixed 2D sine-cosine position embeddings: [1, h*w, width], width divisible by 4.

  A quarter of the channels each hold sin(x w_k), cos(x w_k), sin(y w_k), cos(y w_k) with
  w_k = temperature^(-k / (width/4 - 1)), k = 0 .. width/4 - 1 (big_vision `posemb_sincos_2d`).
  """
  if width % 4:
    raise ValueError(f'sincos2d position embeddings need width % 4 == 0, got width={width}.')
  y, x = jnp.mgrid[:h, :w]
  omega = jnp.arange(width // 4) / max(width // 4 - 1, 1)
  omega = 1.0 / (temperature**omega)
  y = jnp.einsum('m,d->md', y.reshape(-1), omega)  # (h*w,) x (width/4,) -> (h*w, width/4)
  x = jnp.einsum('m,d->md', x.reshape(-1), omega)
  pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
  return pe.astype(dtype)[None]


def to_float_images(images):
  """Integer images -> float32 in [0, 1]; float images unchanged (float64 stays float64)."""
  images = jnp.asarray(images)
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 255.0
  return images


def patchify(images, patch):
  """images [N, H, W, C] -> non-overlapping patches [N, (H/p)(W/p), p*p*C], row-major."""
  n, h, w, c = images.shape
  if h % patch or w % patch:
    raise ValueError(f'image size must be divisible by the patch size {patch}; '
                     f'got images of shape {tuple(images.shape)}.')
  x = images.reshape(n, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # (N, h/p, w/p, p, p, C)
  return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


class ViT(nn.Module):
  """ViT image tower: images [N, H, W, C] (uint8 or float) -> features [N, width].

  Attributes:
    patch: patch size p; H and W must be multiples of it.
    width: token dimension (the output dimension).
    depth: number of pre-LN Transformer blocks.
    heads: attention heads (width % heads == 0).
    mlp_dim: hidden size of each block's MLP.
    pool: 'gap' (mean over patches), 'cls' (class token) or 'map' (attention pooling).
    posemb: 'learn' (learned table, fixed to the training image size) or 'sincos2d'.
    dropout: dropout rate in the blocks when `train=True` (0: deterministic).
    dtype: compute dtype (`compute.py`); parameters stay float32.
    remat: '' or a name in `compute.REMAT_POLICIES`, applied to each block.
    act, ln_eps: the blocks' MLP activation and LayerNorm epsilon (`transformer`).
    cls_posemb: with pool 'cls', the class token has a position embedding (CLIP).
    pre_norm: a LayerNorm before the blocks (CLIP's ln_pre).
    pixel_mean, pixel_std: per-channel normalisation of the [0, 1] images (() : none).
  """
  patch: int = 16
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  pool: str = 'map'
  posemb: str = 'learn'
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: str = ''
  act: str = 'gelu_tanh'
  ln_eps: float = 1e-6
  cls_posemb: bool = False
  pre_norm: bool = False
  pixel_mean: tuple = ()
  pixel_std: tuple = ()

  def normalized(self, images):
    """images -> float [0, 1] (`to_float_images`), then (x - pixel_mean) / pixel_std."""
    x = to_float_images(images)
    if self.pixel_mean:
      x = (x - jnp.asarray(self.pixel_mean, x.dtype)) / jnp.asarray(self.pixel_std, x.dtype)
    return x

  def __post_init__(self):  # a wrong name or size fails when the tower is built, not later
    if self.pool not in POOLS:
      raise ValueError(f'pool must be one of {POOLS}, got {self.pool!r}.')
    transformer.check_sizes(self.width, self.depth, self.heads, self.mlp_dim)
    if not isinstance(self.patch, int) or self.patch < 1:
      raise ValueError(f'patch={self.patch!r} must be an int >= 1.')
    if self.posemb not in POSEMBS:
      raise ValueError(f'posemb must be one of {POSEMBS}, got {self.posemb!r}.')
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    if images.ndim != 4:
      raise ValueError(f'images must be [N, H, W, C], got shape {tuple(images.shape)}.')
    x = patchify(self.normalized(images), self.patch)  # (N, T, p*p*C)
    # (N, T, p*p*C) . (p*p*C, width) -> (N, T, width)
    x = nn.Dense(self.width, dtype=compute.flax_dtype(self.dtype), name='embedding')(x)
    n, tokens, _ = x.shape
    with_cls = self.pool == 'cls'
    if with_cls and self.cls_posemb:  # CLIP: the class token first, then one table for all
      x = self._prepend_cls(x)
      tokens += 1
    if self.posemb == 'learn':
      pos = self.param('pos_embedding', nn.initializers.normal(stddev=self.width**-0.5),
                       (1, tokens, self.width))
    else:
      pos = posemb_sincos_2d(images.shape[1] // self.patch, images.shape[2] // self.patch,
                             self.width)
    x = x + pos.astype(x.dtype)
    if with_cls and not self.cls_posemb:
      x = self._prepend_cls(x)
    if self.pre_norm:
      x = transformer.layer_norm(self.ln_eps, compute.flax_dtype(self.dtype), 'pre_norm')(x)
    x = transformer.Encoder(self.depth, self.heads, self.mlp_dim, self.dropout, self.dtype,
                            self.remat, self.act, self.ln_eps, name='encoder')(
                                x, train=train)  # (N, T [+1], width)
    if self.pool == 'gap':
      return jnp.mean(x, axis=1)
    if self.pool == 'cls':
      return x[:, 0]
    return transformer.MAPHead(self.heads, self.mlp_dim, self.dtype, self.act, self.ln_eps,
                               name='map_head')(x)

  def _prepend_cls(self, x):
    """[N, T, width] -> [N, 1 + T, width] with the learned class token first."""
    cls = self.param('cls', nn.initializers.zeros, (1, 1, self.width))
    n = x.shape[0]
    return jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, self.width)), x], axis=1)
