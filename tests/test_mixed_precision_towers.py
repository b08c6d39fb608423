"""Mixed precision (`dtype=bfloat16`, models/compute.py): outputs in bfloat16, parameters and
gradients in float32, values and gradients within a derived bound of the float32 model's.

The bound. bfloat16 keeps 8 significand bits (7 stored and the implicit one), so one
round-to-nearest has relative error |d| <= u = 2^-8 (float32: 2^-24). A layer y = f(x W) in
bfloat16 rounds its input x, its weights W and its output; with float32 accumulation (XLA's
bfloat16 dots; `conv.kernel_grad` asks for it) the sums add nothing comparable. With
normalised layers (LayerNorm / BatchNorm over inputs whose spread is not tiny against their
mean) every layer's relative condition number is O(1), so over D such layers in sequence:

  worst case (errors aligned):   ||y_bf16 - y_f32|| / ||y_f32||  <=  ~2 D u;
  probabilistic (Higham & Mary 2019, "A new approach to probabilistic rounding error
  analysis", SIAM J. Sci. Comput.: roundings independent, mean zero, each of standard
  deviation <= u / sqrt(3), three per layer): the error has standard deviation <= sqrt(D) u,
  and a norm over many elements concentrates at it. The tests assert

    outputs (h, z, za, zb):   err <= 2 sqrt(D) u
    gradients:                err <= 2 sqrt(2 D) u      (the backward pass retraces the layers)

D = matmuls / convolutions on the longest path (`depth` below).

ReLU's kink adds a term the first-order analysis above misses. A pre-activation within the
forward error e of zero may flip its mask; after a normalisation (roughly Gaussian, density
<= phi(0) = 0.4 per unit of spread) a fraction <= 0.8 e of them flips, and each flip changes its
gradient entry by O(the entry): a normwise gradient error sqrt(0.8 e) per ReLU layer,
independent across layers. With e = the output bound and R ReLU layers on the longest path:

    gradients of ReLU networks:   err <= 2 sqrt(2 D) u + sqrt(0.8 R e)

(it scales like sqrt(u), not u). XLA:CPU by default skips some bfloat16 roundings (excess
precision: a convert to bfloat16 and back folded away), so the errors measured here are
below those of an accelerator; with XLA_FLAGS=--xla_allow_excess_precision=false every
rounding happens. Measured (pytest -s prints them), default / faithful rounding: two-tower
outputs 1.0 / 1.3 u, gradients 1.5 / 1.5 u (bounds 7.5 u, 10.6 u); SimCLR ResNet outputs
1.0-3.4 / 3.2 u, gradients 2.9-4.9 / 11 u (bounds 5.3 u, 88 u with R = 6); SimCLR ViT outputs
0.6 / 0.8 u, gradients 1.3 / 1.2 u (bounds 6.6 u, 61 u with R = 2). Gradients are compared over
all leaves at once (a leaf whose exact gradient is zero, such as the attention key bias, has no
relative error of its own).

Counterexamples, each far outside its bound: token ids passed through the compute dtype (ids
above 256 are not bfloat16 numbers) and `conv.kernel_grad` accumulating in bfloat16.
"""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from contrastive import models
from contrastive.models import conv

U = 2.0**-8  # bfloat16's unit roundoff
BF16 = jnp.bfloat16
TINY_VIT = dict(patch=4, width=16, depth=1, heads=2, mlp_dim=32)
TINY_TEXT = dict(vocab_size=1000, context=8, width=16, depth=1, heads=2, mlp_dim=32)
# Rounding layers on the longest path: patch embedding + 6 per block (q/k/v, q k^T, w v, out,
# fc1, fc2) + 6 in the MAP head; token lookup + 6 per block; + 1 for a projection / Dense.
VIT_MAP_D = 1 + 6 * TINY_VIT['depth'] + 6
TEXT_EOS_D = 1 + 6 * TINY_TEXT['depth']
# Odd ids above 256 (none of them a bfloat16 number) for the counterexample.
TOKENS = np.array([[515, 701, 997, 259, 0, 0], [301, 0, 0, 0, 0, 0],
                   [413, 401, 611, 803, 777, 913], [301, 303, 305, 307, 309, 311]], np.int32)


