"""Writes the big_vision SigLIP parity fixtures under tests/data/ (run once; CI reads them).

For tiny mirrors of the released SigLIP B/16, L/16 and So400m/14 (big_vision's own
`two_towers.Model`: ViT + MAP head, no image projection; text transformer, 'last' pooling,
`head` Dense; learned `t`, `b`) with every parameter redrawn at random (kernels
N/sqrt(fan_in), LayerNorm scales 1+0.1N, biases 0.1N, token embeddings and probe 0.5N,
posembs 0.3N, rounded to 5 significant bits so that the files compress; t = log 10,
b = -10 + 0.1N), it writes
  big_vision_<name>.npz     the params as released SigLIP checkpoints store them: flat keys
                            'params/img/...', 'params/txt/...', 'params/t', 'params/b',
                            non-scanned 'encoderblock_<i>', float32 (save_checkpoint with
                            compressed=True); checked by loading it with two_towers.load.
  big_vision_<name>_io.npz  images_uint8_<i> (HxW 45x61, 24x40, 32x32); pixels [3,32,32,3]
                            (`resize(32)|value_range(-1, 1)`: TF's bilinear kernel redone in
                            NumPy, see tf_resize_bilinear); tokens [4,16] int32 (c4_en layout,
                            eos='sticky', pad_value=1, random piece ids in [3, 255]); zimg
                            [3,32], ztxt [4,32] (L2-normalized, as the model returns them);
                            t (= exp(params/t)), b, logits = zimg @ ztxt.T * t + b; config (JSON).
Tiny sizes: image 32, width 32, depth 2, mlp_dim 128, 2 heads, posemb 'learn', patch 8 for
B/16 and 4 for L/16 and So400m/14 (14 does not divide 32); text vocab 256, context 16, same
width/depth/mlp/heads; out_dim (None, 32) as in the SigLIP demo colab.

big_vision is imported from a checkout, never copied into this repository:
  git clone https://github.com/google-research/big_vision /tmp/big_vision
  python benchmarks/make_big_vision_fixtures.py --big_vision /tmp/big_vision --out tests/data
It needs jax, flax, ml_collections, einops, scipy and absl, not tensorflow: big_vision/utils.py
imports `tensorflow.io.gfile`, so empty stub modules `tensorflow`, `tensorflow.io` and
`tensorflow.io.gfile` go into sys.modules (after flax.training.checkpoints is imported, as
flax.io probes for tensorflow); all paths are local, so the stub is never called.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import types

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import flax
import flax.training.checkpoints  # noqa: F401  (before the tensorflow stub, see docstring)
import jax
import ml_collections
import numpy as np

SEED = 0
IMAGE_SIZE = 32
IMAGE_SHAPES = ((45, 61), (24, 40), (32, 32))  # (height, width): down, mixed, identity
CONTEXT = 16
PIECE_COUNTS = (1, 6, 15, 25)  # + EOS: short, short, exactly full, truncated (sticky EOS)
EOS = PAD = 1  # c4_en SentencePiece: 0 <pad>, 1 </s>, 2 <unk>; SigLIP pads with pad_value=1
VOCAB = 256
WIDTH = 32
TOWER = dict(variant=None, width=WIDTH, depth=2, mlp_dim=128, num_heads=2, scan=False)
ARCHS = (('siglip_b16', 'B/16', 8), ('siglip_l16', 'L/16', 4),
         ('siglip_so400m14', 'So400m/14', 4))  # (fixture name, mirrored model, patch)
# (offset, stddev) of the random non-kernel parameters, by leaf name.
NOISE = {'scale': (1.0, 0.1), 'bias': (0.0, 0.1), 'embedding': (0.0, 0.5),
         'pos_embedding': (0.0, 0.3), 'probe': (0.0, 0.5)}
SIG_BITS = 5  # significant bits kept in each random parameter value


def import_big_vision(path):
  """Imports big_vision's SigLIP modules from `path`, with tensorflow.io.gfile stubbed."""
  tf, tf_io, gfile = (types.ModuleType(n) for n in
                      ('tensorflow', 'tensorflow.io', 'tensorflow.io.gfile'))
  tf.io, tf_io.gfile = tf_io, gfile
  for module in (tf, tf_io, gfile):
    sys.modules.setdefault(module.__name__, module)
  sys.path.insert(0, os.path.abspath(path))
  # pylint: disable=import-outside-toplevel
  from big_vision import utils
  from big_vision.models.proj.image_text import two_towers
  return utils, two_towers


