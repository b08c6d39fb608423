"""NT-Xent against an independent NumPy re-derivation of SimCLR's eq. 1, and numerical checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from contrastive.losses import nt_xent


def reference_nt_xent(z1, z2, tau):
  """SimCLR eq. 1 in float64, one anchor at a time: l(i, j) = -log e^{s_ij/t} / sum_{k!=i} e^{s_ik/t}."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n = len(z)
  half = n // 2
  losses = []
  for i in range(n):
    j = i + half if i < half else i - half
    denom = sum(np.exp(z[i] @ z[k] / tau) for k in range(n) if k != i)
    losses.append(-np.log(np.exp(z[i] @ z[j] / tau) / denom))
  return np.mean(losses)


def reference_grad(z1, z2, tau, eps=1e-6):
  """Central finite differences of the float64 reference w.r.t. z1."""
  z1 = z1.astype(np.float64)
  g = np.zeros_like(z1)
  for idx in np.ndindex(*z1.shape):
    d = np.zeros_like(z1)
    d[idx] = eps
    g[idx] = (reference_nt_xent(z1 + d, z2, tau) - reference_nt_xent(z1 - d, z2, tau)) / (2 * eps)
  return g


@pytest.mark.parametrize('b,d,tau', [(2, 3, 0.5), (5, 8, 0.1), (16, 32, 1.0), (33, 4, 0.07)])
def test_value_matches_reference(b, d, tau):
  rng = np.random.default_rng(b * 100 + d)
  z1, z2 = rng.normal(size=(b, d)), rng.normal(size=(b, d))
  loss, _ = jax.jit(lambda a, c: nt_xent(a, c, temperature=tau))(z1.astype(np.float32),
                                                                  z2.astype(np.float32))
  np.testing.assert_allclose(loss, reference_nt_xent(z1, z2, tau), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('b,d,tau', [pytest.param(3, 4, 0.5, marks=pytest.mark.slow),
                                     (6, 5, 0.2)])
def test_grad_matches_reference(b, d, tau):
  rng = np.random.default_rng(7)
  z1, z2 = rng.normal(size=(b, d)), rng.normal(size=(b, d))
  grad = jax.grad(lambda a: nt_xent(a, z2.astype(np.float32), temperature=tau)[0])(
      z1.astype(np.float32))
  np.testing.assert_allclose(grad, reference_grad(z1, z2, tau), rtol=1e-3, atol=1e-5)


def test_check_grads():
  rng = np.random.default_rng(0)
  z1, z2 = (jnp.asarray(rng.normal(size=(6, 5)), jnp.float32) for _ in range(2))
  check_grads(lambda a, c: nt_xent(a, c, temperature=0.3)[0], (z1, z2), order=1,
              modes=('rev',), atol=1e-2, rtol=1e-2)


def test_metrics_match_reference():
  rng = np.random.default_rng(1)
  z1, z2 = rng.normal(size=(7, 6)), rng.normal(size=(7, 6))
  _, m = nt_xent(z1.astype(np.float32), z2.astype(np.float32), temperature=0.5)
  z = np.concatenate([z1, z2])
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  sim = z @ z.T
  pos = np.array([(i + 7) % 14 for i in range(14)])
  np.fill_diagonal(sim, -np.inf)
  acc = np.mean(np.argmax(sim, axis=1) == pos)
  pos_sim = np.mean(sim[np.arange(14), pos])
  neg = [sim[i, k] for i in range(14) for k in range(14) if k != i and k != pos[i]]
  np.testing.assert_allclose(m['accuracy'], acc)
  np.testing.assert_allclose(m['pos_sim'], pos_sim, rtol=1e-5)
  np.testing.assert_allclose(m['neg_sim'], np.mean(neg), rtol=1e-4, atol=1e-6)


def test_batch_of_one_has_zero_loss():
  z = jnp.ones((1, 4))
  loss, m = nt_xent(z, -z, temperature=0.1)
  assert float(loss) == 0.0 and float(m['accuracy']) == 1.0


def test_scale_invariant_and_zero_vector_safe():
  rng = np.random.default_rng(2)
  z1, z2 = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
  np.testing.assert_allclose(nt_xent(z1, z2, temperature=0.2)[0],
                             nt_xent(10 * z1, 0.1 * z2, temperature=0.2)[0], rtol=1e-5)
  z1[0] = 0.0
  loss, grad = jax.value_and_grad(lambda a: nt_xent(a, z2, temperature=0.2)[0])(z1)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))


@pytest.mark.parametrize('identical', [False, True])
def test_bf16_low_temperature_is_finite(identical):
  rng = np.random.default_rng(3)
  z1 = jnp.asarray(rng.normal(size=(64, 16)), jnp.bfloat16)
  z2 = z1 if identical else jnp.asarray(rng.normal(size=(64, 16)), jnp.bfloat16)
  if identical:
    z1 = z2 = jnp.ones((64, 16), jnp.bfloat16)  # s = 1 everywhere
  loss, grads = jax.value_and_grad(lambda a, c: nt_xent(a, c, temperature=0.01)[0],
                                   argnums=(0, 1))(z1, z2)
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)
  if identical:
    np.testing.assert_allclose(loss, np.log(2 * 64 - 1), rtol=1e-3)


@pytest.mark.parametrize('bad', [0.0, -0.5])
def test_non_positive_temperature_raises(bad):
  with pytest.raises(ValueError, match='temperature must be > 0'):
    nt_xent(jnp.ones((2, 3)), jnp.ones((2, 3)), temperature=bad)


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match=r'z1: \(2, 3\), z2: \(3, 3\)'):
    nt_xent(jnp.ones((2, 3)), jnp.ones((3, 3)), temperature=0.1)