def random_params(model, *inputs, **kw):
  """Variables of `model` for `inputs`, N(0, 0.3^2) from NumPy (no compiled init)."""
  shapes = jax.eval_shape(lambda key: model.init(key, *inputs, **kw), jax.random.key(0))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def images(n=4, size=8, seed=0):
  """uint8 images whose brightness differs between rows, so that batch statistics are well
  conditioned (rows of random pixels alone average to nearly the same features)."""
  rng = np.random.default_rng(seed)
  base = np.linspace(40, 200, n)[:, None, None, None]
  return np.clip(base + rng.integers(-40, 40, (n, size, size, 3)), 0, 255).astype(np.uint8)


def rel_error(actual, desired):
  """||actual - desired|| / ||desired|| over all leaves of two trees together, in float64."""
  a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(actual)])
  d = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(desired)])
  return np.linalg.norm(a - d) / np.linalg.norm(d)


def both_precisions(build, variables, train=False):
  """jit(inputs -> {dtype: (outputs, gradients)}) for the float32 and bfloat16 models of
  `build(dtype)`, on the same float32 variables. The loss is <outputs, fixed cotangents>, so
  the gradients are one vector-Jacobian product. `inputs` is one tuple per dtype, so that a
  counterexample can hand the bfloat16 model other inputs."""
  def loss(model, params, inputs):
    if train:
      outs, _ = model.apply({**variables, 'params': params}, *inputs, train=True,
                            mutable=['batch_stats'])
    else:
      outs = model.apply({**variables, 'params': params}, *inputs)
    outs = tuple(o for o in (outs if isinstance(outs, tuple) else (outs,))
                 if not isinstance(o, dict))  # the two-tower's logit kwargs are not outputs
    cts = [jax.random.normal(jax.random.key(i), o.shape) for i, o in enumerate(outs)]
    return sum(jnp.vdot(o.astype(jnp.float32), c) for o, c in zip(outs, cts)), outs

  @jax.jit
  def run(inputs32, inputs16):
    result = {}
    for dtype, inputs in (('float32', inputs32), ('bfloat16', inputs16)):
      (_, outs), grads = jax.value_and_grad(
          lambda p, m=build(dtype), x=inputs: loss(m, p, x), has_aux=True)(variables['params'])
      result[dtype] = (outs, grads)
    return result
  return run


def bounds(depth, relus=0):
  """(output bound, gradient bound) for `depth` rounding layers, `relus` of them followed by
  a ReLU (module docstring)."""
  out = 2 * np.sqrt(depth) * U
  return out, 2 * np.sqrt(2 * depth) * U + np.sqrt(0.8 * relus * out)


def check(result, depth, name, relus=0):
  """bfloat16 outputs, float32 gradients, both within the bounds for `depth` layers and
  `relus` ReLU layers; returns (output error, gradient error) in units of u."""
  (outs32, grads32), (outs16, grads16) = result['float32'], result['bfloat16']
  assert all(o.dtype == BF16 for o in outs16), [o.dtype for o in outs16]
  assert all(o.dtype == jnp.float32 for o in outs32)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
  out_err, grad_err = rel_error(outs16, outs32), rel_error(grads16, grads32)
  out_bound, grad_bound = bounds(depth, relus)
  print(f'{name}: outputs {out_err / U:.2f} u (bound {out_bound / U:.2f} u), gradients '
        f'{grad_err / U:.2f} u (bound {grad_bound / U:.2f} u)')
  assert out_err <= out_bound, (name, out_err / U)
  assert grad_err <= grad_bound, (name, grad_err / U)
  return out_err / U, grad_err / U


