"""AMCL with a momentum encoder and memory queue (configs/moco_v2_fmnist.py:loss=amcl): each
head's InfoNCE over its slice of the keys and queue with its own learned temperature, against
a NumPy re-derivation and check_grads; MoCo + AMCL steps equal on 1, 2 and 8 devices in
float64; config errors; a run through contrastive.main."""

import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from contrastive import config_lib
from contrastive import objectives
from contrastive import optim
from contrastive import step as step_lib
from contrastive import validate
from contrastive.data import fashion_mnist
from contrastive.losses import amcl
from contrastive.models import build_model
from contrastive.samplers import momentum
from contrastive.samplers import queue as queue_lib
from tests import float64
from tests import test_distributed
from tests import test_moco
from tests import xla_flags
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
B, H, D, K = 6, 3, 4, 12
METHOD = objectives.Method(name='moco', samplers=test_moco._samplers(), temperature=None,
                           amcl=dict(beta=0.1, kappa=0.5))  # pylint: disable=protected-access


def numpy_moco_amcl(q1, q2, g1, g2, queue_keys, queue_ids, ids, taus, beta=0.1, kappa=0.5):
  """From the formulas, not the module: per head h and direction (q1, g2), (q2, g1): the
  query's cosine with its own key over tau_h, against the B keys and the queue entries that
  are not the query's own instance (nor empty, id -1); -log of its softmax, mean over rows;
  the directions averaged, then the heads; plus beta mean_h (kappa log tau_h + 1 / tau_h)."""
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  total = 0.0
  for h, tau in enumerate(taus):
    cut = lambda x, h=h: unit(x[:, h * D:(h + 1) * D])
    store = queue_keys[:, h * D:(h + 1) * D]  # the queue holds normalised keys as enqueued
    directions = []
    for q, k in ((cut(q1), cut(g2)), (cut(q2), cut(g1))):
      rows = []
      for i in range(B):
        logits = [q[i] @ k[j] / tau for j in range(B)]
        logits += [q[i] @ unit(store[s]) / tau for s in range(K)
                   if queue_ids[s] not in (-1, ids[i])]
        rows.append(np.log(np.sum(np.exp(logits))) - q[i] @ k[i] / tau)
      directions.append(np.mean(rows))
    total += np.mean(directions)
  return total / len(taus) + beta * np.mean([kappa * np.log(t) + 1 / t for t in taus])


def _inputs():
  rng = np.random.default_rng(0)
  q1, q2 = rng.standard_normal((2, B, H * D))
  g1, g2 = q2 + 0.3 * rng.standard_normal((B, H * D)), q1 + 0.3 * rng.standard_normal((B, H * D))
  queue = queue_lib.init_queue(K, H * D, B, dtype=jnp.float64)
  ids = np.array([3, 7, 11, 20, 21, 22], np.int32)
  # Two batches of keys: slots hold ids 7 and 3 (queries' own instances) and others.
  queue = queue_lib.enqueue(queue, rng.standard_normal((B, H * D)),
                            np.array([7, 50, 51, 3, 52, 53], np.int32))
  queue = queue_lib.enqueue(queue, rng.standard_normal((B, H * D)), np.arange(60, 66))
  return q1, q2, g1, g2, queue, ids, np.array([0.1, 0.3, 0.6])


def _heads_loss(q1, q2, g1, g2, queue, ids, taus):
  state = types.SimpleNamespace(queue=queue, step=jnp.zeros((), jnp.int32))
  loss, (metrics, keys) = objectives._sampled_heads(  # pylint: disable=protected-access
      state, {'id': ids}, q1, q2, (g1, g2), jax.random.key(0), taus, method=METHOD)
  return loss, metrics, keys


