"""bfloat16 embeddings in the losses: dtypes, and drift from float32 within a derived bound.

A bfloat16 tower hands the loss [B, D] bfloat16 embeddings. Every path (dense, blockwise with
the fused or the 4-pass gradient, the ring over 8 devices) must return a float32 loss and
float32 metrics, bfloat16 gradients, and stay within the bound of `benchmarks/bf16_losses.py`
of the float32 result on the same values. With u = 2^-8 (bfloat16 keeps 8 significand bits),
the only forward error is the rounding of the normalised rows, q~ = q + e with |e_d| <= u |q_d|
(everything after it is accumulated in float32), so to first order

  |L_bf16 - L_f32|            <= 5 u / sqrt(3) ||q (.) grad F||_F,
  ||g_bf16 - g_f32|| / ||g|| <= 3 u / sqrt(3) sqrt(||Hess F diag(q)||_F^2 + ||grad F||^2 + ||g||^2
                                                   [+ 2 ||dS||_F^2 tiled]) / ||g||,

5 and 3 standard deviations of independent zero-mean rounding errors of variance <= (u q_d)^2 / 3
(Higham & Mary 2019); F is the loss as a function of the normalised rows (float64 reference
formulas), the gradient terms are the evaluation at q~, the rounded cotangent of q~, the rounded
input gradient and, tiled, each tile's rounded dS. At B = 512, D = 64, tau = 0.07 the measured
drift is 0.11-0.16 of the loss bound and 0.17-0.18 of the gradient bound on every path.

Counterexamples, each beyond the bound by a wide margin: accumulating in bfloat16 (similarities,
log-sum-exp and scale 1/tau in bfloat16: the loss drifts by 27x its bound at B = 2048, where the
library's drift is 0.06x), and differentiating the positive's term s_ii outside the tiles on a
confident batch (the tiles' dS_ii = P_ii / tau rounded to bfloat16 against an exact -1 / tau:
the gradient's error grows like u P_ii / (1 - P_ii); 25x the bound, the library's 0.11x).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from benchmarks import bf16_losses as drift
from contrastive import losses
from contrastive.losses import blockwise
from contrastive.losses import common

B, D, BLOCK = 512, 64, 128  # 4 x 4 tiles on one device; 64 rows per device on 8
LOSSES = ('info_nce', 'clip_loss', 'sigmoid_loss')
PATHS = ('dense', 'blockwise', 'ring')


def _blocks(path):
  if path == 'dense':
    return {}
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',)) if path == 'ring' else None
  return dict(block_size=BLOCK, mesh=mesh)


def _losses(path):
  """The losses run on `path`: the ring's tiles are the blockwise path's (sigmoid_loss's too)."""
  return LOSSES[:2] if path == 'ring' else LOSSES


def _all_losses(path):
  """fn(z1, z2) -> {loss: (value, metrics)} for the losses of `path`."""
  kw = _blocks(path)
  fns = {'info_nce': lambda a, b: losses.info_nce(a, b, temperature=drift.TEMPERATURE, **kw),
         'clip_loss': lambda a, b: losses.clip_loss(a, b, temperature=drift.TEMPERATURE, **kw),
         'sigmoid_loss': lambda a, b: losses.sigmoid_loss(a, b, temperature=drift.TEMPERATURE,
                                                          bias=drift.BIAS, **kw)}
  return lambda a, b: {name: fns[name](a, b) for name in _losses(path)}


@functools.lru_cache(maxsize=None)
def _run(path, dtype):
  """{loss: (value, metrics, (grad z1, grad z2))} on the realistic batch, one compilation."""
  z1, z2 = drift.embeddings(B, D)
  fn = _all_losses(path)

  def step(a, b):
    out = {}
    for name in _losses(path):  # the losses, not rows
      (value, metrics), grads = jax.value_and_grad(lambda a, b, n=name: fn(a, b)[n],
                                                   argnums=(0, 1), has_aux=True)(a, b)
      out[name] = (value, metrics, grads)
    return out

  return jax.jit(step)(jnp.asarray(z1, dtype), jnp.asarray(z2, dtype))


@functools.lru_cache(maxsize=None)
def _bounds(loss, similarity=drift.REALISTIC):
  """(loss bound, (dense, tiled) relative gradient bounds)."""
  z1, z2 = drift.embeddings(B, D, similarity)
  return drift.loss_bound(loss, z1, z2), drift.grad_bounds(loss, z1, z2)


def _grads(grads):
  return np.concatenate([np.asarray(g, np.float64) for g in grads])


@pytest.mark.parametrize('path', PATHS)
def test_float32_loss_and_metrics_bfloat16_gradients(path):
  for name, (value, metrics, grads) in _run(path, jnp.bfloat16).items():
    assert value.dtype == jnp.float32, name
    assert {k: str(v.dtype) for k, v in metrics.items()} == dict.fromkeys(metrics, 'float32'), name
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 2, name
    assert np.isfinite(float(value)) and np.all(np.isfinite(_grads(grads))), name


@pytest.mark.parametrize('loss,path', [(loss, path) for path in PATHS for loss in _losses(path)])
def test_drift_from_float32_within_bound(loss, path):
  # Against the dense float32 result: the float32 paths equal it to float32 rounding, ~1e-7
  # (tests/test_blockwise*.py check them in float64), 1e-4 of the bounds here.
  value16, metrics16, grads16 = _run(path, jnp.bfloat16)[loss]
  value32, metrics32, grads32 = _run('dense', jnp.float32)[loss]
  loss_bound, grad_bounds = _bounds(loss)
  grad_bound = grad_bounds[path != 'dense']
  g32 = _grads(grads32)
  dloss = abs(float(value16) - float(value32))
  dgrad = np.linalg.norm(_grads(grads16) - g32) / np.linalg.norm(g32)
  assert dloss < loss_bound, (dloss, loss_bound)
  assert dgrad < grad_bound, (dgrad, grad_bound)
  assert dloss > 0 and dgrad > 1e-4  # bfloat16 did run: the inputs' rounding shows
  # Metrics from the same rounded similarities: pos_sim within u of float32's.
  assert abs(float(metrics16['pos_sim']) - float(metrics32['pos_sim'])) < drift.U


def test_float32_is_the_floor():
  # float32 against float64 on the same values: orders of magnitude under the bfloat16 bound,
  # so the bound is about bfloat16, not about float32's own error.
  with jax.enable_x64(True):
    ref = _run('dense', jnp.float64)
  for name in LOSSES:
    loss_bound, (grad_bound, _) = _bounds(name)
    value32, _, grads32 = _run('dense', jnp.float32)[name]
    g64 = _grads(ref[name][2])
    assert abs(float(value32) - float(ref[name][0])) < loss_bound / 100
    assert np.linalg.norm(_grads(grads32) - g64) / np.linalg.norm(g64) < grad_bound / 100


def _bfloat16_accumulation(dtype):  # what the losses would do accumulating in the input dtype
  return jnp.promote_types(dtype, jnp.bfloat16)


def test_counterexample_accumulating_in_bfloat16_exceeds_the_loss_bound(monkeypatch):
  # At B = 2048: similarities, log-sum-exps and the scale 1/0.07 (14.29 -> 14.31) in bfloat16.
  b = 2048
  z1, z2 = drift.embeddings(b, D)
  value32 = jax.jit(drift.loss_fn('info_nce'))(z1, z2)
  monkeypatch.setattr(common, 'accumulation_dtype', _bfloat16_accumulation)
  bad_fn = drift.loss_fn('info_nce')  # a new function: traced under the patch, never cached
  bad = jax.jit(bad_fn)(jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16))
  assert bad.dtype == jnp.bfloat16  # the patch took
  assert abs(float(bad) - float(value32)) > 10 * drift.loss_bound('info_nce', z1, z2)


