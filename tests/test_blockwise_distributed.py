"""The blockwise losses under shard_map on 1, 2 and 8 devices equal the dense single-device ones.

tests/conftest.py gives the process 8 virtual CPU devices; a mesh over the first n of them is an
n-device run. With `mesh=`, each device keeps its B/n query rows and the key chunks (keys plus
extra negatives) travel around a ppermute ring or are all-gathered (`ring.py`); masks by ids
and similarity, labels as ids, and extra negatives (M not divisible by n: padded) included,
with block sizes that do not divide the B/n rows per device. Each device's compiled temporary
memory must grow like B, not like its B/n x B block. Values compare in float64
(tests/float64.py), so rtol 1e-9 holds on any CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive import losses
from contrastive import parallel
from contrastive.losses import blockwise
from tests import float64
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)

B, D, M = 32, 8, 12  # 4 rows and 2 extra negatives (1.5, padded) per device on 8


def threshold_mask(row_ids, col_ids, sim):
  return (sim < 0.3) | (row_ids[:, None] % 2 == 0) | (col_ids[None, :] % 2 == 0)


def _inputs():
  rng = np.random.default_rng(1)
  z1 = rng.normal(size=(B, D))  # float64
  z2 = z1 + rng.normal(size=(B, D))
  extra = rng.normal(size=(M, D))
  labels = rng.integers(0, 6, size=B + M).astype(np.int32)
  return z1, z2, extra, labels


def _all_losses(z1, z2, extra, labels, tau, bias, **blocks):
  """Sum of the losses (each with a different weight) and their metrics."""
  by_label = dict(negative_mask=blockwise.distinct_ids, mask_ids=(labels[:B], labels))
  results = [
      losses.info_nce(z1, z2, temperature=tau, extra_negatives=extra, **by_label, **blocks),
      losses.clip_loss(z1, z2, temperature=tau, negative_mask=threshold_mask, **blocks),
      losses.sigmoid_loss(z1, z2, temperature=tau, bias=bias, extra_negatives=extra,
                          negative_mask=threshold_mask, **blocks),
      losses.hard_negative_info_nce(z1, z2, temperature=tau, beta=0.5, tau_plus=0.1, **blocks),
  ]
  total = sum((i + 1.0) * loss for i, (loss, _) in enumerate(results))
  return total, [metrics for _, metrics in results]


def _value_and_grads(**blocks):
  fn = jax.value_and_grad(functools.partial(_all_losses, **blocks), argnums=(0, 1, 2, 4, 5),
                          has_aux=True)
  return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def _dense():
  z1, z2, extra, labels = _inputs()
  return jax.device_get(_value_and_grads()(z1, z2, extra, labels, 0.2, -2.0))


_SLOW = pytest.mark.slow  # make test-all; CI keeps the suite under 10 min


@pytest.mark.parametrize('num_devices,block_size,collective', [
    pytest.param(1, 5, 'ring', marks=_SLOW), pytest.param(1, 5, 'all_gather', marks=_SLOW),
    (2, 6, 'ring'), pytest.param(2, 6, 'all_gather', marks=_SLOW),
    (8, 3, 'ring'), (8, 3, 'all_gather')])
def test_blockwise_on_mesh_equals_dense(num_devices, block_size, collective):
  mesh = parallel.make_mesh([('data', -1)], devices=jax.devices()[:num_devices])
  sharding = parallel.data_sharding(mesh)
  z1, z2, extra, labels = _inputs()
  args = [jax.device_put(x, sharding) for x in (z1, z2)]
  args += [jax.device_put(x, parallel.replicated(mesh)) for x in (extra, labels)]
  fn = _value_and_grads(block_size=block_size, mesh=mesh, collective=collective)
  (total, metrics), grads = fn(*args, 0.2, -2.0)
  assert grads[0].sharding.spec == P(parallel.DATA)  # each device's rows keep their gradient
  (d_total, d_metrics), d_grads = _dense()
  assert total.dtype == np.float64
  float64.assert_close(total, d_total)
  for g, d_g, name in zip(grads, d_grads, ('z1', 'z2', 'extra', 'tau', 'bias')):
    float64.assert_close(g, d_g, err_msg=f'd/d{name}')
  float64.assert_close(metrics, d_metrics)


def test_blockwise_on_mesh_needs_divisible_batch():
  mesh = parallel.make_mesh([('data', -1)], devices=jax.devices()[:8])
  x = jnp.ones((12, 4))
  with pytest.raises(ValueError, match='B = 12 must be divisible by the 8 devices'):
    losses.clip_loss(x, x, temperature=0.1, block_size=4, mesh=mesh)


@pytest.mark.parametrize('collective', ['ring', 'all_gather'])
def test_per_device_temp_memory_is_linear_in_batch(collective):
  # Per device, the compiled temporaries must grow like B (chunks, gathered keys, strips of
  # rows), not like the device's B/n x B block of similarities.
  mesh = parallel.make_mesh([('data', -1)], devices=jax.devices()[:8])

  def temp_bytes(loss, b, d=32):
    z = jax.ShapeDtypeStruct((b, d), jnp.float32, sharding=parallel.data_sharding(mesh))
    fn = jax.value_and_grad(lambda x, y: loss(x, y, temperature=0.1, block_size=128, mesh=mesh,
                                              collective=collective)[0], argnums=(0, 1))
    return jax.jit(fn).lower(z, z).compile().memory_analysis().temp_size_in_bytes

  for loss in (losses.clip_loss, losses.info_nce):  # info_nce + all_gather: the fused path
    small, large = temp_bytes(loss, 4096), temp_bytes(loss, 8192)
    assert large < 2.5 * small, (loss.__name__, small, large)
    # Below a quarter of one device's B/n x B block (1024 x 8192 floats) even at this small
    # size, where the fused path's strip is 128 of the device's 1024 rows.
    assert large < 8192 // 8 * 8192 * 4 / 4, (loss.__name__, large)
