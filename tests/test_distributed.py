"""Device-count invariance: the loss and the full train step on 1, 2 and 8 CPU devices.

tests/conftest.py gives the process 8 virtual CPU devices; a mesh over the first n of them is
an n-device run. Everything here runs in float64 (tests/float64.py: reordered sums agree to
~1e-14, compared at rtol 1e-9), so the checks hold on any CPU. A per-device NT-Xent
(negatives never cross devices) is run too, to show the comparison is sharp enough to catch it.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive import objectives
from contrastive import optim
from contrastive import parallel
from contrastive import step as step_lib
from contrastive.losses import nt_xent
from contrastive.models import build_model
from tests import float64
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)

DEVICE_COUNTS = (1, 2, 8)


def mesh_of(n):
  assert jax.device_count() >= 8, 'tests/conftest.py should have set 8 CPU devices'
  return parallel.make_mesh([('data', -1)], devices=jax.devices()[:n])


def test_loss_and_grads_equal_on_1_2_8_devices():
  rng = np.random.default_rng(0)
  z1, z2 = (rng.normal(size=(32, 16)) for _ in range(2))  # float64
  fn = jax.value_and_grad(lambda a, b: nt_xent(a, b, temperature=0.2)[0], argnums=(0, 1))
  results = []
  for n in DEVICE_COUNTS:
    sharding = parallel.data_sharding(mesh_of(n))
    a, b = jax.device_put(z1, sharding), jax.device_put(z2, sharding)
    results.append(jax.device_get(jax.jit(fn)(a, b)))
  assert results[0][0].dtype == np.float64
  for loss_grads in results[1:]:
    float64.assert_close(loss_grads, results[0])


def _config():
  return ml_collections.ConfigDict(dict(
      model=dict(preset='', stage_sizes=(1,), width=4, block='basic', stem_strides=1,
                 head_hidden_dims=(16,), head_out_dim=8),
      optimizer=dict(name='lars', lr=0.5, scale_lr_by_batch=False, warmup_steps=1,
                     weight_decay=1e-4, momentum=0.9, batch_size=32),
      augment=dict(crop_scale=(0.2, 1.0), flip=True, jitter_prob=0.8, brightness=0.4,
                   contrast=0.4, saturation=0.4, hue=0.1, gray_prob=0.2, blur_prob=0.5)))


def _batches(num_steps, batch_size=32):
  rng = np.random.default_rng(1)
  # Each quarter of a batch has its own brightness range, so per-device BatchNorm statistics
  # would differ from global ones.
  scale = np.repeat(np.array([40, 100, 180, 255]), batch_size // 4)[:, None, None, None]
  return [{'image': (rng.random((batch_size, 16, 16, 1)) * scale).astype(np.uint8)}
          for _ in range(num_steps)]


def _run(n, loss_fn=None, num_steps=3):
  """num_steps train steps on an n-device mesh; returns (per-step metrics, final state) on host."""
  cfg = _config()
  mesh = mesh_of(n)
  model = build_model(cfg.model)
  tx, schedule = optim.build_optimizer(cfg.optimizer, total_steps=10)
  state = step_lib.create_train_state(model, tx, (16, 16, 1), jax.random.key(0), mesh,
                                   dtype=jnp.float64)
  loss_fn = loss_fn(mesh) if loss_fn else functools.partial(nt_xent, temperature=0.2)
  objective = objectives.image_views(model=model, loss_fn=loss_fn, aug_cfg=cfg.augment)
  step = step_lib.jit_train_step(mesh, state, objective=objective, tx=tx, schedule=schedule)
  history, state = run_steps(step, state, mesh, num_steps)
  return history, jax.device_get(state)


def run_steps(step, state, mesh, num_steps, num_ids=None):
  """num_steps calls of the jitted `step` on `_batches` (with example ids modulo num_ids, if
  given) -> (per-step metrics on the host, the final state on the devices)."""
  history = []
  for i, batch in enumerate(_batches(num_steps)):
    if num_ids:
      batch['id'] = np.arange(i * len(batch['image']), (i + 1) * len(batch['image']),
                              dtype=np.int32) % num_ids
    batch = jax.device_put(batch, parallel.data_sharding(mesh))
    state, metrics = step(state, batch, jax.random.key(100 + i))
    history.append(jax.device_get(metrics))
  return history, state


@pytest.fixture(scope='module')
def one_device_run():
  return _run(1)


# CI runs 1 vs 8 devices; 2 devices (as the loss-level test above) in `make test-all`.
@pytest.mark.parametrize('n', [pytest.param(2, marks=pytest.mark.slow), 8])
def test_train_step_equal_on_1_2_8_devices(one_device_run, n):
  history_1, state_1 = one_device_run
  history_n, state_n = _run(n)
  assert history_1[0]['loss'].dtype == np.float64
  for m1, mn in zip(history_1, history_n):
    assert set(m1) == set(mn)
    for k in m1:
      float64.assert_close(mn[k], m1[k], err_msg=k)
  for part in ('params', 'batch_stats', 'opt_state'):
    float64.assert_close(getattr(state_n, part), getattr(state_1, part), err_msg=part)
  assert int(state_n.step) == 3


def _per_device_nt_xent(mesh):
  """The bug the test must catch: each device's views only see that device's negatives."""

  def local(z1, z2):
    loss, _ = nt_xent(z1, z2, temperature=0.2)
    return jax.lax.pmean(loss, parallel.DATA)

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(parallel.DATA), P(parallel.DATA)),
                     out_specs=P())
  return lambda z1, z2: (fn(z1, z2), {})


@pytest.mark.slow  # the same counterexample at the loss level runs in test_losses_distributed.py
def test_per_device_negatives_are_caught(one_device_run):
  history_1, state_1 = one_device_run
  history_bug, state_bug = _run(8, loss_fn=_per_device_nt_xent, num_steps=1)
  # 8 devices x 4 examples: each view has 6 negatives instead of 62, so the loss is far lower.
  # A margin of > 1 against the rtol of 1e-9 the step comparison uses.
  assert history_1[0]['loss'] - history_bug[0]['loss'] > 1.0
  with pytest.raises(AssertionError):
    float64.assert_close(history_bug[0]['loss'], history_1[0]['loss'])
  # The same per-device loss on one device is the global loss: the check compares like with like.
  history_bug_1, _ = _run(1, loss_fn=_per_device_nt_xent, num_steps=1)
  float64.assert_close(history_bug_1[0]['loss'], history_1[0]['loss'])


def test_batchnorm_statistics_are_global():
  """BatchNorm's batch statistics on 8 devices equal a NumPy mean/var over the global batch."""
  cfg = _config()
  model = build_model(cfg.model)
  x = _batches(1)[0]['image'].astype(np.float64)
  variables = float64.cast(model.init(jax.random.key(0), x[:2], train=False))
  mesh = mesh_of(8)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[1])
  stats = jax.device_get(apply(variables, jax.device_put(x, parallel.data_sharding(mesh))))
  # The stem's output is a plain conv of the input, so its statistics can be recomputed here.
  kernel = np.asarray(variables['params']['encoder']['stem']['kernel'])
  conv = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  conv = np.asarray(conv)
  assert conv.dtype == np.float64
  momentum = 0.9  # running = momentum * init + (1 - momentum) * batch
  bn = stats['batch_stats']['encoder']['stem_bn']
  float64.assert_close(bn['mean'], (1 - momentum) * conv.mean(axis=(0, 1, 2)))
  float64.assert_close(bn['var'], momentum + (1 - momentum) * conv.var(axis=(0, 1, 2)))
  # Per-device statistics (4 rows each, of different brightness) would be far off.
  local = conv[:4].mean(axis=(0, 1, 2))
  assert np.max(np.abs((1 - momentum) * (local - conv.mean(axis=(0, 1, 2))))) > 1e-3


def test_default_cpu_devices_one_per_core_dividing_the_batches():
  """contrastive.main's default on CPU: one device per core, unless that does not divide the
  batches or the user chose a count (the invariance tests above make any count give the same
  results)."""
  count = parallel.default_cpu_devices
  assert count([256, 1000], cores=2, env={}) == 2
  assert count([256, 1000], cores=6, env={}) == 4  # 6 and 5 do not divide 256
  assert count([64, 200], cores=16, env={}) == 8  # 16 does not divide 200
  assert count([256], cores=1, env={}) is None
  assert count([255, 1000], cores=2, env={}) is None  # an odd batch stays on one device
  chosen = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  assert count([256], cores=8, env=chosen) is None
  assert count([256], cores=8, env={'JAX_NUM_CPU_DEVICES': '3'}) is None
