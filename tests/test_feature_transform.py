"""Feature Transformation against NumPy re-derivations of Zhu et al. 2021's formulas (float64).

The transforms compute in float32, so values are compared at atol 1e-6 (unit-norm inputs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats


from contrastive.samplers import feature_transform as ft


def unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize('alpha', [0.3, 2.0])
def test_beta_lambdas_distribution(alpha):
  lam = np.asarray(ft.beta_lambdas(jax.random.key(0), (20000,), alpha), np.float64)
  assert scipy.stats.kstest(lam, scipy.stats.beta(alpha, alpha).cdf).pvalue > 1e-3
  np.testing.assert_allclose(lam.var(), 1 / (4 * (2 * alpha + 1)), rtol=0.05)


@pytest.fixture(scope='module')
def extrapolated():
  """z1, z2, the transform, the lambdas and the gradients of sum |z1'|^2: one jit compile."""
  z1, z2 = np.random.default_rng(0).standard_normal((2, 6, 5)).astype(np.float32)
  rng = jax.random.key(1)

  def run(a, b):
    sq_norm = lambda a, b: jnp.sum(ft.extrapolate_positives(rng, a, b, 2.0)[0] ** 2)
    return (ft.extrapolate_positives(rng, a, b, 2.0), ft.beta_lambdas(rng, (6,), 2.0),
            jax.grad(sq_norm, argnums=(0, 1))(a, b))

  (z1x, z2x), lam, grads = jax.jit(run)(z1, z2)
  return z1, z2, np.asarray(z1x), np.asarray(z2x), np.asarray(lam, np.float64), grads


def test_extrapolate_positives_matches_formula(extrapolated):
  z1, z2, z1x, z2x, lam, _ = extrapolated
  assert np.all((lam >= 0) & (lam <= 1)) and len(set(lam)) == 6  # one draw per example
  lam_ex = 1.0 + lam[:, None]  # the paper's lambda_ex ~ 1 + Beta(a, a)
  a, b = unit(z1), unit(z2)
  np.testing.assert_allclose(z1x, lam_ex * a + (1 - lam_ex) * b, atol=1e-6)
  np.testing.assert_allclose(z2x, lam_ex * b + (1 - lam_ex) * a, atol=1e-6)
  cos = lambda u, v: np.sum(unit(u) * unit(v), -1)
  assert np.all(cos(z1x, z2x) < cos(z1, z2))  # a harder positive pair


def test_extrapolate_positives_gradients_flow(extrapolated):
  z1, z2, _, _, lam, (g1, g2) = extrapolated
  # sum_i |(1 + lam_i) u_i - lam_i v_i|^2 with u, v the unit rows: central differences, float64.
  ref = lambda a, b: np.sum(((1 + lam[:, None]) * unit(a) - lam[:, None] * unit(b)) ** 2)
  eps = 1e-6
  for g, wrt in ((g1, 0), (g2, 1)):
    num = np.zeros(z1.shape)
    for idx in np.ndindex(z1.shape):
      d = np.zeros(z1.shape)
      d[idx] = eps
      args_plus, args_minus = [z1, z2], [z1, z2]
      args_plus[wrt], args_minus[wrt] = args_plus[wrt] + d, args_minus[wrt] - d
      num[idx] = (ref(*args_plus) - ref(*args_minus)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(g), num, rtol=1e-3, atol=1e-4)


def test_interpolate_negatives_on_segments_with_stop_gradient():
  negs = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
  interp = lambda x: ft.interpolate_negatives(jax.random.key(0), x, 12, 1.0)
  out, grad = jax.jit(lambda x: (interp(x), jax.grad(lambda x: jnp.sum(interp(x)))(x)))(negs)
  np.testing.assert_array_equal(np.asarray(grad), 0.0)  # stop-gradient
  out = np.asarray(out, np.float64)
  assert out.shape == (12, 4)
  n = unit(negs)
  for o in out:  # some pair a != b and lam in [0, 1] with o = lam n_a + (1 - lam) n_b
    best = np.inf
    for a in range(5):
      for b in range(5):
        if a != b:
          d = n[a] - n[b]
          lam = np.clip((o - n[b]) @ d / (d @ d), 0.0, 1.0)
          best = min(best, np.linalg.norm(lam * n[a] + (1 - lam) * n[b] - o))
    assert best < 1e-5


def test_errors():
  negs = np.zeros((3, 2), np.float32)
  with pytest.raises(ValueError, match=r'M >= 2; got \(1, 2\)'):
    ft.interpolate_negatives(jax.random.key(0), negs[:1], 4, 1.0)
  with pytest.raises(ValueError, match='num must be >= 1; got 0'):
    ft.interpolate_negatives(jax.random.key(0), negs, 0, 1.0)
  with pytest.raises(ValueError, match='alpha must be > 0; got 0.0'):
    ft.extrapolate_positives(jax.random.key(0), negs, negs, 0.0)
  with pytest.raises(ValueError, match=r'got z1: \(3, 2\), z2: \(2, 2\)'):
    ft.extrapolate_positives(jax.random.key(0), negs, negs[:2], 1.0)
  with pytest.raises(ValueError, match='history is empty'):
    ft.plot_score_histograms([], 'unused.png')


def test_score_histograms_match_numpy():
  r = np.random.default_rng(4)
  pos = r.uniform(-1, 1, 16).astype(np.float32)
  neg = r.uniform(-1, 1, (16, 9)).astype(np.float32)
  pos[:3] = [1.0, -1.0, 1.0000001]  # closed last bin; rounding just above 1 clipped in
  neg[0, :4] = [3.0, -3.0, 1.01, -1.01]  # clearly outside [-1, 1]: counted in no bin
  h = jax.jit(ft.score_histograms, static_argnums=2)(pos, neg, 8)
  ref_pos, edges = np.histogram(np.clip(pos, -1, 1), bins=8, range=(-1, 1))
  np.testing.assert_array_equal(np.asarray(h['pos']), ref_pos)
  np.testing.assert_array_equal(np.asarray(h['neg']), np.histogram(neg, bins=8, range=(-1, 1))[0])
  np.testing.assert_allclose(np.asarray(h['edges']), edges, atol=1e-7)
  assert h['pos'].dtype == jnp.int32 and h['pos'].shape == (8,)
  assert int(h['pos'].sum()) == 16 and int(h['neg'].sum()) == 144 - 4


def test_plot_score_histograms_writes_png(tmp_path):
  r = np.random.default_rng(5)
  edges = np.linspace(-1, 1, 11)
  history = [(step, dict(pos=r.integers(0, 9, 10), neg=r.integers(0, 9, 10), edges=edges))
             for step in (0, 100, 200)]
  path = tmp_path / 'scores.png'
  ft.plot_score_histograms(history, path)
  data = path.read_bytes()
  assert len(data) > 1000 and data[:8] == b'\x89PNG\r\n\x1a\n'