def _positive_outside(a, b):
  """InfoNCE on the blockwise path with s_ii from q . k, differentiated outside the tiles."""
  q, k = common.normalize(a), common.normalize(b)
  stats = blockwise.softmax_stats(q, k, scale=1.0 / drift.TEMPERATURE, block_size=BLOCK)
  return jnp.mean(stats.row_lse[:, 0]) - jnp.mean(common.rowwise_dot(q, k)) / drift.TEMPERATURE


def test_counterexample_positive_outside_the_tiles_exceeds_the_gradient_bound():
  # A confident batch (cos(z1_i, z2_i) in [0.9, 0.99], P_ii -> 1): rounding dS_ii = P_ii / tau
  # to bfloat16 and adding the exact -1/tau outside leaves an error u P_ii / tau against a
  # gradient (1 - P_ii) / tau. The library folds -1/tau into dS_ii first: within the bound.
  z1, z2 = drift.embeddings(B, D, drift.CONFIDENT)
  ours = jax.jit(jax.grad(drift.loss_fn('info_nce', block_size=BLOCK), argnums=(0, 1)))
  outside = jax.jit(jax.grad(_positive_outside, argnums=(0, 1)))
  g32 = _grads(ours(z1, z2))
  bf16 = lambda fn: _grads(fn(jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16)))
  bound = _bounds('info_nce', drift.CONFIDENT)[1][1]
  assert np.linalg.norm(bf16(ours) - g32) / np.linalg.norm(g32) < bound
  assert np.linalg.norm(bf16(outside) - g32) / np.linalg.norm(g32) > 5 * bound


@pytest.mark.parametrize('loss', sorted(losses.PAIR_LOSSES))
def test_check_compute_dtype(loss):
  losses.check_compute_dtype(loss, 'bfloat16')
  losses.check_compute_dtype(loss, jnp.float32)
  for bad in ('int8', 'float8_e4m3fn', 'bf16'):
    with pytest.raises(ValueError, match=f"'{loss}'.*bfloat16"):
      losses.check_compute_dtype(loss, bad)
  blockwise_path = 'block_size' in losses.registry.loss_arguments(loss)
  if blockwise_path:
    losses.check_compute_dtype(loss, 'bfloat16', block_size=BLOCK)
  else:
    with pytest.raises(ValueError, match='no blockwise path'):
      losses.check_compute_dtype(loss, 'bfloat16', block_size=BLOCK)
