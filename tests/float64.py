"""Comparisons of reordered computations in float64, so they hold on any CPU.

Sharded, blockwise, fused and multi-process paths sum the same terms in another order than
the one-device dense path. In float32 the results differ by a few units of 2^-24 ~ 6e-8 per
sum, and an optimizer can amplify that without bound (Adam's g / (|g| + eps) and LARS's trust
ratio turn a 1e-10 change of a near-zero gradient into a visible parameter change), so a
float32 tolerance tuned on one CPU fails on another whose kernels sum in another order.

In float64 the same reorderings differ by ~n * 2^-53 ~ 1e-14 relative for n ~ 100 terms. The
tests below compare at RTOL = 1e-9 (after a few optimizer steps) and ATOL = 1e-12: five orders
of magnitude above float64 reordering noise, and many orders below the effect of every bug the
counterexample tests plant (per-device negatives, a wrong mask, a dropped padding entry:
changes of 1e-3 or more, each asserted explicitly).

Use `enabled()` (the `float64_mode` fixture does it for a whole module) and `cast(tree)` on
the inputs; `create_train_state(dtype=jnp.float64)` or `config.dtype='float64'` give a train
state and step in float64.
"""

import jax
import numpy as np
import pytest

RTOL, ATOL = 1e-9, 1e-12


def enabled():
  """Context in which jnp arrays may be float64 (jax_enable_x64, this thread only)."""
  return jax.enable_x64(True)


@pytest.fixture(scope='module', autouse=True)
def float64_mode():
  """Every test of a module that imports this fixture runs with float64 enabled."""
  with enabled():
    yield


def cast(tree):
  """Every floating leaf (NumPy or jax) as float64; other leaves unchanged."""
  return jax.tree.map(
      lambda x: x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x, tree)


def assert_close(actual, desired, rtol=RTOL, atol=ATOL, err_msg=''):
  """assert_allclose over two trees at the float64 tolerances. A float leaf in another dtype
  must be exactly equal (e.g. float32 fractions of counts, which no summation order changes):
  a float32 result compared at float64 tolerances would fail at random."""
  def check(a, d):
    a, d = np.asarray(a), np.asarray(d)
    if np.issubdtype(a.dtype, np.floating) and a.dtype != np.float64:
      np.testing.assert_array_equal(a, d, err_msg=f'{err_msg} ({a.dtype}: must be exact)')
    else:
      np.testing.assert_allclose(a, d, rtol=rtol, atol=atol, err_msg=err_msg)
  jax.tree.map(check, actual, desired)