def test_two_tower_vit_and_text():
  """ViT (MAP pooling) and text towers with their projections: za, zb in bfloat16, every
  gradient (towers, projections, logit parameters) float32; the parameters stay float32."""
  cfg = ml_collections.ConfigDict(dict(image=dict(name='vit', pool='map', **TINY_VIT),
                                       text=dict(name='text', **TINY_TEXT), embed_dim=8))
  build = lambda dtype: models.build_two_tower(cfg, dtype=dtype)
  x = images()
  variables = random_params(build(BF16), x, TOKENS)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  assert build(BF16).tower_a.dtype == build(BF16).tower_b.dtype == BF16
  run = both_precisions(build, variables)
  result = run((x, TOKENS), (x, TOKENS))
  check(result, max(VIT_MAP_D, TEXT_EOS_D) + 1, 'two-tower')
  for tower, depth in (('tower_a', VIT_MAP_D + 1), ('tower_b', TEXT_EOS_D + 1)):
    grads = [result[d][1][tower] for d in ('float32', 'bfloat16')]  # each tower's own
    assert rel_error(grads[1], grads[0]) <= bounds(depth)[1], tower
  # Counterexample: token ids through the compute dtype. Odd ids above 256 round to multiples
  # of 2 or 4 (515 -> 516, 997 -> 996): other tokens' embeddings, an O(1) error.
  wrong = np.asarray(jnp.asarray(TOKENS).astype(BF16).astype(jnp.int32))
  assert np.all((wrong != TOKENS) == (TOKENS != 0))
  bad = run((x, TOKENS), (x, wrong))
  err = rel_error(bad['bfloat16'][0][1], result['float32'][0][1])  # zb: 58 u
  print(f'two-tower, ids through bfloat16: zb {err / U:.1f} u')
  assert err > 8 * bounds(TEXT_EOS_D + 1)[0], err / U


@pytest.mark.parametrize('matmul_grads', [pytest.param(True, marks=pytest.mark.slow), False])
def test_simclr_resnet(matmul_grads, monkeypatch):
  """ContrastiveModel: ResNet (basic blocks, a 1x1 stride-2 projection shortcut) and a
  BatchNorm head, with `conv.Conv`'s matmul kernel gradients on and off. BatchNorm running
  averages stay float32; the 3x3 kernels' matmul gradients reach the float32 parameters
  without a bfloat16 rounding (float32 accumulation)."""
  if not matmul_grads:  # matmul_grads=None follows jax.default_backend(): pretend a GPU
    monkeypatch.setattr(conv, 'jax', types.SimpleNamespace(default_backend=lambda: 'gpu'))
  cfg = ml_collections.ConfigDict(dict(stage_sizes=(1, 1), width=4, block='basic',
                                       head_hidden_dims=(16,), head_out_dim=8))
  build = lambda dtype: models.build_model(cfg, dtype=dtype)
  x = images()
  variables = random_params(build(BF16), x, train=True)
  model = build(BF16)
  _, state = jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=['batch_stats']),
                            variables)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state))
  result = both_precisions(build, variables, train=True)((x,), (x,))
  # stem + 2 convolutions per block; the head's hidden and output Dense: D = 1 + 2 * 2 + 2;
  # ReLUs after the stem, after each convolution of a block and in the head: R = 6.
  check(result, 7, f'simclr resnet matmul_grads={matmul_grads}', relus=6)
  if matmul_grads:  # (XLA's path may round through bfloat16, or fold the casts away)
    kernel = result['bfloat16'][1]['encoder']['stage1_block1']['conv1']['kernel']
    assert np.any(np.asarray(jnp.asarray(kernel).astype(BF16).astype(jnp.float32)) != kernel)


@pytest.mark.slow  # make test-all; CI keeps the suite under 10 min (the two-tower ViT bound runs in CI)
def test_simclr_vit_layer_norm_head():
  """ContrastiveModel with a ViT encoder, LayerNorm head and predictor (MoCo v3 shape): no
  batch statistics at all, bfloat16 h and z, float32 gradients."""
  cfg = ml_collections.ConfigDict(dict(encoder=dict(name='vit', pool='gap', **TINY_VIT),
                                       head_hidden_dims=(16,), head_out_dim=8,
                                       predictor_hidden_dims=(16,), head_norm='layer'))
  build = lambda dtype: models.build_model(cfg, dtype=dtype)
  x = images()
  variables = random_params(build(BF16), x, train=True)
  assert set(variables) == {'params'}
  assert 'ln1' in variables['params']['head'] and 'bn1' not in variables['params']['head']
  result = both_precisions(build, variables, train=True)((x,), (x,))
  # embedding + 6 per block (gap pooling), head and predictor: 2 Dense and 1 ReLU each.
  check(result, 1 + 6 * TINY_VIT['depth'] + 4, 'simclr vit', relus=2)


