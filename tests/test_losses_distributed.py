"""Every loss gives the same value and gradients with its batch sharded over 1, 2 and 8 devices.

tests/conftest.py gives the process 8 virtual CPU devices; a mesh over the first n of them is an
n-device run. The losses are written on logical global arrays, so under `jax.jit` XLA must
gather every device's keys as negatives for every other device's queries. A per-device version
(jax.shard_map, negatives never leave their device) is run too, to show that the comparison
would catch a loss whose negatives stay local. All in float64 (tests/float64.py), so the
comparison at rtol 1e-9 holds on any CPU.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive import parallel
from contrastive.losses import info_nce
from contrastive.losses import registry
from contrastive.losses import supcon
from tests import float64
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)
from tests.test_losses import loss_kwargs
from tests.test_losses import PAIR_KWARGS

DEVICE_COUNTS = (1, 2, 8)
# In float64 the meshes' reordered sums agree to ~1e-15 relative; keeping negatives per device
# moves the loss by > 1e-2 (checked below): 7 orders of magnitude above the rtol of 1e-9.
B, D, M = 32, 16, 16  # batch, embedding width, extra negatives: 4 / 2 rows per device on 8


def mesh_of(n):
  assert jax.device_count() >= 8, 'tests/conftest.py should have set 8 CPU devices'
  return parallel.make_mesh([('data', -1)], devices=jax.devices()[:n])


def _pair_loss(name):
  fn = registry.PAIR_LOSSES[name]
  kwargs = loss_kwargs(name, PAIR_KWARGS['temperature'])  # amcl: two heads' temperatures
  return lambda z1, z2: fn(z1, z2, **kwargs)[0]


def _inputs():
  rng = np.random.default_rng(0)
  z1 = rng.normal(size=(B, D))  # float64
  z2 = z1 + rng.normal(size=(B, D))  # positives more similar than negatives
  extra = rng.normal(size=(M, D))
  mask = rng.random((B, B + M)) < 0.7
  labels = rng.integers(0, 6, size=B).astype(np.int32)
  return z1, z2, extra, mask, labels


def _case(name):
  """(loss fn of float arrays then other arrays, its arguments, how many are differentiated)."""
  z1, z2, extra, mask, labels = _inputs()
  if name == 'info_nce+extra_negatives+mask':
    fn = lambda a, b, e, m: info_nce(a, b, temperature=0.2, extra_negatives=e, negative_mask=m)[0]
    return fn, (z1, z2, extra, mask), 3
  if name == 'supcon+labels':
    return lambda z, y: supcon(z, y, temperature=0.2)[0], (z1, labels), 1
  return _pair_loss(name), (z1, z2), 2


CASES = sorted(registry.PAIR_LOSSES) + ['info_nce+extra_negatives+mask', 'supcon+labels']


def _per_device(loss_fn, mesh):
  """The bug the check must catch: each device's queries only see that device's negatives."""

  def local(z1, z2):
    return jax.lax.pmean(loss_fn(z1, z2), parallel.DATA)

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(parallel.DATA), P(parallel.DATA)),
                               out_specs=P()))


@pytest.mark.parametrize('name', CASES)
def test_loss_and_grads_equal_on_1_2_8_devices(name):
  fn, args, num_diff = _case(name)
  step = jax.value_and_grad(fn, argnums=tuple(range(num_diff)))
  results = []
  for n in DEVICE_COUNTS:
    sharding = parallel.data_sharding(mesh_of(n))  # every input split along its leading axis
    sharded = [jax.device_put(x, sharding) for x in args]
    loss, grads = jax.jit(step)(*sharded)
    assert loss.sharding.is_fully_replicated and grads[0].sharding.spec == P(parallel.DATA)
    results.append(jax.device_get((loss, grads)))
  assert np.isfinite(results[0][0]) and results[0][0].dtype == np.float64
  for loss_grads in results[1:]:
    float64.assert_close(loss_grads, results[0])
  if name not in registry.PAIR_LOSSES:
    return
  # The same loss with per-device negatives differs on 8 devices (4 rows each: 3 in-batch
  # negatives per query, 6 for the 2B-view losses, instead of 31 or 62) ...
  global_loss = results[-1][0]
  local_loss = _per_device(fn, mesh_of(8))(*sharded)  # `sharded`: the 8-device inputs
  assert abs(local_loss - global_loss) > 1e-2, (local_loss, global_loss)
  with pytest.raises(AssertionError):
    float64.assert_close(local_loss, global_loss)


@pytest.mark.parametrize('name', ['info_nce', 'sigmoid_loss'])
def test_per_device_variant_is_the_loss_on_one_device(name):
  """The per-device harness changes nothing but where negatives come from: the check above
  compares like with like."""
  z1, z2, *_ = _inputs()
  one = mesh_of(1)
  sharding = parallel.data_sharding(one)
  local_one = _per_device(_pair_loss(name), one)(jax.device_put(z1, sharding),
                                                 jax.device_put(z2, sharding))
  float64.assert_close(local_one, jax.jit(_pair_loss(name))(z1, z2))
