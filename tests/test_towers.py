"""The two-tower models: ViT and text tower shapes, the logit parameters' init and gradients
through the pair losses, preset sizes, and config errors. Float64 comparisons (padding
invariance) are in tests/test_towers_float64.py.

Parameters are drawn in NumPy with the shapes of `jax.eval_shape(model.init)`: a compiled
init costs seconds per model on 2 cores, and these tests only need some parameters.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from contrastive import losses
from contrastive import models
from contrastive.models import two_tower

TINY_VIT = dict(patch=4, width=16, depth=1, heads=2, mlp_dim=32)
TINY_TEXT = dict(vocab_size=20, context=8, width=16, depth=1, heads=2, mlp_dim=32)


def random_params(model, *inputs, seed=0, scale=0.3):
  """Variables of `model` for `inputs`, N(0, scale^2) from NumPy (no compiled init)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def images(n=3, size=8, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


TOKENS = np.array([[5, 7, 9, 2, 0, 0], [3, 0, 0, 0, 0, 0], [4, 4, 6, 8, 1, 11]], np.int32)


@pytest.mark.parametrize('pool,posemb', [('gap', 'learn'), ('cls', 'learn'), ('map', 'learn'),
                                         ('gap', 'sincos2d')])
def test_vit_shapes(pool, posemb):
  model = models.ViT(**TINY_VIT, pool=pool, posemb=posemb)
  x = images()
  variables = random_params(model, x)
  assert ('pos_embedding' in variables['params']) == (posemb == 'learn')
  assert ('cls' in variables['params']) == (pool == 'cls')
  out = jax.jit(model.apply)(variables, x)
  assert out.shape == (3, 16) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))


@pytest.mark.parametrize('pool', ['eos', 'mean', 'map'])
def test_text_shapes(pool):
  model = models.TextTransformer(**TINY_TEXT, pool=pool)
  variables = random_params(model, TOKENS)
  out = jax.jit(model.apply)(variables, TOKENS)
  assert out.shape == (3, 16) and np.all(np.isfinite(out))


def test_text_bag_of_pieces():
  """depth 0, no positions, mean pooling: mean over the non-pad tokens of LayerNorm(E[token])
  (a NumPy re-derivation), the same for any order of a row's tokens."""
  model = models.TextTransformer(**dict(TINY_TEXT, depth=0), pool='mean', positions=False)
  variables = random_params(model, TOKENS)
  assert 'pos_embedding' not in variables['params']
  out = np.asarray(jax.jit(model.apply)(variables, TOKENS))
  table = np.asarray(variables['params']['token_embedding']['embedding'], np.float64)
  norm = variables['params']['encoder']['encoder_norm']
  for row, tokens in zip(out, TOKENS):
    x = table[tokens[:np.argmin(np.append(tokens, 0) != 0)]]  # the tokens before the first 0
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    expect = (x * np.asarray(norm['scale']) + np.asarray(norm['bias'])).mean(0)
    np.testing.assert_allclose(row, expect, rtol=1e-4, atol=1e-5)
  shuffled = TOKENS.copy()
  shuffled[2, :6] = shuffled[2, [3, 5, 0, 1, 4, 2]]
  np.testing.assert_allclose(jax.jit(model.apply)(variables, shuffled)[2], out[2], atol=1e-5)
  with_positions = models.TextTransformer(**dict(TINY_TEXT, depth=0), pool='mean')
  variables = random_params(with_positions, TOKENS)
  a, b = (np.asarray(jax.jit(with_positions.apply)(variables, t))[2] for t in (TOKENS, shuffled))
  assert np.abs(a - b).max() > 1e-2  # positions make the order count


def test_vit_depends_on_the_image():
  """Rows are independent (permuting the batch permutes the features), different images
  give different features, and moving patches around changes them (position embeddings)."""
  model = models.ViT(**TINY_VIT, pool='gap')
  x = images(n=4)
  variables = random_params(model, x)
  apply = jax.jit(model.apply)
  out = apply(variables, x)
  perm = np.array([2, 0, 3, 1])
  np.testing.assert_allclose(apply(variables, x[perm]), out[perm], rtol=1e-5, atol=1e-6)
  assert np.min(np.abs(out[0] - out[1])) > 0
  swapped = x.copy()
  swapped[:, :4], swapped[:, 4:] = x[:, 4:], x[:, :4]  # swap the top and bottom patch rows
  assert np.max(np.abs(apply(variables, swapped) - out)) > 1e-3


