"""open_clip's CLIP checkpoints <-> the two-tower parameters (contrastive/models/two_tower.py).

An open_clip state dict names torch tensors ('visual.conv1.weight', 'transformer.resblocks.0.
attn.in_proj_weight', ...). `tensors(arch)` lists, in the checkpoint's order, each of them with
the parameters it becomes here and the two conversions:

  visual.conv1.weight [W, C, p, p]        tower_a/embedding/kernel [p p C, W] (bias 0: none)
  visual.class_embedding [W]              tower_a/cls [1, 1, W]
  visual.positional_embedding [T+1, W]    tower_a/pos_embedding [1, T+1, W]
  visual.ln_pre / ln_post                 tower_a/pre_norm, tower_a/encoder/encoder_norm
  *.resblocks.i.ln_1 / ln_2               encoder/block{i}/norm1 / norm2 (weight -> scale)
  *.resblocks.i.attn.in_proj_weight [3W, W]   block{i}/attention/{query,key,value}/kernel [W, H, d]
  *.resblocks.i.attn.out_proj.weight [W, W]   block{i}/attention/out/kernel [H, d, W]
  *.resblocks.i.mlp.c_fc / c_proj         block{i}/mlp/fc1 / fc2 (weight [out, in] -> kernel [in, out])
  visual.proj [W, D], text_projection [W, D]   proj_a/kernel, proj_b/kernel (x @ proj, as there)
  token_embedding.weight [V, W]           tower_b/token_embedding/embedding
  positional_embedding [L, W]             tower_b/pos_embedding [1, L, W]
  ln_final                                tower_b/encoder/encoder_norm
  logit_scale []                          logit/log_scale

Architectures (`ARCHS`): open_clip's ViT-B-32, ViT-B-16 and ViT-L-14 (exact GELU) and their
'-quickgelu' forms (x sigmoid(1.702 x): OpenAI's weights), as the presets
'open_clip/<arch>' of models/vit.py and models/text.py.
"""

import dataclasses
from typing import Callable

import numpy as np

NAME = 'open_clip'
ARCHS = {'ViT-B-32': 512, 'ViT-B-16': 512, 'ViT-L-14': 768}  # -> embed_dim
BUFFERS = ('attn_mask',)  # torch buffers, not parameters: skipped on import
IMAGE_SIZE = 224
LOSS = 'clip_loss'
TOKENIZER = 'clip_bpe'
# open_clip's eval transform: the shorter side resized to the image size (bicubic), the
# centre cropped; mean/std are the image tower's pixel_mean / pixel_std.
PREPROCESS = dict(resize='short_side_crop', interpolation='bicubic')


def model_config(arch, overrides=None):
  """The two-tower `config.model` of an open_clip architecture name; `overrides`: {'image':
  {...}, 'text': {...}, 'embed_dim': D} merged over it (an open_clip model config of other
  sizes, or the tests' tiny ones)."""
  base, quick = (arch[:-len('-quickgelu')], True) if arch.endswith('-quickgelu') else (arch, False)
  if base not in ARCHS:
    raise ValueError(f'unknown open_clip architecture {arch!r}; choose one of '
                     f'{[a + q for a in ARCHS for q in ("", "-quickgelu")]}.')
  act = 'quick_gelu' if quick else 'gelu'
  overrides = dict(overrides or {})
  return dict(image=dict(name='vit', preset=f'open_clip/{base}', act=act,
                         **overrides.pop('image', {})),
              text=dict(name='text', preset=f'open_clip/{base}', act=act,
                        **overrides.pop('text', {})),
              embed_dim=overrides.pop('embed_dim', ARCHS[base]), loss_params='clip',
              logit_scale_init=1 / 0.07, **overrides)


def image_size(arch):
  del arch
  return IMAGE_SIZE


def tokenizer_config(arch):
  """config.tokenizer of the architecture (the vocabulary's size comes from the file)."""
  del arch
  return dict(kind=TOKENIZER, context=77)


def normalize_state(state):
  return state


def write(state, path):
  """Writes a state dict as open_clip reads it (`.safetensors`; torch not needed)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(state, path)


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One checkpoint tensor: `key` in the state dict, `paths` of the parameters it fills,
  `to_ours(array) -> tuple of arrays` (one per path) and `to_theirs(arrays) -> array`."""
  key: str
  paths: tuple
  to_ours: Callable
  to_theirs: Callable


