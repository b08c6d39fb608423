"""big_vision's SigLIP checkpoints (`.npz`) <-> the two-tower parameters.

A big_vision checkpoint is a flat `.npz` whose keys are the parameter tree's paths joined by
'/', under 'params/' ('params/img/Transformer/encoderblock_0/LayerNorm_0/scale'). Its modules
are flax's, as ours are, so the tensors copy as they are except:

  img/embedding/kernel [p, p, 3, W] (a stride-p conv)  tower_a/embedding/kernel [p p 3, W]
  t [1], b [1]                                          logit/log_scale [], logit/bias []
  (no img/head: the MAP head's output is the embedding)  proj_a: the identity, bias 0

and the names: Transformer / Encoder_0 -> encoder, encoderblock_i -> block{i}, LayerNorm_0/1 ->
norm1/2, MultiHeadDotProductAttention_0 -> attention, MlpBlock_0/Dense_0/1 -> mlp/fc1/2,
MAPHead_0 -> map_head (its LayerNorm_0 -> norm), Embed_0 -> token_embedding, txt/head ->
proj_b. Scanned checkpoints (SigLIP 2: 'encoderblock/...' with the depth as leading axis) are
unstacked; bfloat16 leaves stored as 2-byte voids are widened to float32.

Architectures (`ARCHS`): SigLIP B/16, L/16 and So400m/14 (Zhai et al. 2023), and SigLIP 2
B/16 (Tschannen et al. 2025: the same towers, Gemma's 256k vocabulary, texts padded with 0),
as the presets 'big_vision/...' of models/vit.py and models/text.py.
"""

import io
import re

import numpy as np

from contrastive.weights import open_clip_format

Tensor = open_clip_format.Tensor
NAME = 'big_vision'
LOSS = 'sigmoid_loss'
TOKENIZER = 'big_vision_spm'
BUFFERS = ()
# big_vision's SigLIP eval preprocessing: resize(S) (tf.image.resize: bilinear, no
# antialiasing, the whole image to S x S), truncated to uint8; value_range(-1, 1) is the
# image tower's pixel_mean / pixel_std.
PREPROCESS = dict(resize='squash', interpolation='bilinear', antialias=False, rounding='floor')
# arch -> (image preset, text preset, image size, text context, tokenizer pad id, vocab)
ARCHS = {'siglip-B/16': ('B/16', 'B', 224, 64, 1, 32_000),
         'siglip-L/16': ('L/16', 'L', 256, 64, 1, 32_000),
         'siglip-So400m/14': ('So400m/14', 'So400m', 224, 16, 1, 32_000),
         'siglip2-B/16': ('B/16', 'B', 224, 64, 0, 256_000)}
ZERO = (('proj_a', 'bias'),)
IDENTITY = (('proj_a', 'kernel'),)


def _arch(arch):
  if arch not in ARCHS:
    raise ValueError(f'unknown big_vision architecture {arch!r}; choose one of {list(ARCHS)}.')
  return ARCHS[arch]


def model_config(arch, overrides=None):
  """The two-tower `config.model` of a SigLIP architecture; `overrides` as open_clip's."""
  image, text, _, _, _, _ = _arch(arch)
  overrides = dict(overrides or {})
  width = dict(B=768, L=1024, So400m=1152)[text]
  image_cfg = dict(name='vit', preset=f'big_vision/{image}', **overrides.pop('image', {}))
  return dict(image=image_cfg,
              text=dict(name='text', preset=f'big_vision/{text}', **overrides.pop('text', {})),
              embed_dim=overrides.pop('embed_dim', width), loss_params='siglip',
              proj_bias=True, **overrides)


def image_size(arch):
  return _arch(arch)[2]


def tokenizer_config(arch):
  """config.tokenizer of the architecture's texts (SigLIP: padded with its EOS, 1; SigLIP 2:
  with 0), lowercased as big_vision's SigLIP preprocessing does."""
  context, pad_id, _ = _arch(arch)[3:]
  return dict(kind=TOKENIZER, context=context, pad_id=pad_id, lower=True)


def _copy(key, path, lead=0):
  return Tensor(key, (path,), lambda x: (x.reshape(x.shape[lead:]),),
                lambda xs: xs[0].reshape((1,) * lead + xs[0].shape))