def test_vit_rejects_bad_sizes():
  with pytest.raises(ValueError, match=r'divisible by the patch size 4.*\(3, 10, 8, 3\)'):
    models.ViT(**TINY_VIT).init(jax.random.key(0), np.zeros((3, 10, 8, 3), np.uint8))
  with pytest.raises(ValueError, match=r'L <= context=8, got shape \(3, 9\)'):
    models.TextTransformer(**TINY_TEXT).init(jax.random.key(0), np.ones((3, 9), np.int32))


def test_logit_params_init():
  clip = models.LogitParams('clip').init(jax.random.key(0))['params']
  np.testing.assert_allclose(np.exp(clip['log_scale']), 1 / 0.07, rtol=1e-6)
  assert set(clip) == {'log_scale'}
  siglip = models.LogitParams('siglip').init(jax.random.key(0))['params']
  np.testing.assert_allclose(siglip['log_scale'], math.log(10), rtol=1e-6)
  assert siglip['bias'] == -10.0
  out = models.LogitParams('siglip').apply({'params': siglip})
  np.testing.assert_allclose(out['temperature'], 0.1, rtol=1e-6)
  # CLIP's scale is clipped at 100: temperature >= 0.01 whatever log_scale is.
  big = models.LogitParams('clip').apply({'params': {'log_scale': jnp.float32(7.0)}})
  np.testing.assert_allclose(big['temperature'], 0.01, rtol=1e-6)


def tiny_two_tower(loss_params, **kw):
  return models.build_two_tower(ml_collections.ConfigDict(dict(
      image=dict(name='vit', pool='gap', **TINY_VIT), text=dict(name='text', **TINY_TEXT),
      embed_dim=8, loss_params=loss_params, **kw)))


@pytest.mark.parametrize('loss_params,loss_fn', [('clip', losses.clip_loss),
                                                 ('siglip', losses.sigmoid_loss)])
def test_logit_params_get_gradients(loss_params, loss_fn):
  """The model's loss keyword arguments are traced parameters: the pair loss's gradient
  reaches each of them, from their published init."""
  model = tiny_two_tower(loss_params)
  variables = random_params(model, images(), TOKENS)
  params = dict(variables['params'], logit=models.LogitParams(loss_params).init(
      jax.random.key(0))['params'])
  za, zb = np.random.default_rng(1).standard_normal((2, 4, 8)).astype(np.float32)

  def loss(p):
    return loss_fn(za, zb, **model.apply({'params': p}, method='logit_params'))[0]

  grads = jax.jit(jax.grad(loss))(params)['logit']
  assert set(grads) == ({'log_scale'} if loss_params == 'clip' else {'log_scale', 'bias'})
  for name, g in grads.items():
    assert abs(float(g)) > 1e-6, name


def test_two_tower_gradients():
  """clip_loss on the model's outputs: every parameter group gets a gradient."""
  model = tiny_two_tower('clip')
  x = images()
  params = random_params(model, x, TOKENS)['params']

  def loss(p):
    za, zb, logit = model.apply({'params': p}, x, TOKENS)
    return losses.clip_loss(za, zb, **logit)[0]

  grads = jax.jit(jax.grad(loss))(params)
  for group in ('tower_a', 'tower_b', 'proj_a', 'proj_b', 'logit'):
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads[group])) > 0, group