def _same(key, path, lead=0):
  """A tensor copied as it is, with `lead` unit dimensions in front here ([W] -> [1, 1, W])."""
  return Tensor(key, (path,), lambda x: (x.reshape((1,) * lead + x.shape),),
                lambda xs: xs[0].reshape(xs[0].shape[lead:]))


def _linear(prefix, path):
  """torch Linear (weight [out, in], bias [out]) -> flax Dense (kernel [in, out], bias)."""
  return [Tensor(prefix + '.weight', (path + ('kernel',),), lambda x: (x.T,), lambda xs: xs[0].T),
          _same(prefix + '.bias', path + ('bias',))]


def _norm(prefix, path):
  return [_same(prefix + '.weight', path + ('scale',)), _same(prefix + '.bias', path + ('bias',))]


def _block(prefix, path, width, heads):
  """One residual attention block (open_clip `ResidualAttentionBlock`)."""
  d = width // heads
  qkv = tuple(path + ('attention', n) for n in ('query', 'key', 'value'))
  split = lambda x, shape: tuple(part.T.reshape(shape) for part in np.split(x, 3))
  return (_norm(prefix + '.ln_1', path + ('norm1',)) + [
      Tensor(prefix + '.attn.in_proj_weight', tuple(p + ('kernel',) for p in qkv),
             lambda x: split(x, (width, heads, d)),
             lambda xs: np.concatenate([k.reshape(width, width).T for k in xs])),
      Tensor(prefix + '.attn.in_proj_bias', tuple(p + ('bias',) for p in qkv),
             lambda x: tuple(b.reshape(heads, d) for b in np.split(x, 3)),
             lambda xs: np.concatenate([b.reshape(-1) for b in xs])),
      Tensor(prefix + '.attn.out_proj.weight', (path + ('attention', 'out', 'kernel'),),
             lambda x: (x.T.reshape(heads, d, width),), lambda xs: xs[0].reshape(width, width).T),
      _same(prefix + '.attn.out_proj.bias', path + ('attention', 'out', 'bias'))] +
          _norm(prefix + '.ln_2', path + ('norm2',)) + _linear(prefix + '.mlp.c_fc', path + (
              'mlp', 'fc1')) + _linear(prefix + '.mlp.c_proj', path + ('mlp', 'fc2')))


def tensors(image, text):
  """[Tensor] of a CLIP with towers `image` (vit.ViT) and `text` (text.TextTransformer), in
  open_clip's state-dict order."""
  p, w = image.patch, image.width
  out = [_same('logit_scale', ('logit', 'log_scale'))]  # open_clip saves it after the text
  out += [_same('visual.class_embedding', ('tower_a', 'cls'), 2),
          _same('visual.positional_embedding', ('tower_a', 'pos_embedding'), 1),
          _same('visual.proj', ('proj_a', 'kernel')),
          Tensor('visual.conv1.weight', (('tower_a', 'embedding', 'kernel'),),
                 lambda x: (x.transpose(2, 3, 1, 0).reshape(p * p * x.shape[1], w),),
                 lambda xs: xs[0].reshape(p, p, -1, w).transpose(3, 2, 0, 1))]
  out += _norm('visual.ln_pre', ('tower_a', 'pre_norm'))
  for i in range(image.depth):
    out += _block(f'visual.transformer.resblocks.{i}', ('tower_a', 'encoder', f'block{i}'), w,
                  image.heads)
  out += _norm('visual.ln_post', ('tower_a', 'encoder', 'encoder_norm'))
  out += [_same('positional_embedding', ('tower_b', 'pos_embedding'), 1),
          _same('text_projection', ('proj_b', 'kernel')),
          _same('token_embedding.weight', ('tower_b', 'token_embedding', 'embedding'))]
  for i in range(text.depth):
    out += _block(f'transformer.resblocks.{i}', ('tower_b', 'encoder', f'block{i}'), text.width,
                  text.heads)
  out += _norm('ln_final', ('tower_b', 'encoder', 'encoder_norm'))
  return out


ZERO = (('tower_a', 'embedding', 'bias'),)  # our parameters without a counterpart: must be 0
IDENTITY = ()
