"""The blockwise path of each loss against its dense path: values, gradients, metrics, memory.

The dense losses are checked against NumPy references in test_losses.py. Here every loss with
`block_size=` must give the dense loss, the dense gradients w.r.t. the embeddings,
the extra negatives, the temperature and the bias, and the dense metrics, with masks given as
functions of (ids, similarity), class labels as ids, and extra negatives; for block sizes that
divide B, that don't (the remainder is padded and masked) and that exceed it. The compiled
temporary memory must grow linearly in B, and the traced graph must not grow with B / block.
Values compare in float64 (tests/float64.py: rtol 1e-9, holding on any CPU); float32 is
checked where it is the point (overflow at a low temperature).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from contrastive import losses
from contrastive.losses import blockwise
from tests import float64
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)

B, D, M = 24, 8, 10  # batch, width, extra negatives
# float64 sums in another order agree to ~1e-15 relative; a wrong mask or a lost padding entry
# moves values and gradients by > 1e-3.


def threshold_mask(row_ids, col_ids, sim):
  """False-negative elimination by similarity, for odd rows and candidates only."""
  return (sim < 0.3) | (row_ids[:, None] % 2 == 0) | (col_ids[None, :] % 2 == 0)


def _inputs():
  rng = np.random.default_rng(0)
  z1 = rng.normal(size=(B, D))  # float64
  z2 = z1 + rng.normal(size=(B, D))
  z2[: B // 3] += 3 * z1[: B // 3]  # easy positives: the debiased clamp acts on some rows
  extra = rng.normal(size=(M, D))
  labels = rng.integers(0, 5, size=B + M).astype(np.int32)  # keys' labels, then the extras'
  return z1, z2, extra, labels


def _by_label(labels):
  return dict(negative_mask=blockwise.distinct_ids, mask_ids=(labels[:B], labels))


# case -> fn(z1, z2, extra, labels, tau, bias, **blocks) -> (loss, metrics)
CASES = {
    'info_nce': lambda z1, z2, e, y, t, b, **kw: losses.info_nce(z1, z2, temperature=t, **kw),
    'info_nce+extra+threshold': lambda z1, z2, e, y, t, b, **kw: losses.info_nce(
        z1, z2, temperature=t, extra_negatives=e, negative_mask=threshold_mask, **kw),
    'info_nce+extra+labels': lambda z1, z2, e, y, t, b, **kw: losses.info_nce(
        z1, z2, temperature=t, extra_negatives=e, **_by_label(y), **kw),
    'clip_loss': lambda z1, z2, e, y, t, b, **kw: losses.clip_loss(z1, z2, temperature=t, **kw),
    'clip_loss+threshold': lambda z1, z2, e, y, t, b, **kw: losses.clip_loss(
        z1, z2, temperature=t, negative_mask=threshold_mask, **kw),
    'sigmoid_loss': lambda z1, z2, e, y, t, b, **kw: losses.sigmoid_loss(
        z1, z2, temperature=t, bias=b, **kw),
    'sigmoid_loss+extra+labels': lambda z1, z2, e, y, t, b, **kw: losses.sigmoid_loss(
        z1, z2, temperature=t, bias=b, extra_negatives=e, **_by_label(y), **kw),
    'debiased_info_nce': lambda z1, z2, e, y, t, b, **kw: losses.debiased_info_nce(
        z1, z2, temperature=t, tau_plus=0.1, **kw),
    'hard_negative_info_nce': lambda z1, z2, e, y, t, b, **kw: losses.hard_negative_info_nce(
        z1, z2, temperature=t, beta=1.0, tau_plus=0.1, **kw),
}


@functools.lru_cache(maxsize=None)
def _values_and_grads(block_size, tau=0.2):
  """{case: (loss, metrics, grads w.r.t. (z1, z2, extra, tau, bias))}, one compilation."""
  def run(z1, z2, extra, labels, tau, bias):
    out = {}
    for name, fn in CASES.items():  # the cases, not blocks
      def loss_fn(z1, z2, extra, tau, bias, fn=fn):
        return fn(z1, z2, extra, labels, tau, bias, block_size=block_size)

      (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3, 4),
                                                  has_aux=True)(z1, z2, extra, tau, bias)
      out[name] = (loss, metrics, grads)
    return out

  z1, z2, extra, labels = _inputs()
  return jax.device_get(jax.jit(run)(z1, z2, extra, labels, np.float64(tau), np.float64(-2.0)))


@pytest.mark.parametrize('block_size', [8, 7, pytest.param(64, marks=pytest.mark.slow)])
# 8 divides B = 24; 7 does not; 64 > B (make test-all; CI keeps the suite under 10 min)
def test_blockwise_equals_dense(block_size):
  dense, tiled = _values_and_grads(None), _values_and_grads(block_size)
  for name, (loss, metrics, grads) in dense.items():
    t_loss, t_metrics, t_grads = tiled[name]
    assert loss.dtype == np.float64
    float64.assert_close(t_loss, loss, err_msg=name)
    for g, t_g, arg in zip(grads, t_grads, ('z1', 'z2', 'extra', 'tau', 'bias')):
      float64.assert_close(t_g, g, err_msg=f'{name} d/d{arg}')
    assert set(t_metrics) == set(metrics), name
    for key in metrics:
      float64.assert_close(t_metrics[key], metrics[key], err_msg=f'{name} {key}')
  assert 0 < dense['debiased_info_nce'][1]['clamped'] < 1  # both branches of the clamp ran
  assert np.any(dense['info_nce+extra+threshold'][2][2] != 0)  # the extras get gradients


def test_low_temperature_identical_embeddings():
  # s = 1 everywhere at tau = 0.01: e^100 per term, beyond float32 unless stabilised. Every
  # term is equal, so sums in any order agree to a few float32 ulps: rtol 1e-5.
  z = jnp.ones((8, 4), jnp.float32)
  for fn in (lambda x, **kw: losses.clip_loss(x, x, temperature=0.01, **kw)[0],
             lambda x, **kw: losses.debiased_info_nce(x, x, temperature=0.01, tau_plus=0.1,
                                                      **kw)[0],
             lambda x, **kw: losses.sigmoid_loss(x, x, temperature=0.01, bias=-10.0, **kw)[0]):
    dense = jax.jit(jax.value_and_grad(fn))(z)
    tiled = jax.jit(jax.value_and_grad(functools.partial(fn, block_size=3)))(z)
    assert tiled[0].dtype == np.float32
    assert np.isfinite(tiled[0]) and np.all(np.isfinite(tiled[1]))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), dense,
                 tiled)


def _clip_grad(b, d, block_size):
  return jax.value_and_grad(
      lambda x, y: losses.clip_loss(x, y, temperature=0.1, block_size=block_size)[0],
      argnums=(0, 1))


def test_compiled_temp_memory_is_linear_in_batch():
  def temp_bytes(make_fn, b, d=32):
    z = jax.ShapeDtypeStruct((b, d), jnp.float32)
    return jax.jit(make_fn(b, d)).lower(z, z).compile().memory_analysis().temp_size_in_bytes

  def sigmoid(b, d):
    return jax.value_and_grad(lambda x, y: losses.sigmoid_loss(
        x, y, temperature=0.1, bias=-10.0, block_size=256)[0], argnums=(0, 1))

  def info_nce(b, d):  # the fused path: strips of 128 rows x B columns
    return jax.value_and_grad(lambda x, y: losses.info_nce(
        x, y, temperature=0.1, block_size=256)[0], argnums=(0, 1))

  for make_fn in (functools.partial(_clip_grad, block_size=256), sigmoid, info_nce):
    small, large = temp_bytes(make_fn, 2048), temp_bytes(make_fn, 4096)
    assert large < 2.5 * small, (small, large)  # linear (B^2 would give 4x)
    assert large < 4096 ** 2 * 4 / 8, large  # far below one [B, B] float32 matrix
  # The check can see a B x B buffer: the dense path's temporaries grow 4x.
  dense = functools.partial(_clip_grad, block_size=None)
  small, large = temp_bytes(dense, 2048), temp_bytes(dense, 4096)
  assert large > 3.5 * small and large >= 4096 ** 2 * 4, (small, large)


def _num_equations(jaxpr):
  """Equations of a jaxpr and of every jaxpr nested in its equations (scan bodies, ...)."""
  count = 0
  for eqn in jaxpr.eqns:
    count += 1
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, 'jaxpr', sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, 'eqns'):
          count += _num_equations(sub)
  return count


def test_traced_graph_does_not_grow_with_blocks():
  def equations(b):
    x = jax.ShapeDtypeStruct((b, D), jnp.float32)
    return _num_equations(jax.make_jaxpr(_clip_grad(b, D, 4))(x, x).jaxpr)

  assert equations(16) == equations(256)  # 4 x 4 tiles or 64 x 64: the same lax.scans


def _row_lse_grads(outer, fused_gradient):
  """Gradients w.r.t. (q, k, extra, scale) of outer(row_lse [B]) on the blockwise path."""
  z1, z2, extra, _ = _inputs()
  q, k, extra = (losses.l2_normalize(x) for x in (z1, z2, extra))

  def fn(q, k, extra, scale):
    stats = blockwise.softmax_stats(q, k, scale=scale, extra=extra, block_size=7,
                                    fused_gradient=fused_gradient)
    return outer(stats.row_lse[:, 0])

  return jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3)))(q, k, extra, np.float64(5.0))


def test_fused_gradient_is_exact_for_one_cotangent_and_nan_otherwise():
  # The fused path (3 matmul passes) computes the gradients for a unit cotangent in the forward
  # pass: any function of the mean gives every row the same cotangent, and the same gradients
  # as the recomputing path; per-row weights cannot be served, and must not pass silently.
  through_mean = lambda lse: jnp.exp(jnp.mean(lse) / 4)
  float64.assert_close(_row_lse_grads(through_mean, True), _row_lse_grads(through_mean, False))
  per_row = lambda lse: jnp.sum(jnp.linspace(0.5, 1.5, B) * lse)
  assert all(np.all(np.isnan(g)) for g in _row_lse_grads(per_row, True))
  assert all(np.all(np.isfinite(g)) for g in _row_lse_grads(per_row, False))


def test_blockwise_info_nce_check_grads():
  # The fused path against finite differences (labels mask: no threshold to step across).
  z1, z2, extra, labels = _inputs()
  fn = jax.jit(lambda x, y, e: losses.info_nce(x, y, temperature=0.5, extra_negatives=e,
                                               block_size=7, **_by_label(labels))[0])
  check_grads(fn, (z1, z2, extra), order=1, modes=['rev'], atol=1e-2, rtol=1e-2)


def test_bad_blockwise_arguments_raise():
  x = jnp.ones((6, 4))
  with pytest.raises(ValueError, match='not a dense array of shape'):
    losses.info_nce(x, x, temperature=0.1, negative_mask=jnp.ones((6, 6), bool), block_size=2)
  with pytest.raises(ValueError, match='mesh is only used by the blockwise path'):
    losses.clip_loss(x, x, temperature=0.1, mesh=jax.make_mesh((1,), ('data',)))
  with pytest.raises(ValueError, match='block_size must be None or a positive int'):
    losses.sigmoid_loss(x, x, temperature=0.1, bias=0.0, block_size=0)
  with pytest.raises(ValueError, match="collective must be one of"):
    losses.clip_loss(x, x, temperature=0.1, block_size=2, collective='tree')
  with pytest.raises(ValueError, match=r'mask_ids must be \(\[B, \.\.\.\], \[B \+ M, \.\.\.\]\) '
                     r'with B = 6, B \+ M = 6'):
    losses.info_nce(x, x, temperature=0.1, negative_mask=blockwise.distinct_ids,
                    mask_ids=(jnp.zeros(6, int), jnp.zeros(5, int)), block_size=2)
  with pytest.raises(ValueError, match='beta must be a Python float >= 0'):
    losses.hard_negative_info_nce(x, x, temperature=0.1, beta=-1.0, tau_plus=0.0, block_size=2)
