"""DCL and DCLW (Yeh et al. 2022, eq. 6 over the 2B views) against NumPy re-derivations of eq. 6.

The references are written from the paper's equation in its own indices (views k, l; items
i, j), one anchor at a time, in float64 with no log-sum-exp tricks or masks. As in
tests/test_losses.py, float32 values are compared at rtol 1e-5 and gradients, against central
finite differences of the float64 references, at rtol 1e-3. DCLW's weights carry no gradient,
so its finite-difference reference holds them at their value at the point.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from contrastive import losses
from contrastive.losses import registry
from tests import float64
from tests.test_losses import fd_grad
from tests.test_losses import normal
from tests.test_losses import unit

dcl_module = importlib.import_module('contrastive.losses.dcl')  # `losses.dcl` is the function

# ---- NumPy references -----------------------------------------------------------------------


def ref_dcl(z1, z2, tau, weights=None):
  """DCL eq. 6 in the paper's indices: views k, l in {1, 2}, items i, j in [1, B],

      L_i^(k) = -w_i <z_i^(1), z_i^(2)>/tau
                + log sum_{l in {1, 2}, j != i} exp(<z_i^(k), z_j^(l)>/tau),

  averaged over the 2B pairs (k, i). w = 1 is DCL; DCLW passes its weights. An empty negative
  set (B = 1) is defined as loss 0.
  """
  z = {1: unit(z1), 2: unit(z2)}
  n = len(z1)
  w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
  terms = []
  for k in (1, 2):
    for i in range(n):
      negs = [np.exp(z[k][i] @ z[l][j] / tau) for l in (1, 2) for j in range(n) if j != i]
      terms.append(-w[i] * (z[1][i] @ z[2][i]) / tau + np.log(sum(negs)) if negs else 0.0)
  return np.mean(terms)


def ref_vmf_weights(z1, z2, sigma):
  """DCLW: w_i = 2 - exp(<z_i^(1), z_i^(2)>/sigma) / E_k exp(<z_k^(1), z_k^(2)>/sigma)."""
  a, b = unit(z1), unit(z2)
  e = np.array([np.exp(a[i] @ b[i] / sigma) for i in range(len(a))])
  return 2 - e / np.mean(e)


def ref_dclw(z1, z2, tau, sigma, weights=None):
  """DCLW: eq. 6 with the weights; `weights` given: held at those values (no gradient)."""
  return ref_dcl(z1, z2, tau, ref_vmf_weights(z1, z2, sigma) if weights is None else weights)


def ref_decoupled_info_nce(query, key, tau):
  """One direction, keys as negatives: -s_ii/t + log sum_{j != i} e^{s_ij/t}; B = 1 -> 0."""
  q, k = unit(query), unit(key)
  losses_ = []
  for i in range(len(q)):
    negs = [np.exp(q[i] @ k[j] / tau) for j in range(len(k)) if j != i]
    losses_.append(-q[i] @ k[i] / tau + np.log(sum(negs)) if negs else 0.0)
  return np.mean(losses_)


# name -> (jax fn(a, b, tau), NumPy reference(a, b, tau)); DCLW's sigma is fixed at 0.5.
LOSSES = {
    'dcl': (lambda a, b, t: losses.dcl(a, b, temperature=t), ref_dcl),
    'dclw': (lambda a, b, t: losses.dclw(a, b, temperature=t, sigma=0.5),
             lambda a, b, t: ref_dclw(a, b, t, 0.5)),
    'decoupled_info_nce': (lambda a, b, t: losses.decoupled_info_nce(a, b, temperature=t),
                           ref_decoupled_info_nce),
}


def all_losses(tau):
  """One jitted fn(z1, z2) -> {name: (loss, metrics)}."""
  return jax.jit(lambda x, y: {name: fn(x, y, tau) for name, (fn, _) in LOSSES.items()})


# ---- Values, gradients and metrics against the references ------------------------------------


@pytest.mark.parametrize('b,d,tau', [(1, 3, 0.5), (2, 4, 0.1), (5, 8, 1.0), (17, 6, 0.07)])
def test_values_match_references(b, d, tau):
  z1, z2 = normal(b, b, d), normal(b + 1, b, d)
  z2[: b // 2] += 3 * z1[: b // 2]  # easy positives next to hard ones: DCLW's weights spread
  results = all_losses(tau)(z1, z2)
  for name, (_, ref) in LOSSES.items():
    loss, metrics = results[name]
    np.testing.assert_allclose(loss, ref(z1, z2, tau), rtol=1e-5, atol=1e-5, err_msg=name)
    assert set(metrics) == {'accuracy', 'pos_sim', 'neg_sim', 'logsumexp'}, name


def test_grads_match_references():
  z1, z2, tau = normal(0, 3, 4), normal(1, 3, 4), 0.3
  grads = jax.jit(lambda x, y: {
      name: jax.grad(lambda a, b, f=fn: f(a, b, tau)[0], argnums=(0, 1))(x, y)
      for name, (fn, _) in LOSSES.items()})(z1, z2)
  refs = {name: ref for name, (_, ref) in LOSSES.items()}
  w = ref_vmf_weights(z1, z2, 0.5)  # DCLW's weights, held at their value at (z1, z2)
  refs['dclw'] = lambda a, b, t: ref_dclw(a, b, t, 0.5, weights=w)
  for name, ref in refs.items():
    np.testing.assert_allclose(grads[name][0], fd_grad(lambda x, r=ref: r(x, z2, tau), z1),
                               rtol=1e-3, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(grads[name][1], fd_grad(lambda y, r=ref: r(z1, y, tau), z2),
                               rtol=1e-3, atol=1e-5, err_msg=name)


def test_check_grads(monkeypatch):
  z1, z2 = jnp.asarray(normal(2, 5, 4)), jnp.asarray(normal(3, 5, 4))
  # DCLW's weights are a constant of the step, so finite differences must not move them either:
  # dclw runs with vmf_weights replaced by its value at (z1, z2).
  w = dcl_module.vmf_weights(z1, z2, sigma=0.5)
  monkeypatch.setattr(dcl_module, 'vmf_weights', lambda *args, **kwargs: w)
  check_grads(jax.jit(lambda x, y: tuple(fn(x, y, 0.5)[0] for fn, _ in LOSSES.values())),
              (z1, z2), order=1, modes=['rev'], atol=1e-2, rtol=1e-2)


def test_metrics_match_reference():
  z1 = normal(6, 9, 5)
  z2 = z1 + 0.8 * normal(7, 9, 5)
  results = all_losses(0.2)(z1, z2)
  # dcl, dclw: view i of the 2B has its positive at p(i) = i +- B, the other 2B - 2 as negatives.
  v = unit(np.concatenate([z1, z2]))
  sim = v @ v.T
  pos = np.roll(np.eye(18, dtype=bool), 9, axis=1)
  neg = ~(pos | np.eye(18, dtype=bool))
  top1 = np.argmax(np.where(np.eye(18, dtype=bool), -np.inf, sim), axis=1)
  lse_neg = np.log(np.sum(np.where(neg, np.exp(sim / 0.2), 0.0), axis=1))
  for name in ('dcl', 'dclw'):
    m = results[name][1]
    np.testing.assert_allclose(m['accuracy'], np.mean(pos[np.arange(18), top1]), err_msg=name)
    np.testing.assert_allclose(m['pos_sim'], np.mean(sim[pos]), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(m['neg_sim'], np.mean(sim[neg]), rtol=1e-4, atol=1e-6,
                               err_msg=name)
    np.testing.assert_allclose(m['logsumexp'], np.mean(lse_neg), rtol=1e-5, err_msg=name)
  # decoupled_info_nce: the B x B query/key matrix.
  sim = unit(z1) @ unit(z2).T
  off = ~np.eye(9, dtype=bool)
  m = results['decoupled_info_nce'][1]
  np.testing.assert_allclose(m['accuracy'], np.mean(np.argmax(sim, axis=1) == np.arange(9)))
  np.testing.assert_allclose(m['pos_sim'], np.mean(np.diag(sim)), rtol=1e-5)
  np.testing.assert_allclose(m['neg_sim'], np.mean(sim[off]), rtol=1e-4, atol=1e-6)


def test_identical_embeddings_values():
  # s = 1 everywhere at tau = 0.01 (e^100 terms): DCL has 2B - 2 = 14 negatives, DCLW's weights
  # are all 1, the one-direction form has B - 1 = 7.
  z = jnp.ones((8, 4))
  results = all_losses(0.01)(z, z)
  expected = {'dcl': np.log(14), 'dclw': np.log(14), 'decoupled_info_nce': np.log(7)}
  for name, value in expected.items():
    np.testing.assert_allclose(results[name][0], value, rtol=1e-5, err_msg=name)


# ---- Eq. 6, not the one-direction form ---------------------------------------------------------


def test_registry_uses_eq6_which_is_symmetric():
  # Both views are anchors in eq. 6 already: the registry uses dcl and dclw as they are.
  assert registry.PAIR_LOSSES['dcl'] is losses.dcl
  assert registry.PAIR_LOSSES['dclw'] is losses.dclw
  assert registry.loss_arguments('dclw') == {'temperature': True, 'sigma': False}
  # Swapping the views reorders every sum: compared in float64 (tests/float64.py).
  with float64.enabled():
    z1, z2 = float64.cast((normal(12, 5, 4), normal(13, 5, 4)))
    fn = jax.jit(lambda x, y: (losses.dcl(x, y, temperature=0.3)[0],
                               losses.dclw(x, y, temperature=0.3, sigma=0.5)[0]))
    float64.assert_close(fn(z2, z1), fn(z1, z2))


def test_dcl_is_eq6_not_the_one_direction_form():
  # A worked example: eq. 6 gives -1.8364; the one-direction form (what `dcl` used to be) gives
  # -2.8082, and its average over both directions (the registry's old 'dcl') -3.0514.
  rng = np.random.default_rng(0)
  z0 = rng.normal(size=(4, 8))
  z1 = z0 + rng.normal(size=(4, 8))
  z0, z1 = z0.astype(np.float32), z1.astype(np.float32)
  expected = ref_dcl(z0, z1, 0.1)
  np.testing.assert_allclose(expected, -1.8364, atol=1e-4)
  fn = jax.jit(lambda x, y: (losses.dcl(x, y, temperature=0.1)[0],
                             losses.decoupled_info_nce(x, y, temperature=0.1)[0],
                             registry.PAIR_LOSSES['dcl'](x, y, temperature=0.1)[0]))
  value, one_direction, registered = fn(z0, z1)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(registered, expected, rtol=1e-5)
  np.testing.assert_allclose(one_direction, -2.8082, atol=1e-4)
  two_directions = 0.5 * (one_direction + fn(z1, z0)[1])
  assert abs(one_direction - expected) > 0.9 and abs(two_directions - expected) > 1.0
  # No accident of this example: 2B - 2 negatives instead of B - 1 add about log 2 or more.
  for b in (2, 5, 8):
    x, y = normal(b, b, 6), normal(b + 1, b, 6)
    gap = ref_dcl(x, y, 0.5) - losses.decoupled_info_nce(x, y, temperature=0.5)[0]
    assert gap > 0.6, (b, gap)


@pytest.mark.parametrize('name', sorted(LOSSES))
def test_batch_of_one_is_zero_with_zero_gradient(name):
  fn = LOSSES[name][0]
  z1, z2 = normal(20, 1, 5), normal(21, 1, 5)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      lambda a, b: fn(a, b, 0.1), argnums=(0, 1), has_aux=True))(z1, z2)
  assert loss == 0.0 and metrics['logsumexp'] == 0.0 and metrics['accuracy'] == 1.0
  assert all(np.all(g == 0.0) for g in grads)


# ---- DCLW's weights --------------------------------------------------------------------------


def test_vmf_weights_are_constant_and_match_reference():
  z1, z2 = normal(22, 6, 5), normal(23, 6, 5)
  z2[:3] += 2 * z1[:3]  # three easy positives: weights below 1
  w = jax.jit(lambda a, b: losses.vmf_weights(a, b, sigma=0.5))(z1, z2)
  np.testing.assert_allclose(w, ref_vmf_weights(z1, z2, 0.5), rtol=1e-5)
  with float64.enabled():  # the weights average 1 exactly, up to float64 rounding
    w64 = jax.jit(lambda a, b: losses.vmf_weights(a, b, sigma=0.5))(*float64.cast((z1, z2)))
    float64.assert_close(np.mean(w64), 1.0)
  assert np.all(w[:3] < 1)
  pos_sim = np.sum(unit(z1) * unit(z2), axis=1)
  assert np.all(np.diff(w[np.argsort(pos_sim)]) < 0)  # the easier the positive, the lower w
  grad = jax.grad(lambda a: jnp.sum(losses.vmf_weights(a, z2, sigma=0.5) ** 2))(z1)
  assert np.all(grad == 0.0)
  # Through dclw: the gradient is eq. 6's with the weights held at their value; moving weights
  # (a gradient through w) would give a visibly different one.
  grad = jax.jit(jax.grad(lambda a: losses.dclw(a, z2, temperature=0.3, sigma=0.5)[0]))(z1)
  held = fd_grad(lambda a: ref_dclw(a, z2, 0.3, 0.5, weights=ref_vmf_weights(z1, z2, 0.5)), z1)
  moving = fd_grad(lambda a: ref_dclw(a, z2, 0.3, 0.5), z1)
  np.testing.assert_allclose(grad, held, rtol=1e-3, atol=1e-5)
  assert np.max(np.abs(moving - held)) > 0.1
  with pytest.raises(ValueError, match='sigma must be > 0, got 0.0'):
    losses.dclw(z1, z2, temperature=0.1, sigma=0.0)