def _module(prefix, path, kind):
  """The tensors of a flax LayerNorm ('norm'), Dense ('dense') or attention ('attention')."""
  if kind == 'norm':
    return [_copy(f'{prefix}/scale', path + ('scale',)), _copy(f'{prefix}/bias', path + ('bias',))]
  if kind == 'dense':
    return [_copy(f'{prefix}/kernel', path + ('kernel',)),
            _copy(f'{prefix}/bias', path + ('bias',))]
  return [t for n in ('query', 'key', 'value', 'out')
          for t in _module(f'{prefix}/{n}', path + (n,), 'dense')]


def _mlp(prefix, path):
  return (_module(f'{prefix}/MlpBlock_0/Dense_0', path + ('mlp', 'fc1'), 'dense') +
          _module(f'{prefix}/MlpBlock_0/Dense_1', path + ('mlp', 'fc2'), 'dense'))


def _encoder(prefix, path, depth):
  out = []
  for i in range(depth):
    p, q = f'{prefix}/encoderblock_{i}', path + (f'block{i}',)
    out += (_module(f'{p}/LayerNorm_0', q + ('norm1',), 'norm') +
            _module(f'{p}/MultiHeadDotProductAttention_0', q + ('attention',), 'attention') +
            _module(f'{p}/LayerNorm_1', q + ('norm2',), 'norm') + _mlp(p, q))
  return out + _module(f'{prefix}/encoder_norm', path + ('encoder_norm',), 'norm')


def tensors(image, text):
  """[Tensor] of a SigLIP with towers `image` (vit.ViT, MAP pooling) and `text`."""
  p, w = image.patch, image.width
  a, b = ('tower_a',), ('tower_b',)
  out = [_copy('t', ('logit', 'log_scale'), 1), _copy('b', ('logit', 'bias'), 1),
         Tensor('img/embedding/kernel', (a + ('embedding', 'kernel'),),
                lambda x: (x.reshape(p * p * x.shape[2], w),),
                lambda xs: xs[0].reshape(p, p, -1, w)),
         _copy('img/embedding/bias', a + ('embedding', 'bias')),
         _copy('img/pos_embedding', a + ('pos_embedding',))]
  out += _encoder('img/Transformer', a + ('encoder',), image.depth)
  m, mh = 'img/MAPHead_0', a + ('map_head',)
  out += ([_copy(f'{m}/probe', mh + ('probe',))] +
          _module(f'{m}/MultiHeadDotProductAttention_0', mh + ('attention',), 'attention') +
          _module(f'{m}/LayerNorm_0', mh + ('norm',), 'norm') + _mlp(m, mh))
  out += [_copy('txt/Embed_0/embedding', b + ('token_embedding', 'embedding')),
          _copy('txt/pos_embedding', b + ('pos_embedding',))]
  out += _encoder('txt/Encoder_0', b + ('encoder',), text.depth)
  return out + _module('txt/head', ('proj_b',), 'dense')


def _float32(x):
  """bfloat16 leaves saved as 2-byte voids ('|V2') -> float32; others as float32."""
  x = np.asarray(x)
  if x.dtype.kind == 'V' and x.dtype.itemsize == 2:
    return (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
  return x.astype(np.float32)


def normalize_state(state):
  """A big_vision checkpoint's {key: array} with 'params/' dropped, scanned blocks unstacked
  ('.../encoderblock/x' [depth, ...] -> '.../encoderblock_{i}/x') and float32 leaves."""
  out = {}
  for key, value in state.items():
    key = key[len('params/'):] if key.startswith('params/') else key
    value = _float32(value)
    if re.search(r'/encoderblock/', key):
      for i, part in enumerate(value):
        out[key.replace('/encoderblock/', f'/encoderblock_{i}/')] = part
    else:
      out[key] = value
  return out


def write(state, path):
  """Writes a state dict as a big_vision checkpoint (.npz, keys under 'params/')."""
  buffer = io.BytesIO()
  np.savez(buffer, **{f'params/{k}': v for k, v in state.items()})
  with open(path, 'wb') as f:
    f.write(buffer.getvalue())