@pytest.mark.parametrize('norm', ['layer', 'none'])
def test_head_norm_has_no_batch_stats(norm):
  """head_norm 'layer' / 'none' with a ViT encoder: nothing in batch_stats, so the model needs
  no mutable collections; 'batch' keeps the parameter names bn1, hidden1 (no bias), out."""
  cfg = dict(encoder=dict(name='vit', pool='gap', **TINY_VIT), head_hidden_dims=(16,),
             head_out_dim=8, predictor_hidden_dims=(16,))
  x = images()
  shapes = lambda c: jax.eval_shape(lambda key: models.build_model(
      ml_collections.ConfigDict(c)).init(key, x, train=True), jax.random.key(0))
  assert set(shapes(dict(cfg, head_norm=norm))) == {'params'}
  batch = shapes(cfg)
  assert set(batch['params']['head']) == {'hidden1', 'bn1', 'out'}
  assert set(batch['params']['head']['hidden1']) == {'kernel'}
  assert set(batch['batch_stats']) == {'head', 'predictor'}
  with pytest.raises(ValueError, match=r"norm must be one of \('batch', 'layer', 'none'\)"):
    shapes(dict(cfg, head_norm='group'))


def test_kernel_grad_accumulates_in_float32():
  """kernel_grad of bfloat16 x and dy: products of bfloat16 numbers are exact in float32, so
  the only error is float32 accumulation, |error| <= n 2^-24 sum |terms| over n = N Ho Wo terms
  (here all positive: relative error <= n 2^-24). Counterexample: a bfloat16 accumulator
  (`accum_dtype=bfloat16`) stalls once the sum's spacing exceeds a term: O(1) error."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(0.5, 1.0, (256, 4, 4, 2)), BF16)
  dy = jnp.asarray(rng.uniform(0.5, 1.0, (256, 4, 4, 3)), BF16)
  grad = lambda accum: jax.jit(lambda x, dy: conv.kernel_grad(
      x, dy, (3, 3), (1, 1), max_size=4 * 4 * 9 * 2, groups=1, accum_dtype=accum))(x, dy)
  _, vjp = jax.vjp(lambda k: jax.lax.conv_general_dilated(
      x.astype(jnp.float32), k, (1, 1), 'SAME', dimension_numbers=conv.DIMENSION_NUMBERS),
                   jnp.zeros((3, 3, 2, 3), jnp.float32))
  exact = vjp(dy.astype(jnp.float32))[0]  # float32 sums of exact products: the same bound
  bound = 2 * 256 * 4 * 4 * 2.0**-24
  ours = grad(None)
  assert ours.dtype == jnp.float32
  assert rel_error(ours, exact) <= bound
  wrong = grad(BF16)
  assert rel_error(wrong, exact) > 100 * bound, rel_error(wrong, exact)


def test_builders_take_dtype_from_configs():
  """Tower configs' `dtype` (strings too); the builders' dtype= overrides every tower, head
  and projection; float32 everywhere by default."""
  cfg = ml_collections.ConfigDict(dict(image=dict(name='vit', dtype='bfloat16', **TINY_VIT),
                                       text=dict(name='text', **TINY_TEXT), embed_dim=8))
  model = models.build_two_tower(cfg)
  assert (model.tower_a.dtype, model.tower_b.dtype, model.dtype) == (BF16, jnp.float32, None)
  za, zb, logit = jax.eval_shape(model.apply, random_params(model, images(), TOKENS),
                                 images(), TOKENS)
  assert (za.dtype, zb.dtype, logit['temperature'].dtype) == (BF16, jnp.float32, jnp.float32)
  model = models.build_two_tower(cfg, dtype='float32')
  assert model.tower_a.dtype == model.tower_b.dtype == model.dtype == jnp.float32
  simclr = ml_collections.ConfigDict(dict(stage_sizes=(1,), width=4, head_hidden_dims=(16,),
                                          head_out_dim=8, predictor_hidden_dims=(8,)))
  model = models.build_model(simclr, dtype='bfloat16')
  assert model.encoder.dtype == model.head.dtype == model.predictor.dtype == BF16
  assert models.build_model(simclr).head.dtype == jnp.float32
  assert isinstance(models.build_model(simclr).encoder, models.ResNet)