def model_config(patch):
  return dict(
      image_model='vit', text_model='proj.image_text.text_transformer',
      image=dict(TOWER, patch_size=(patch, patch), pool_type='map', posemb='learn'),
      text=dict(TOWER, vocab_size=VOCAB, pool_type='last'),
      out_dim=(None, WIDTH), temperature_init=10.0, bias_init=-10.0)


def draw(name, shape, rng):
  """A random value of a sensible scale for the parameter called `name`."""
  leaf, normal = name.rsplit('/', 1)[-1], rng.standard_normal(shape)
  if name in ('t', 'b'):
    return np.float32(np.log(10.0) if name == 't' else -10.0 + 0.1 * normal).reshape(shape)
  if leaf == 'kernel':
    qkv = re.search(r'/(query|key|value)/kernel$', name)
    x = normal / np.sqrt(shape[0] if qkv else np.prod(shape[:-1]))
  else:
    offset, stddev = NOISE[leaf]
    x = offset + stddev * normal
  mantissa, exponent = np.frexp(x)  # Keep SIG_BITS significant bits: compresses well.
  return np.ldexp(np.round(mantissa * 2**SIG_BITS) / 2**SIG_BITS, exponent).astype(np.float32)


def randomize(params, utils, rng):
  names_and_vals, treedef = utils.tree_flatten_with_names(params)
  return treedef.unflatten([draw(k, np.shape(v), rng) for k, v in names_and_vals])


def save_checkpoint(params, utils, path):
  """big_vision's save_checkpoint({'params': ...}, compressed=True), minus gfile."""
  names_and_vals, _ = utils.tree_flatten_with_names({'params': params})
  np.savez_compressed(path, **{k: np.asarray(v) for k, v in names_and_vals})