def test_encode_methods_match_call():
  model = tiny_two_tower('clip')
  x = images()
  variables = random_params(model, x, TOKENS)

  @jax.jit
  def outputs(v):
    return (model.apply(v, x, TOKENS), model.apply(v, x, method='encode_image'),
            model.apply(v, TOKENS, method='encode_text'),
            model.apply(v, TOKENS, method='encode_text', normalize=True))

  (za, zb, logit), image_z, text_z, unit = outputs(variables)
  np.testing.assert_allclose(image_z, za, rtol=1e-6)
  np.testing.assert_allclose(text_z, zb, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
  assert set(logit) == {'temperature'}


def test_shared_text_towers():
  """share=True: one text tower and projection for both sides (text-text pairs)."""
  model = models.build_two_tower(ml_collections.ConfigDict(dict(
      a=dict(name='text', **TINY_TEXT), share=True, embed_dim=8, loss_params='siglip')))
  variables = random_params(model, TOKENS, TOKENS)
  assert set(variables['params']) == {'tower_a', 'proj_a', 'logit'}
  za, zb, _ = jax.jit(model.apply)(variables, TOKENS, TOKENS)
  np.testing.assert_array_equal(za, zb)


def test_resnet_image_tower():
  """The existing ResNet as image tower (BatchNorm: batch_stats, mutable in training)."""
  model = models.build_two_tower(ml_collections.ConfigDict(dict(model=dict(
      image=dict(name='resnet', stage_sizes=[1], width=4), text=dict(name='text', **TINY_TEXT),
      embed_dim=8))))
  x = images()
  variables = jax.eval_shape(model.init, jax.random.key(0), x, TOKENS)
  assert 'batch_stats' in variables
  (za, zb, _), updates = jax.eval_shape(
      lambda v: model.apply(v, x, TOKENS, train=True, mutable=['batch_stats']), variables)
  assert za.shape == zb.shape == (3, 8) and 'batch_stats' in updates


def blocks(width, depth, mlp):
  """Parameters of `depth` pre-LN blocks and the final LayerNorm (q, k, v, out with biases)."""
  attention = 4 * width * width + 4 * width
  mlp_params = 2 * width * mlp + mlp + width
  return depth * (attention + mlp_params + 4 * width) + 2 * width


def test_preset_param_counts():
  """Presets against the closed-form counts, by jax.eval_shape (ViT-B is never built)."""
  def n_params(model, x):
    return count(jax.eval_shape(model.init, jax.random.key(0), x)['params'])
  w, mlp = 128, 512
  map_head = w + (4 * w * w + 4 * w) + 2 * w + (2 * w * mlp + mlp + w)
  small_gap = 4 * 4 * 3 * w + w + 64 * w + blocks(w, 4, mlp)  # 32x32: 64 patches
  assert n_params(models.ViT(**models.VIT_SMALL, pool='gap'), images(1, 32)) == small_gap == 807_808
  assert n_params(models.ViT(**models.VIT_SMALL, pool='map'), images(1, 32)) == 1_005_952
  assert small_gap + map_head == 1_005_952
  text_small = models.TextTransformer(**models.TEXT_SMALL, vocab_size=256, context=24)
  assert n_params(text_small, np.ones((1, 24), np.int32)) == 256 * w + 24 * w + blocks(w, 2, mlp)
  assert n_params(text_small, np.ones((1, 24), np.int32)) == 432_640
  vit_b = models.ViT(**models.VIT_B16, pool='map')
  assert n_params(vit_b, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.uint8)) == 92_884_224
  text_b = models.TextTransformer(**models.TEXT_B, vocab_size=32_000, context=64)
  assert n_params(text_b, jax.ShapeDtypeStruct((1, 64), jnp.int32)) == 109_681_152
  assert 32_000 * 768 + 64 * 768 + blocks(768, 12, 3072) == 109_681_152


def test_config_errors():
  cfg = dict(image=dict(name='vitt'), text=dict(name='text'), embed_dim=8)
  with pytest.raises(ValueError, match=r"unknown tower name 'vitt'; choose one of \('vit', "
                                       r"'resnet', 'text'\)"):
    models.build_two_tower(ml_collections.ConfigDict(cfg))
  cfg['image'] = dict(name='vit', preset='L/14')
  with pytest.raises(ValueError, match=r"unknown vit preset 'L/14'; choose one of"):
    models.build_two_tower(ml_collections.ConfigDict(cfg))
  cfg['image'] = dict(name='vit', patch_size=4)
  with pytest.raises(ValueError, match=r"unknown vit tower fields \['patch_size'\]"):
    models.build_two_tower(ml_collections.ConfigDict(cfg))
  cfg['image'] = dict(name='vit')
  with pytest.raises(ValueError, match=r"loss_params must be one of \('clip', 'siglip', 'amcl'\)"):
    models.build_two_tower(ml_collections.ConfigDict(dict(cfg, loss_params='info_nce')))
  assert two_tower.TOWERS == ('vit', 'resnet', 'text')
