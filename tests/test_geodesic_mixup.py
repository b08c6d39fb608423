"""Geodesic multi-modal mixup (Oh, So et al. 2023) against NumPy re-derivations, in float64.

slerp is compared with the textbook formula x sin((1 - lam) theta) / sin(theta) + y sin(lam
theta) / sin(theta); angles are measured with atan2(|r - (r . x) x|, r . x), exact at small angles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from jax import test_util

from contrastive.losses.info_nce import check_query_negatives
from contrastive.negatives import geodesic_mixup as gm
from tests import reference
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)

slerp = jax.jit(gm.slerp)  # one compile per shape: eager dispatch is slower than compiling


def unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def angle(x, r):
  """The angle between unit vectors x and r along the last axis."""
  c = np.sum(x * r, -1)
  return np.arctan2(np.linalg.norm(r - c[..., None] * x, axis=-1), c)


def slerp_numpy(x, y, lam):
  x, y = unit(x), unit(y)
  theta = np.arccos(np.clip(np.sum(x * y, -1), -1, 1))[..., None]
  lam = np.asarray(lam, np.float64)[..., None]
  return (x * np.sin((1 - lam) * theta) + y * np.sin(lam * theta)) / np.sin(theta)


def test_slerp_geometry():
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((2, 5, 5))  # the shapes of the degenerate test: one compile
  lam = rng.random(5)
  lam[:3] = 0.0, 1.0, 0.5
  out = np.asarray(slerp(x, y, lam))
  assert out.dtype == np.float64
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-12)
  np.testing.assert_allclose(angle(unit(x), out), lam * angle(unit(x), unit(y)), atol=1e-12)
  np.testing.assert_allclose(out, slerp_numpy(x, y, lam), atol=1e-12)
  np.testing.assert_allclose(out[0], unit(x[0]), atol=1e-12)  # lam = 0
  np.testing.assert_allclose(out[1], unit(y[1]), atol=1e-12)  # lam = 1
  # Scale-free: the inputs are normalised first.
  np.testing.assert_allclose(slerp(3 * x, 0.5 * y, np.full(5, 0.3)),
                             slerp_numpy(x, y, np.full(5, 0.3)), atol=1e-12)


def test_slerp_float32():
  x, y = np.random.default_rng(1).standard_normal((2, 8, 4)).astype(np.float32)
  out = slerp(x, y, np.float32(0.25))  # a scalar lam broadcasts
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, slerp_numpy(x, y, np.full(8, 0.25)), atol=1e-6)
  same = np.asarray(slerp(x, x, np.float32(0.25)))  # theta = 0: below the float32 switch
  np.testing.assert_allclose(same, unit(x), atol=1e-6)
  opposite = np.asarray(slerp(x, -x, np.float32(0.5)))  # theta = pi: a quarter turn
  np.testing.assert_allclose(np.linalg.norm(opposite, axis=-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.sum(opposite * unit(x), -1), 0.0, atol=1e-6)


def test_slerp_gradients_generic_point():
  """Reverse mode (what training uses) against finite differences."""
  rng = np.random.default_rng(2)
  x, y = rng.standard_normal((2, 5, 5))
  test_util.check_grads(slerp, (x, y, rng.random(5)), order=1, modes=['rev'])


@pytest.mark.parametrize('sign', [1.0, -1.0])  # theta -> 0 and theta -> pi
def test_slerp_degenerate_angles(sign):
  """Near-equal and near-antipodal pairs: finite values and gradients, unit norm, right angle."""
  rng = np.random.default_rng(3)
  x = unit(rng.standard_normal(5))
  eps = np.array([0.0, 1e-14, 1e-10, 1e-7, 1e-4])[:, None]  # across the 1.5e-8 switch
  y = sign * x + eps * unit(rng.standard_normal(5))
  xs = np.broadcast_to(x, y.shape)
  lam = np.array([0.3, 0.5, 0.7, 0.5, 0.25])
  out = np.asarray(slerp(xs, y, lam))
  assert np.isfinite(out).all()
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-12)
  np.testing.assert_allclose(angle(xs, out), lam * angle(xs, unit(y)), atol=1e-9)
  w = rng.standard_normal(5)
  grads = jax.jit(jax.grad(lambda a, b, t: jnp.sum(gm.slerp(a, b, t) @ w),
                           argnums=(0, 1, 2)))(xs, y, lam)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  if sign > 0:  # the small-angle branch is the normalised linear mix: its exact gradient
    np.testing.assert_allclose(grads[1][0], lam[0] * (w - (w @ x) * x), atol=1e-9)
  else:  # exactly antipodal at lam = 1 ends at y
    np.testing.assert_allclose(slerp(x, -x, 1.0), -x, atol=1e-12)


@pytest.fixture(scope='module')
def pairs():
  za, zb = np.random.default_rng(4).standard_normal((2, 6, 5))
  return za, zb


@pytest.fixture(scope='module')
def draw(pairs):
  """(negatives [K, 6, 5, 5], lam [K], grads of sum(negatives * w)) for K keys and a traced
  alpha: the Beta sampler compiles once for every test of the module."""
  za, zb = pairs
  w = np.random.default_rng(7).standard_normal((6, 5, 5))

  def run(a, b, key, alpha):
    negatives, lam = gm.geodesic_negatives(a, b, key, alpha=alpha)
    return jnp.sum(negatives * w), (negatives, lam)

  grad = jax.vmap(jax.grad(run, argnums=(0, 1), has_aux=True), in_axes=(None, None, 0, None))
  keys = jax.random.split(jax.random.key(5), 3000)
  compiled = jax.jit(lambda alpha: grad(za, zb, keys, alpha))

  def sample(alpha):
    grads, (negatives, lam) = compiled(jnp.float64(alpha))
    return np.asarray(negatives), np.asarray(lam), [np.asarray(g) for g in grads]
  return sample


@pytest.fixture(scope='module')
def mixed(draw):
  """One draw at alpha 0.5: (negatives [6, 5, 5], lam, [grad za, grad zb])."""
  negatives, lam, grads = draw(0.5)
  return negatives[0], float(lam[0]), [g[0] for g in grads]


def test_geodesic_negatives_on_great_circles(pairs, mixed):
  za, zb = pairs
  negatives, lam, _ = mixed
  assert negatives.shape == (6, 5, 5) and negatives.dtype == np.float64
  np.testing.assert_allclose(np.linalg.norm(negatives, axis=-1), 1.0, atol=1e-12)
  a, b = unit(za), unit(zb)
  mixes = slerp_numpy(a, b, np.full(6, lam))  # pair j's mix, the NumPy formula
  for i in range(6):
    others = [j for j in range(6) if j != i]
    np.testing.assert_allclose(negatives[i], mixes[others], atol=1e-12)
    # On the great circle a_j -> b_j, at fraction lam of the arc (geometry, not the formula).
    np.testing.assert_allclose(angle(a[others], negatives[i]),
                               lam * angle(a[others], b[others]), atol=1e-12)
    np.testing.assert_allclose(angle(a[others], negatives[i]) + angle(negatives[i], b[others]),
                               angle(a[others], b[others]), atol=1e-12)
  # The shape the loss takes as query_negatives (its check raises otherwise).
  check_query_negatives(za, negatives, np.ones((6, 5), bool))


def test_gradients_flow_through_the_mixes(mixed):
  """No stop-gradient (as in the paper): every pair's mix is another row's negative, so every
  row of both inputs gets a gradient."""
  for g in mixed[2]:
    assert np.isfinite(g).all() and (np.abs(g).max(axis=1) > 1e-3).all()


@pytest.mark.parametrize('alpha', [0.1, 1.0, 4.0])
def test_lam_is_beta(pairs, draw, alpha):
  """lam recovered from the geometry of the negatives, over 3000 draws, is Beta(alpha, alpha)."""
  za, zb = pairs
  negatives, returned, _ = draw(alpha)
  a, b = unit(za[0]), unit(zb[0])
  lam = angle(a, negatives[:, 1, 0]) / angle(a, b)  # negatives[1, 0] is pair 0's mix
  np.testing.assert_allclose(lam, returned, atol=1e-9)
  assert abs(lam.mean() - 0.5) < 0.03
  var = 1 / (4 * (2 * alpha + 1))  # 0.208 (alpha 0.1), 0.083 (1), 0.028 (4)
  np.testing.assert_allclose(lam.var(), var, rtol=0.15)
  assert scipy.stats.kstest(lam, scipy.stats.beta(alpha, alpha).cdf).pvalue > 1e-3
  if alpha == 1.0:  # the checks tell a wrong alpha apart: uniform draws are not Beta(0.1, 0.1)
    assert abs(lam.var() / (1 / (4 * 1.2)) - 1) > 0.5
    assert scipy.stats.kstest(lam, scipy.stats.beta(0.1, 0.1).cdf).pvalue < 1e-10


def test_bad_inputs():
  x = np.ones((4, 3))
  key = jax.random.key(0)
  for alpha in (0.0, -1.0):
    with pytest.raises(ValueError, match=f'alpha must be > 0; got {alpha}'):
      gm.geodesic_negatives(x, x, key, alpha=alpha)
  with pytest.raises(ValueError, match=r'same shape; got za: \(4, 3\), zb: \(4, 2\)'):
    gm.geodesic_negatives(x, np.ones((4, 2)), key, alpha=1.0)
  with pytest.raises(ValueError, match=r'B >= 2.*got za: \(1, 3\)'):
    gm.geodesic_negatives(x[:1], x[:1], key, alpha=1.0)
  with pytest.raises(ValueError, match=r'D >= 2 and the same shape; got x: \(4, 3\), y: \(3, 3\)'):
    gm.slerp(x, x[:3], 0.5)
  with pytest.raises(ValueError, match=r'D >= 2.*got x: \(4, 1\)'):
    gm.slerp(x[:, :1], x[:, :1], 0.5)
  with pytest.raises(ValueError, match=r'lam must broadcast to x.shape\[:-1\] = \(4,\); got \(3'):
    gm.slerp(x, x, np.ones(3))


# ---- m^3-Mix in the two-tower objective (config.geodesic_mixup) -----------------------------

def siglip_with_mixes_numpy(za, zb, ids, lam, t, bias):
  """SigLIP's in-batch loss, -(1/B) sum_ij log sigmoid(y_ij z_ij) without the pairs of one
  group (i != j), plus 1/(2B) sum_i sum_{j: ids_j != ids_i} of log(1 + exp(x . m_j / t + b))
  for x = a_i and x = b_i, with m_j the textbook slerp of a_j and b_j."""
  a, c = unit(za), unit(zb)
  theta = np.arccos(np.clip(np.sum(a * c, 1), -1, 1))[:, None]
  m = (np.sin((1 - lam) * theta) * a + np.sin(lam * theta) * c) / np.sin(theta)
  b = len(a)
  total = 0.0
  for i in range(b):
    for j in range(b):
      if ids[i] != ids[j]:
        total += 0.5 * (np.log1p(np.exp(a[i] @ m[j] / t + bias)) +
                        np.log1p(np.exp(c[i] @ m[j] / t + bias)))
  return reference.sigmoid_loss(za, zb, t, bias, mask=ids[None, :] != ids[:, None]) + total / b


@pytest.mark.parametrize('block_size', [None, pytest.param(4, marks=pytest.mark.slow)])
def test_mixup_loss_matches_numpy(block_size):  # blockwise: make test-all (CI under 10 min)
  from contrastive import objectives  # pylint: disable=g-import-not-at-top
  from contrastive.losses import blockwise, sigmoid_loss  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  za, zb = rng.standard_normal((2, 6, 5))
  ids = np.array([0, 1, 1, 2, 3, 3])
  args = {} if block_size is None else dict(block_size=block_size)
  loss, metrics = objectives.geodesic_mixup_loss(
      sigmoid_loss, jnp.asarray(za), jnp.asarray(zb), jnp.asarray(ids), 0.3, temperature=0.5,
      bias=-1.0, negative_mask=blockwise.distinct_ids, **args)
  want = siglip_with_mixes_numpy(za, zb, ids, 0.3, 0.5, -1.0)
  np.testing.assert_allclose(loss, want, rtol=1e-12)
  assert metrics['mixup_lambda'] == 0.3
  # Counterexample: the plain in-batch loss is far from it (the mixes are hard negatives).
  plain, _ = sigmoid_loss(za, zb, temperature=0.5, bias=-1.0, mask_ids=(ids, ids),
                          negative_mask=blockwise.distinct_ids)
  assert abs(float(plain) - want) > 0.5
  if block_size is None:  # the blockwise path's gradients equal the dense one's (test_losses)
    f = lambda x, y: objectives.geodesic_mixup_loss(
        sigmoid_loss, x, y, jnp.asarray(ids), 0.3, temperature=0.5, bias=-1.0,
        negative_mask=blockwise.distinct_ids)[0]
    test_util.check_grads(f, (jnp.asarray(za), jnp.asarray(zb)), order=1, modes=['rev'])


def test_mixup_config_errors():
  import os  # pylint: disable=g-import-not-at-top
  from contrastive import config_lib, validate  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), '..', 'configs', 'siglip_emoji.py')
  for field, value in (('negclip.num_negatives', 2), ('loss.name', 'clip_loss')):
    config = config_lib.load_config(path, 'runlocal')
    config.geodesic_mixup.alpha = 0.5
    section, name = field.split('.')
    config[section][name] = value
    if name == 'name':
      config.model.loss_params = 'clip'
    with pytest.raises(validate.ConfigError, match=r'geodesic_mixup.alpha=0.5: .* need '
                       'sigmoid_loss without negclip') as e:
      validate.validate_config(config, num_devices=8, num_processes=1)
    assert '\n' not in str(e.value)
