"""Memory queue, momentum encoder and the MoCo train step.

The queue against a plain-Python FIFO; the momentum schedule against its formula; the
same-instance mask of the step's objective against a NumPy InfoNCE; and two full MoCo v2 steps
(momentum encoder, queue, MoCHi, threshold mask) on 1 device with the dense loss and on 8 with
the blockwise one (and 2, dense, marked slow): equal loss, params, momentum encoder and queue.

The module runs with float64 enabled (tests/float64.py). The MoCo steps and the blockwise vs
dense comparison of every sampler run in float64: their reordered sums agree to ~1e-14, compared
at rtol 1e-9, so they hold on any CPU. The tests against NumPy formulas keep float32 inputs.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from contrastive import objectives
from contrastive import optim
from contrastive import parallel
from contrastive import step as step_lib
from contrastive.models import build_model
from contrastive.samplers import momentum
from contrastive.samplers import objective
from contrastive.samplers import queue as queue_lib
from tests import float64
from tests import test_distributed
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)


def unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_queue_is_fifo():
  k, b, d = 12, 4, 3
  queue = queue_lib.init_queue(k, d, b)
  assert not queue_lib.is_full(queue)
  reference = []  # (id, key) pairs, oldest first, at most k
  rng = np.random.default_rng(0)
  for step in range(5):
    keys = rng.normal(size=(b, d)).astype(np.float32)
    ids = np.arange(step * b, (step + 1) * b, dtype=np.int32)
    queue = jax.jit(queue_lib.enqueue)(queue, keys, ids)
    reference = (reference + list(zip(ids, unit(keys))))[-k:]
    assert int(queue.ptr) == (step + 1) * b % k
    # Slot order is a rotation of the FIFO: the oldest entry sits at ptr.
    order = (int(queue.ptr) + np.arange(k)) % k if step >= 2 else np.arange((step + 1) * b)
    np.testing.assert_array_equal(np.asarray(queue.ids)[order], [i for i, _ in reference])
    np.testing.assert_allclose(np.asarray(queue.keys)[order], [v for _, v in reference],
                               rtol=1e-6)
  assert queue_lib.is_full(queue)
  with pytest.raises(ValueError, match='multiple of the global batch'):
    queue_lib.init_queue(10, d, 4)


def test_momentum_schedules_and_ema():
  constant = momentum.momentum_schedule(0.99, 100)
  cosine = momentum.momentum_schedule(0.99, 100, 'cosine')
  for t in (0, 30, 100):
    np.testing.assert_allclose(constant(t), 0.99, rtol=1e-7)
    np.testing.assert_allclose(cosine(t), 1 - 0.01 * (np.cos(np.pi * t / 100) + 1) / 2,
                               rtol=1e-6)
  target, online = {'w': jnp.ones(3)}, {'w': jnp.zeros(3)}
  np.testing.assert_allclose(momentum.ema_update(target, online, 0.9)['w'], 0.9, rtol=1e-6)
  with pytest.raises(ValueError, match='momentum must be in'):
    momentum.momentum_schedule(1.0, 10)
  with pytest.raises(ValueError, match='unknown'):
    momentum.momentum_schedule(0.9, 10, 'linear')


def _samplers(**changes):
  cfg = dict(threshold=1.0, gist=False, gist_margin=0.0, mining_k=0, mining_skip_top=0,
             mochi=dict(num_hard=0, num_mix=0, num_query_mix=0, start_epoch=0.0),
             pos_alpha=0.0, neg_mix=0, neg_mix_alpha=1.0, histograms=False)
  cfg.update(changes)
  return ml_collections.ConfigDict(cfg)


def test_queue_entries_of_the_same_instance_are_not_negatives():
  rng = np.random.default_rng(1)
  b, k, d, tau = 4, 8, 5, 0.2
  q, keys = rng.normal(size=(2, b, d)).astype(np.float32)
  queue = queue_lib.init_queue(k, d, b)
  ids = np.array([3, 7, 11, 20], np.int32)
  queue = queue_lib.enqueue(queue, rng.normal(size=(b, d)), np.array([7, 50, 51, 3], np.int32))
  # 4 slots hold ids 7, 50, 51, 3 (two are queries' own earlier keys); 4 are still empty.
  loss, _ = objective.one_direction(jax.random.key(0), q, keys, None, None, ids, queue,
                                    cfg=_samplers(), temperature=tau, epoch=0.0)
  qn, kn, stored = unit(q), unit(keys), np.asarray(queue.keys, np.float64)
  expected = []
  for i in range(b):
    logits = [qn[i] @ kn[j] / tau for j in range(b)]
    logits += [qn[i] @ stored[s] / tau for s in range(k)
               if np.asarray(queue.ids)[s] not in (-1, ids[i])]
    expected.append(-qn[i] @ kn[i] / tau + np.log(np.sum(np.exp(logits))))
  np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)


def _moco_run(n, num_steps=2, block_size=None):
  """num_steps MoCo v2 + MoCHi steps on an n-device mesh -> (metrics per step, final state)."""
  cfg = test_distributed._config()  # pylint: disable=protected-access
  mesh = test_distributed.mesh_of(n)
  model = build_model(cfg.model)
  tx, schedule = optim.build_optimizer(cfg.optimizer, total_steps=10)
  state = step_lib.create_train_state(model, tx, (16, 16, 1), jax.random.key(0), mesh, ema=True,
                                      queue_size=64, batch_size=32, dtype=jnp.float64)
  method = objectives.Method(
      name='moco', temperature=0.2, momentum=momentum.momentum_schedule(0.9, 10, 'cosine'),
      samplers=_samplers(mochi=dict(num_hard=8, num_mix=4, num_query_mix=2, start_epoch=0.0),
                         threshold=0.9), block_size=block_size)
  objective = objectives.image_views(model=model, loss_fn=None, aug_cfg=cfg.augment,
                                     method=method)
  step = step_lib.jit_train_step(mesh, state, objective=objective, tx=tx, schedule=schedule,
                                 momentum=method.momentum)
  # Ids modulo 40: examples repeat, so the queue holds keys of the queries' own instances.
  history, state = test_distributed.run_steps(step, state, mesh, num_steps, num_ids=40)
  assert state.queue.keys.sharding.spec == parallel.data_sharding(mesh).spec
  return history, jax.device_get(state)


@pytest.fixture(scope='module')
def moco_one_device():
  return _moco_run(1)


@pytest.mark.parametrize('n', [pytest.param(2, marks=pytest.mark.slow), 8])
def test_moco_step_equal_on_1_2_8_devices(moco_one_device, n):
  history_1, state_1 = moco_one_device
  history_n, state_n = _moco_run(n, block_size=8 if n == 8 else None)  # 8: the tiled loss
  assert history_1[0]['loss'].dtype == state_1.queue.keys.dtype == np.float64
  for m1, mn in zip(history_1, history_n):
    assert set(m1) == set(mn)
    for k in m1:
      float64.assert_close(mn[k], m1[k], err_msg=k)
  for part in ('params', 'ema_params', 'ema_batch_stats', 'queue'):
    float64.assert_close(getattr(state_n, part), getattr(state_1, part), err_msg=part)


def test_moco_step_moves_the_momentum_encoder_and_fills_the_queue(moco_one_device):
  history, state = moco_one_device
  assert int(state.queue.ptr) == 0 and queue_lib.is_full(state.queue)
  np.testing.assert_array_equal(np.asarray(state.queue.ids), np.arange(64) % 40)
  assert all(np.isfinite(m['loss']) for m in history)
  np.testing.assert_allclose(history[0]['momentum'], 0.9, rtol=1e-6)
  online, ema = jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)
  assert any(not np.allclose(a, b) for a, b in zip(online, ema))  # a lagging copy, not a tie


# A 2-device ring with the masks alone runs in test_samplers.py; all samplers: make test-all.
@pytest.mark.parametrize('mesh_devices', [None, pytest.param(2, marks=pytest.mark.slow)])
def test_every_sampler_on_the_blockwise_path_equals_dense(mesh_devices):
  """Queue, same-instance/threshold/GIST/cluster masks, mining, MoCHi and feature
  transformation together: the blockwise loss (one device, or a 2-device ring) gives the dense
  loss and gradient."""
  rng = np.random.default_rng(2)
  b, k, d = 8, 16, 6
  q, keys, guide_q, guide_k = rng.normal(size=(4, b, d))  # float64
  ids = np.arange(b, dtype=np.int32)
  queue = queue_lib.init_queue(k, d, b, dtype=jnp.float64)
  for i in range(2):
    queue = queue_lib.enqueue(queue, rng.normal(size=(b, d)), np.arange(b) + 4 * i)
  clusters = jnp.asarray(rng.integers(0, 2, size=40), jnp.int32)
  cfg = _samplers(threshold=0.7, gist=True, gist_margin=0.05, mining_k=6, mining_skip_top=1,
                  mochi=dict(num_hard=4, num_mix=3, num_query_mix=2, start_epoch=0.0),
                  pos_alpha=2.0, neg_mix=4, neg_mix_alpha=1.6)
  mesh = None if mesh_devices is None else test_distributed.mesh_of(mesh_devices)

  def loss(q, block_size, mesh=None):
    return objective.one_direction(jax.random.key(3), q, keys, guide_q, guide_k, ids, queue,
                                   cfg=cfg, temperature=0.2, epoch=1.0, block_size=block_size,
                                   mesh=mesh, clusters=clusters)[0]

  dense = jax.jit(jax.value_and_grad(functools.partial(loss, block_size=None)))(q)
  blocks = jax.jit(jax.value_and_grad(functools.partial(loss, block_size=4, mesh=mesh)))(q)
  assert dense[0].dtype == dense[1].dtype == np.float64
  float64.assert_close(blocks, dense)
  assert np.isfinite(dense[0]) and np.abs(dense[1]).max() > 0