def test_heads_match_numpy_and_check_grads():
  q1, q2, g1, g2, queue, ids, taus = _inputs()
  loss, metrics, keys = _heads_loss(*map(jnp.asarray, (q1, q2, g1, g2)), queue, ids,
                                    jnp.asarray(taus))
  want = numpy_moco_amcl(q1, q2, g1, g2, np.asarray(queue.keys), np.asarray(queue.ids), ids,
                         taus)
  float64.assert_close(loss, want)
  assert keys.shape == (B, H * D) and metrics['temperature/1'] == pytest.approx(0.3)
  # Counterexample: one temperature for every head is another loss.
  same = numpy_moco_amcl(q1, q2, g1, g2, np.asarray(queue.keys), np.asarray(queue.ids), ids,
                         np.full(H, taus.mean()))
  assert abs(float(loss) - same) > 0.05
  fn = lambda a, c, t: _heads_loss(a, c, jnp.asarray(g1), jnp.asarray(g2), queue, ids, t)[0]
  check_grads(fn, (jnp.asarray(q1), jnp.asarray(q2), jnp.asarray(taus)), order=1,
              modes=['rev'])


def _run(n, num_steps=2, block_size=None):
  """num_steps MoCo + AMCL steps (3 heads, queue of 64) on an n-device mesh."""
  cfg = test_distributed._config()  # pylint: disable=protected-access
  cfg.model.head_count = H
  mesh = test_distributed.mesh_of(n)
  model = build_model(cfg.model)
  tx, schedule = optim.build_optimizer(cfg.optimizer, total_steps=10)
  state = step_lib.create_train_state(model, tx, (16, 16, 1), jax.random.key(0), mesh, ema=True,
                                      queue_size=64, batch_size=32, dtype=jnp.float64)
  method = METHOD._replace(momentum=momentum.momentum_schedule(0.9, 10, 'cosine'),
                           block_size=block_size)
  objective = objectives.image_views(model=model, loss_fn=None, aug_cfg=cfg.augment,
                                     method=method)
  step = step_lib.jit_train_step(mesh, state, objective=objective, tx=tx, schedule=schedule,
                                 momentum=method.momentum)
  history, state = test_distributed.run_steps(step, state, mesh, num_steps, num_ids=40)
  return history, jax.device_get(state)


@pytest.fixture(scope='module')
def one_device():
  return _run(1)


@pytest.mark.parametrize('n', [2, 8])
def test_steps_equal_on_1_2_8_devices(one_device, n):
  history_1, state_1 = one_device
  history_n, state_n = _run(n, block_size=8 if n == 8 else None)  # 8: the tiled loss
  assert state_1.queue.keys.shape == (64, H * 8)  # every head's keys
  for m1, mn in zip(history_1, history_n):
    for k in ('loss', 'temperature/0', 'temperature/2', 'temperature_penalty', 'l2_grads'):
      float64.assert_close(mn[k], m1[k], err_msg=k)
  for part in ('params', 'ema_params', 'queue'):
    float64.assert_close(getattr(state_n, part), getattr(state_1, part), err_msg=part)
  start = amcl.temperature_logit(0.1)  # the heads' temperatures are learned
  assert np.all(np.abs(state_1.params['head']['temperature_logit'] - start) > 1e-6)


@pytest.mark.parametrize('variants, match', [
    ('runlocal,loss=amcl,mining', r"config.loss.name='amcl'.*the momentum encoder and queue only"),
    ('runlocal,loss=amcl,mcl', r"config.loss.name='amcl'.*the momentum encoder and queue only"),
])
def test_amcl_with_samplers_fails_before_compiling(variants, match):
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'moco_v2_fmnist.py'), variants)
  config.dataset.name = 'not_local'
  with pytest.raises(validate.ConfigError, match=match):
    validate.validate_config(config, num_devices=1, num_processes=1)


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_IDX_DIR),
                    reason='apt-get install dataset-fashion-mnist')
def test_runlocal_trains_through_main(tmp_path):
  cmd = [sys.executable, '-m', 'contrastive.main',
         f'--config={REPO}/configs/moco_v2_fmnist.py:runlocal,loss=amcl',
         f'--workdir={tmp_path / "run"}', f'--config.dataset.data_dir={tmp_path / "tfds"}']
  env = dict(os.environ, XLA_FLAGS=xla_flags.FAST_COMPILE, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  last = [r for r in rows if 'loss' in r][-1]
  assert {f'temperature/{k}' for k in range(4)} <= set(last) and 'momentum' in last
  assert 'knn_top1' in rows[-1]