def tf_resize_bilinear(image, size):
  """tf.image.resize(image, [size, size], 'bilinear', antialias=False) as TF's CPU kernel
  computes it: half-pixel centres, edge clamping, x lerp then y lerp, all in float32."""
  def axis(n_in):
    scale = np.float32(n_in) / np.float32(size)
    src = (np.arange(size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(src)
    lo = np.maximum(floor, 0).astype(int)
    hi = np.minimum(np.ceil(src), n_in - 1).astype(int)
    return lo, hi, (src - floor).astype(np.float32)
  x = image.astype(np.float32)
  (y0, y1, ly), (x0, x1, lx) = axis(x.shape[0]), axis(x.shape[1])
  lx, ly = lx[None, :, None], ly[:, None, None]
  top = x[y0][:, x0] + (x[y0][:, x1] - x[y0][:, x0]) * lx
  bottom = x[y1][:, x0] + (x[y1][:, x1] - x[y1][:, x0]) * lx
  return top + (bottom - top) * ly


def preprocess(image):
  """big_vision `resize(32)|value_range(-1, 1)` on a uint8 HxWx3 image."""
  resized = tf_resize_bilinear(image, IMAGE_SIZE)
  ref = jax.image.resize(image.astype(np.float32), resized.shape, 'linear', antialias=False)
  assert np.abs(np.asarray(ref) - resized).max() < 1e-3
  resized = np.clip(resized, 0, 255).astype(np.uint8)  # tf.cast truncates toward zero
  x = resized.astype(np.float32) / np.float32(255.0)
  return np.float32(-1) + x * np.float32(2)


def make_images(rng):
  images = []
  for h, w in IMAGE_SHAPES:
    yy, xx = np.mgrid[:h, :w]
    smooth = 128 + 100 * np.sin(yy[..., None] / 5.0 + xx[..., None] / 7.0 + np.arange(3))
    images.append(np.clip(smooth + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8))
  return images


def make_tokens(rng):
  """ops_text.tokenize(max_len=16, eos='sticky', pad_value=1) on random SentencePiece ids."""
  rows = []
  for n in PIECE_COUNTS:
    toks = list(rng.integers(3, VOCAB, n)) + [EOS]
    if len(toks) >= CONTEXT:
      toks = toks[:CONTEXT - 1] + toks[-1:]
    rows.append(toks + [PAD] * (CONTEXT - len(toks)))
  return np.asarray(rows, np.int32)


def big_vision_commit(path):
  try:
    return subprocess.check_output(['git', '-C', path, 'rev-parse', 'HEAD'], text=True).strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def run(model, params, pixels, tokens):
  zimg, ztxt, out = model.apply({'params': params}, pixels, tokens)
  return tuple(np.asarray(a) for a in (zimg, ztxt, out['t'], out['b']))


def fixture_config(variant, cfg, big_vision):
  return dict(
      mirrors=f'SigLIP {variant}', model=cfg, image_size=IMAGE_SIZE, seed=SEED,
      checkpoint_layout="flat '/'-joined keys under 'params/', non-scanned encoderblock_<i>",
      pp_image=f'resize({IMAGE_SIZE})|value_range(-1, 1): tf.image.resize bilinear, '
               'antialias=False, half-pixel centres, float32, cast to uint8 by truncation',
      pp_text=f"tokenize(max_len={CONTEXT}, model='c4_en', eos='sticky', pad_value=1)",
      eos_id=EOS, pad_id=PAD, piece_counts=PIECE_COUNTS, image_shapes=IMAGE_SHAPES,
      param_init=dict(kernel='N/sqrt(fan_in)', offset_stddev=NOISE, t='log(10)',
                      b='-10+0.1N', significant_bits=SIG_BITS),
      logits='zimg @ ztxt.T * t + b, t = exp(params/t)',
      versions=dict(jax=jax.__version__, flax=flax.__version__, numpy=np.__version__,
                    big_vision=big_vision_commit(big_vision)))


def make_fixture(index, name, variant, patch, args, utils, two_towers):
  rng = np.random.default_rng([SEED, index])
  cfg = model_config(patch)
  model = two_towers.Model(**cfg)
  images = make_images(rng)
  pixels = np.stack([preprocess(im) for im in images])
  tokens = make_tokens(rng)
  init = jax.jit(model.init)(jax.random.PRNGKey(SEED), pixels, tokens)['params']
  params = randomize(flax.core.unfreeze(init), utils, rng)
  zimg, ztxt, t, b = outputs = run(model, params, pixels, tokens)

  ckpt = os.path.abspath(os.path.join(args.out, f'big_vision_{name}.npz'))
  save_checkpoint(params, utils, ckpt)
  # Round trip through big_vision's own loaders (two_towers/vit/text_transformer.load).
  loaded = two_towers.load(init, ckpt, ml_collections.ConfigDict(cfg))
  for got, want in zip(run(model, loaded, pixels, tokens), outputs):
    np.testing.assert_array_equal(got, want)

  io = {f'images_uint8_{i}': im for i, im in enumerate(images)}
  io.update(pixels=pixels, tokens=tokens, zimg=zimg, ztxt=ztxt, t=t, b=b,
            logits=zimg @ ztxt.T * t + b,
            config=np.asarray(json.dumps(fixture_config(variant, cfg, args.big_vision))))
  np.savez_compressed(os.path.join(args.out, f'big_vision_{name}_io.npz'), **io)
  print(name, 'zimg', zimg.shape, 'ztxt', ztxt.shape, 't', t, 'b', b)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--big_vision', required=True, help='path to a big_vision checkout')
  parser.add_argument('--out', default='tests/data')
  args = parser.parse_args()
  utils, two_towers = import_big_vision(args.big_vision)
  os.makedirs(args.out, exist_ok=True)
  for index, (name, variant, patch) in enumerate(ARCHS):
    make_fixture(index, name, variant, patch, args, utils, two_towers)


if __name__ == '__main__':
  main()
