"""BECLR's DyCE memory (contrastive/samplers/dyce.py) and its pseudo-positives in InfoNCE.

Each piece against a plain NumPy re-derivation written from the paper's description (nearest
prototype, then the cluster's nearest items; Sinkhorn-Knopp's scaling form for the balanced
assignment; cluster means; SupCon's multi-positive loss), the loss's gradients by
check_grads, a SimCLR + DyCE train step on 1, 2 and 8 devices in float64 (dense and blockwise),
config errors before compiling, and `:beclr` through contrastive.main.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import ml_collections
import numpy as np
import pytest

from contrastive import config_lib
from contrastive import objectives
from contrastive import optim
from contrastive import step as step_lib
from contrastive import validate
from contrastive.data import fashion_mnist
from contrastive.models import build_model
from contrastive.samplers import dyce
from contrastive.samplers import objective
from tests import float64
from tests import test_distributed
from tests import test_moco
from tests import xla_flags
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _memory(rng, m=24, d=6, p=3, count=None, ready=True):
  keys = unit(rng.normal(size=(m, d)))
  return dyce.DyCE(keys=jnp.asarray(keys), labels=jnp.asarray(rng.integers(0, p, m), jnp.int32),
                   prototypes=jnp.asarray(rng.normal(size=(p, d))),
                   ptr=jnp.zeros((), jnp.int32), count=jnp.asarray(m if count is None else count,
                                                                  jnp.int32),
                   ready=jnp.asarray(ready))


def numpy_neighbours(mem, keys, n):
  """For each key: its nearest prototype by cosine; the written items of that cluster by
  decreasing cosine, then the other written items by decreasing cosine; the first n."""
  bank, labels = np.asarray(mem.keys), np.asarray(mem.labels)
  protos, count = unit(mem.prototypes), int(mem.count)
  out = []
  for k in unit(keys):
    c = np.argmax(protos @ k)
    sims = bank @ k
    inside = sorted((j for j in range(count) if labels[j] == c), key=lambda j: -sims[j])
    rest = sorted((j for j in range(count) if labels[j] != c), key=lambda j: -sims[j])
    out.append(bank[(inside + rest)[:n]])
  return np.stack(out)


def test_neighbours_are_the_nearest_of_the_key_cluster_then_the_rest():
  rng = np.random.default_rng(0)
  mem = _memory(rng)
  keys = rng.normal(size=(5, 6))
  for n in (2, 12):  # 12: more than a cluster of ~8 holds, so the rest fills up
    got, valid = dyce.neighbours(mem, keys, n)
    np.testing.assert_allclose(got, numpy_neighbours(mem, keys, n), rtol=1e-12)
    assert np.all(valid)
  partial = mem.replace(count=jnp.asarray(10, jnp.int32))  # only 10 slots written
  got, valid = dyce.neighbours(partial, keys, 12)
  np.testing.assert_allclose(got[:, :10], numpy_neighbours(partial, keys, 10), rtol=1e-12)
  assert np.all(valid[:, :10]) and not np.any(valid[:, 10:])
  assert not np.any(dyce.neighbours(mem.replace(ready=jnp.asarray(False)), keys, 2)[1])


def numpy_sinkhorn(scores, epsilon, iterations):
  """Scaling form: Q = exp(S / eps) / sum; repeat: each column (prototype) to total 1/P,
  each row (point) to 1/B; argmax of each row."""
  q = np.exp((scores - scores.max()) / epsilon)
  q /= q.sum()
  b, p = q.shape
  for _ in range(iterations):
    q /= q.sum(axis=0, keepdims=True) * p
    q /= q.sum(axis=1, keepdims=True) * b
  return q.argmax(axis=1)


def test_sinkhorn_assignment_is_balanced_where_argmax_is_not():
  rng = np.random.default_rng(1)
  b, p = 64, 4
  scores = rng.normal(size=(b, p)) * 0.1
  scores[:, 0] += 0.5  # every point prefers prototype 0
  got = np.asarray(dyce.sinkhorn_assign(jnp.asarray(scores), epsilon=0.05, iterations=10))
  np.testing.assert_array_equal(got, numpy_sinkhorn(scores, 0.05, 10))
  assert np.all(np.argmax(scores, 1) == 0)  # the greedy assignment: one cluster
  assert np.all(np.bincount(got, minlength=p) >= b // p - 4)  # balanced: ~16 each


def test_update_writes_the_oldest_slots_and_moves_the_prototypes():
  rng = np.random.default_rng(2)
  mem = _memory(rng, m=24, d=6, p=3).replace(ptr=jnp.asarray(8, jnp.int32))
  mem = mem.replace(labels=jnp.asarray(np.r_[np.zeros(12), np.ones(12)], jnp.int32))
  keys = rng.normal(size=(8, 6))
  new = dyce.update(mem, keys, jax.random.key(0), momentum=0.25, epsilon=0.05,
                    sinkhorn_iterations=10)
  protos = np.asarray(mem.prototypes)
  labels = numpy_sinkhorn(unit(keys) @ unit(protos).T, 0.05, 10)
  bank, all_labels = np.asarray(mem.keys).copy(), np.asarray(mem.labels).copy()
  bank[8:16], all_labels[8:16] = unit(keys), labels
  np.testing.assert_allclose(new.keys, bank, rtol=1e-12)
  np.testing.assert_array_equal(new.labels, all_labels)
  means = np.stack([bank[all_labels == c].mean(0) if np.any(all_labels == c) else protos[c]
                    for c in range(3)])
  float64.assert_close(np.asarray(new.prototypes), 0.25 * protos + 0.75 * means)
  assert int(new.ptr) == 16 and int(new.count) == 24 and bool(new.ready)


def test_the_partition_starts_with_kmeans_when_the_memory_first_fills():
  rng = np.random.default_rng(3)
  mem = dyce.init_dyce(16, 4, 2, 8, dtype=jnp.float64)
  centres = np.array([[5.0, 0, 0, 0], [0, 5.0, 0, 0]])
  for step in range(2):
    keys = centres[np.arange(8) % 2] + rng.normal(size=(8, 4)) * 0.3
    mem = dyce.update(mem, keys, jax.random.key(step))
    assert bool(mem.ready) == (step == 1), step  # full after the second write
  labels, bank = np.asarray(mem.labels), np.asarray(mem.keys)
  assert set(labels[0::2]) != set(labels[1::2]) and len(set(labels[0::2])) == 1  # the 2 blobs
  nearest = np.argmin(((bank[:, None] - np.asarray(mem.prototypes)[None]) ** 2).sum(-1), 1)
  np.testing.assert_array_equal(labels, nearest)  # Lloyd's: each item at its nearest centre


def numpy_multi_positive(q, k, pseudo, valid, tau):
  """-1/|P_i| sum_{p in P_i} log(exp(s_ip/tau) / sum_{a in A_i} exp(s_ia/tau)), A_i: the B keys
  and the valid pseudo-positives of i; P_i: k_i and the valid pseudo-positives of i."""
  q, k, pseudo = unit(q), unit(k), unit(pseudo)
  losses = []
  for i in range(len(q)):
    positives = [k[i]] + [pseudo[i, j] for j in range(pseudo.shape[1]) if valid[i, j]]
    cands = list(k) + [pseudo[i, j] for j in range(pseudo.shape[1]) if valid[i, j]]
    log_z = np.log(np.sum([np.exp(q[i] @ c / tau) for c in cands]))
    losses.append(-np.mean([q[i] @ p / tau - log_z for p in positives]))
  return np.mean(losses)


def _cfg(topk, start_epoch=0.0):
  return test_moco._samplers(dyce=dict(topk=topk, start_epoch=start_epoch))  # pylint: disable=protected-access


def test_pseudo_positives_in_the_loss_against_numpy_and_check_grads():
  rng = np.random.default_rng(4)
  b, d, tau = 6, 6, 0.2
  mem = _memory(rng, m=24, d=d, p=3, count=2)  # 2 written: each row gets 2 of 3 valid items
  q, k = rng.normal(size=(2, b, d))
  ids = np.arange(b, dtype=np.int32)
  loss_fn = lambda q, cfg: objective.one_direction(
      jax.random.key(0), q, k, None, None, ids, None, cfg=cfg, temperature=tau, epoch=1.0,
      memory=mem)
  loss, metrics = loss_fn(q, _cfg(3))
  pseudo, valid = dyce.neighbours(mem, k, 3)
  assert 0 < np.sum(valid) < valid.size
  np.testing.assert_allclose(loss, numpy_multi_positive(q, k, np.asarray(pseudo),
                                                       np.asarray(valid), tau), rtol=1e-12)
  np.testing.assert_allclose(metrics['pseudo_positives'], np.mean(np.sum(valid, 1)))
  plain = numpy_multi_positive(q, k, np.asarray(pseudo), np.zeros_like(valid), tau)
  assert abs(float(loss) - plain) > 1e-2  # the pseudo-positives change the loss
  np.testing.assert_allclose(loss_fn(q, _cfg(3, start_epoch=2.0))[0], plain, rtol=1e-12)
  check_grads(lambda q: loss_fn(q, _cfg(3))[0], (jnp.asarray(q),), order=2,
              modes=('rev',))


def _run(n, num_steps=4, block_size=None):
  """SimCLR + DyCE (memory of 64 keys in 4 clusters: full after two steps, pseudo-positives
  in steps 3 and 4) on an n-device mesh -> (metrics per step, final state)."""
  cfg = test_distributed._config()  # pylint: disable=protected-access
  mesh = test_distributed.mesh_of(n)
  model = build_model(cfg.model)
  tx, schedule = optim.build_optimizer(cfg.optimizer, total_steps=10)
  state = step_lib.create_train_state(model, tx, (16, 16, 1), jax.random.key(0), mesh,
                                      batch_size=32, dtype=jnp.float64, dyce=(64, 4))
  method = objectives.Method(name='simclr', temperature=0.2, block_size=block_size,
                             samplers=_cfg(3))
  obj = objectives.image_views(model=model, loss_fn=None, aug_cfg=cfg.augment, method=method)
  update = lambda mem, keys, rng: dyce.update(mem, keys, rng, momentum=0.5, kmeans_iters=3)
  step = step_lib.jit_train_step(mesh, state, objective=obj, tx=tx, schedule=schedule,
                                 memory_update=update)
  history, state = test_distributed.run_steps(step, state, mesh, num_steps, num_ids=1000)
  return history, jax.device_get(state)


@pytest.fixture(scope='module')
def one_device():
  return _run(1)


@pytest.mark.parametrize('n', [pytest.param(2, marks=pytest.mark.slow), 8])
def test_step_equal_on_1_2_8_devices(one_device, n):
  history_1, state_1 = one_device
  assert [float(m['pseudo_positives']) for m in history_1] == [0, 0, 3, 3]
  assert bool(state_1.dyce.ready) and history_1[0]['loss'].dtype == np.float64
  history_n, state_n = _run(n, block_size=8 if n == 8 else None)  # 8: the tiled loss
  for m1, mn in zip(history_1, history_n):
    for key in m1:
      float64.assert_close(mn[key], m1[key], err_msg=key)
  for part in ('params', 'batch_stats', 'dyce'):
    float64.assert_close(getattr(state_n, part), getattr(state_1, part), err_msg=part)


@pytest.mark.parametrize('changes, match', [
    ({'size': 100}, r'queue size K=100 must be a positive multiple of the global batch'),
    ({'num_clusters': 1}, r'num_clusters=1 must satisfy 2 <= P'),
    ({'topk': 0}, r'topk=0 must satisfy 1 <= n'),
    ({'epsilon': 0.0}, r'epsilon=0.0 must be > 0'),
    ({'momentum': 1.0}, r'momentum=1.0 in \[0, 1\)'),
    ({'start_epoch': -1.0}, r'start_epoch=-1.0 must be >= 0'),
])
def test_bad_dyce_configs_fail_before_compiling(changes, match):
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'simclr_fmnist.py'),
                                  'runlocal,beclr')
  config.dataset.name = 'not_local'
  config.samplers.dyce.update(changes)
  with pytest.raises(validate.ConfigError, match=match):
    validate.validate_config(config, num_devices=1, num_processes=1)


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_IDX_DIR),
                    reason='apt-get install dataset-fashion-mnist')
def test_beclr_runlocal_trains_through_main(tmp_path):
  cmd = [sys.executable, '-m', 'contrastive.main',
         f'--config={REPO}/configs/simclr_fmnist.py:runlocal,beclr',
         f'--workdir={tmp_path / "run"}', f'--config.dataset.data_dir={tmp_path / "tfds"}']
  env = dict(os.environ, XLA_FLAGS=xla_flags.FAST_COMPILE, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    steps = [json.loads(line) for line in f if '"loss"' in line]
  assert [s['pseudo_positives'] for s in steps][:2] == [0, 0]  # the memory fills in 2 steps
  assert steps[-1]['pseudo_positives'] == 2 and np.isfinite(steps[-1]['loss'])
