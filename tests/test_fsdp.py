"""Sharded state (FSDP): the fsdp axis splits parameters and optimizer slots, the step stays
the one-device step, and per-device state bytes fall with the axis size.

tests/conftest.py gives 8 CPU devices. The step comparisons run in float64 (tests/float64.py),
as every other device-count test; the sharding of the state is asserted too, so an equal
result cannot come from a silently replicated state.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from contrastive import objectives
from contrastive import optim
from contrastive import parallel
from contrastive import step as step_lib
from contrastive import validate
from contrastive.losses import nt_xent
from contrastive.models import build_model
from tests import float64
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)

BATCH = 32


def _config(width=8):
  return ml_collections.ConfigDict(dict(
      model=dict(preset='', stage_sizes=(1,), width=width, block='basic', stem_strides=1,
                 head_hidden_dims=(32,), head_out_dim=16),
      optimizer=dict(name='lars', lr=0.5, scale_lr_by_batch=False, warmup_steps=1,
                     weight_decay=1e-4, momentum=0.9, batch_size=BATCH),
      augment=dict(crop_scale=(0.2, 1.0), flip=True, jitter_prob=0.8, brightness=0.4,
                   contrast=0.4, saturation=0.4, hue=0.1, gray_prob=0.2, blur_prob=0.5)))


def _run(axes, num_steps=3, devices=8):
  """num_steps SimCLR steps (ResNet + BatchNorm head, LARS) on a mesh of `axes` over the first
  `devices` devices -> (per-step metrics, final state on the host, state shardings)."""
  cfg = _config()
  mesh = parallel.make_mesh(axes, devices=jax.devices()[:devices])
  model = build_model(cfg.model)
  tx, schedule = optim.build_optimizer(cfg.optimizer, total_steps=10)
  state = step_lib.create_train_state(model, tx, (16, 16, 1), jax.random.key(0), mesh,
                                      dtype=jnp.float64)
  objective = objectives.image_views(model=model, aug_cfg=cfg.augment,
                                     loss_fn=lambda a, b: nt_xent(a, b, temperature=0.2))
  step = step_lib.jit_train_step(mesh, state, objective=objective, tx=tx, schedule=schedule)
  rng = np.random.default_rng(1)
  history = []
  for i in range(num_steps):
    batch = {'image': (rng.random((BATCH, 16, 16, 1)) * 255).astype(np.uint8)}
    state, metrics = step(state, jax.device_put(batch, parallel.data_sharding(mesh)),
                          jax.random.key(100 + i))
    history.append(jax.device_get(metrics))
  shardings = jax.tree.map(lambda x: x.sharding, state)
  return history, jax.device_get(state), shardings


@pytest.fixture(scope='module')
def one_device_run():
  return _run([('data', -1)], devices=1)


# CI runs 2x4; 1x8 and 8x1 (the data-parallel run of test_distributed.py) in `make test-all`.
@pytest.mark.parametrize('data, fsdp', [pytest.param(1, 8, marks=pytest.mark.slow), (2, 4),
                                        pytest.param(8, 1, marks=pytest.mark.slow)])
def test_fsdp_step_equals_one_device(one_device_run, data, fsdp):
  history_1, state_1, _ = one_device_run
  history_n, state_n, shardings = _run([('data', data), ('fsdp', fsdp)])
  for m1, mn in zip(history_1, history_n):
    for k in m1:
      float64.assert_close(mn[k], m1[k], err_msg=k)
  for part in ('params', 'batch_stats', 'opt_state'):
    float64.assert_close(getattr(state_n, part), getattr(state_1, part), err_msg=part)
  # The state really is split: the head's [F, 32] kernel and its LARS momentum along fsdp.
  kernel = shardings.params['head']['hidden1']['kernel']
  if fsdp > 1:
    assert kernel.spec == P(None, 'fsdp'), kernel.spec
    momenta = [s for s in jax.tree.leaves(shardings.opt_state) if 'fsdp' in s.spec]
    assert len(momenta) >= len([s for s in jax.tree.leaves(shardings.params)
                                if 'fsdp' in s.spec])
  else:
    assert kernel.spec == P()


def test_fsdp_rule():
  assert parallel.fsdp_spec((3, 3, 16, 64), 4) == P(None, None, None, 'fsdp')  # largest
  assert parallel.fsdp_spec((64, 64), 8) == P('fsdp')  # ties: the first
  assert parallel.fsdp_spec((10, 6), 4) == P()  # divides nothing: replicated
  assert parallel.fsdp_spec((), 4) == P() and parallel.fsdp_spec((2,), 4) == P()
  assert parallel.fsdp_spec((64, 64), 1) == P()
  mesh = parallel.make_mesh([('data', 2), ('fsdp', 4)])
  params = {'dense': {'kernel': np.zeros((16, 8)), 'bias': np.zeros((6,)), 'scale': np.zeros(())}}
  assert parallel.unsharded_by_fsdp(mesh, params) == ['dense/bias [6]']
  assert parallel.unsharded_by_fsdp(parallel.make_mesh([('data', -1)]), params) == []
  # The batch is split over both axes, in the same device order as batch_mesh's one axis.
  sharded = jax.device_put(np.arange(16.0), parallel.data_sharding(mesh))
  flat = jax.device_put(np.arange(16.0), parallel.data_sharding(parallel.batch_mesh(mesh)))
  assert [s.device for s in sharded.addressable_shards] == [
      s.device for s in flat.addressable_shards]
  assert [s.index for s in sharded.addressable_shards] == [s.index for s in flat.addressable_shards]


def test_mesh_config_errors():
  with pytest.raises(ValueError, match="'model' is unknown"):
    parallel.mesh_shape([('data', -1), ('model', 2)], 8)
  with pytest.raises(ValueError, match='multiply to 8'):
    parallel.mesh_shape([('data', 2), ('fsdp', 2)], 8)
  cfg = ml_collections.ConfigDict(dict(mesh=[('data', 2), ('fsdp', 4)], batch_size=12))
  with pytest.raises(validate.ConfigError, match='multiple of 8'):
    validate.validate_config(cfg, num_devices=8, num_processes=1)


def _state_bytes_per_device(fsdp):
  """Compiled memory analysis of `step.update` (AdamW: two slots per parameter) on 8 devices:
  (argument bytes per device, bytes of the whole state) for an MLP whose state dwarfs the
  batch."""
  mesh = parallel.make_mesh([('data', 8 // fsdp), ('fsdp', fsdp)])
  params = {'w1': jax.ShapeDtypeStruct((256, 512), jnp.float32),
            'b1': jax.ShapeDtypeStruct((512,), jnp.float32),
            'w2': jax.ShapeDtypeStruct((512, 128), jnp.float32)}
  tx = optax.adamw(1e-3)

  def objective(params, state, batch, rng):
    del state, rng
    h = jax.nn.relu(batch['x'] @ params['w1'] + params['b1'])
    return jnp.mean((h @ params['w2']) ** 2), ({}, {}, None)

  with jax.enable_x64(False):
    abstract = jax.eval_shape(lambda p: step_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=p, batch_stats={}, opt_state=tx.init(p),
        skipped_steps=jnp.zeros((), jnp.int32)), params)
    shardings = step_lib.state_shardings(mesh, abstract)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         abstract, shardings)
    step = step_lib.jit_train_step(mesh, state, step_fn=step_lib.update, objective=objective,
                                   tx=tx, schedule=lambda _: 1e-3)
    batch = {'x': jax.ShapeDtypeStruct((16, 256), jnp.float32,
                                       sharding=parallel.data_sharding(mesh))}
    compiled = step.lower(state, batch, jax.random.key(0)).compile()
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  return compiled.memory_analysis().argument_size_in_bytes, state_bytes


def test_state_bytes_per_device_fall_with_the_fsdp_axis():
  per_device = {n: _state_bytes_per_device(n) for n in (1, 2, 8)}
  total = per_device[1][1]
  assert per_device[1][0] >= total  # replicated: every device holds the whole state
  for n in (2, 8):  # ~1/n, up to the scalars and the batch's rows
    assert per_device[n][0] < 1.05 * total / n, (n, per_device[n][0], total)
