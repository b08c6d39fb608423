"""Two local CPU processes x 4 devices train like one process x 8 devices.

The 2-process job is started with launch/local_multiprocess.sh (jax.distributed over gloo on
127.0.0.1); both jobs run the runlocal config through contrastive.main. Each global batch holds
the same examples in the same rows in both jobs (pipeline.train_loader slices global batches by
process), and both meshes have 8 devices, so only the collectives' implementation differs
(gloo across processes, XLA's in-process all-reduce), which sums in another order. Both jobs
run in float64 (`config.dtype='float64'`), where that changes results by ~1e-15 relative, so
losses and final params are compared at tests/float64.py's rtol 1e-9 on any CPU (in float32,
AdamW's g / (sqrt(v) + eps) amplifies a 1e-7 change of a near-zero gradient without bound).
"""

import json
import signal
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from contrastive.data import fashion_mnist
from contrastive.data import pipeline
from tests import float64
from tests import test_resume
from tests import xla_flags

REPO = test_resume.REPO
CONFIG = test_resume.CONFIG
STEPS = 6
pytestmark = pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_IDX_DIR),
                                reason='apt-get install dataset-fashion-mnist')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_loader_gives_each_process_its_rows_of_the_global_batch(tfds_dir, monkeypatch):
  cfg = ml_collections.ConfigDict(dict(
      name='fashion_mnist_idx', data_dir=tfds_dir, idx_dir=fashion_mnist.DEBIAN_IDX_DIR))
  source = pipeline.get_source(cfg, 'train')
  ids = lambda: [next(it)['id'] for it in [iter(pipeline.train_loader(
      source, global_batch_size=32, seed=3))] for _ in range(3)]
  one = ids()
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  parts = []
  for p in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda p=p: p)
    parts.append(ids())
  for step in range(3):
    np.testing.assert_array_equal(np.concatenate([parts[0][step], parts[1][step]]), one[step])


@pytest.mark.slow  # ~80 s of three jax processes: make test-all; the loader's split above runs in CI
def test_two_processes_match_one(tfds_dir, tmp_path):
  args = [f'--config.dataset.data_dir={tfds_dir}', f'--config.total_steps={STEPS}',
          '--config.dtype=float64', '--config.eval.max_train_examples=400',
          '--config.eval.max_test_examples=200', '--config.eval.linear_steps=10']
  single = str(tmp_path / 'single')
  cmd = [sys.executable, '-m', 'contrastive.main', f'--config={CONFIG}:runlocal',
         f'--workdir={single}', *args]
  env = dict(os.environ, XLA_FLAGS=xla_flags.with_devices(8),
             JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]

  multi = str(tmp_path / 'multi')
  env = dict(os.environ, CONFIG=f'{CONFIG}:runlocal', WORKDIR=multi, NUM_PROCESSES='2',
             DEVICES_PER_PROCESS='4', PORT=str(_free_port()), PYTHON=sys.executable,
             PYTHONPATH=REPO)
  env['XLA_FLAGS'] = xla_flags.FAST_COMPILE  # as the single run's (the script adds the devices)
  out = subprocess.run(['bash', 'launch/local_multiprocess.sh', *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  logs = ''.join(open(os.path.join(multi, 'logs', f'process-{i}.log')).read()[-3000:]
                 for i in range(2) if os.path.exists(os.path.join(multi, 'logs', f'process-{i}.log')))
  assert out.returncode == 0, out.stderr[-2000:] + logs
  assert 'process 1 of 2, 4 local / 8 global devices' in logs

  rows_1, rows_2 = _rows(single), _rows(multi)
  losses_1 = [r['loss'] for r in rows_1 if 'loss' in r]
  losses_2 = [r['loss'] for r in rows_2 if 'loss' in r]
  assert [r['step'] for r in rows_2 if 'loss' in r] == list(range(1, STEPS + 1))  # process 0 only
  # metrics.jsonl holds Python floats: float64 values, as the runs computed them.
  float64.assert_close(np.asarray(losses_2), np.asarray(losses_1))
  assert 'knn_top1' in rows_2[-1]
  assert test_resume.saved_steps(multi)[-1] == STEPS
  with float64.enabled():
    state_1, state_2 = (test_resume.final_state(w, jnp.float64) for w in (single, multi))
  assert int(state_2.step) == STEPS
  assert jax.tree.leaves(state_1.params)[0].dtype == np.float64
  float64.assert_close(state_2.params, state_1.params)


def _start(workdir, port, process_id, args):
  """One of the 2 processes of a job, as local_multiprocess.sh starts it; output to a log."""
  env = dict(os.environ, XLA_FLAGS=xla_flags.with_devices(4),
             JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  cmd = [sys.executable, '-m', 'contrastive.main', f'--config={CONFIG}:runlocal',
         f'--workdir={workdir}', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
         f'--process_id={process_id}', *args]
  log = open(os.path.join(workdir, f'process-{process_id}.log'), 'w')
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # make test-all; CI keeps the suite under 10 min
def test_sigterm_to_one_process_checkpoints_all_then_resumes(tfds_dir, tmp_path):
  """Preemption may reach one host first: all processes agree on the step, save and exit 0."""
  args = [f'--config.dataset.data_dir={tfds_dir}', '--config.total_steps=20',
          '--config.eval.every=10']
  workdir = str(tmp_path)
  port = _free_port()
  procs = [_start(workdir, port, i, args) for i in range(2)]
  log_0 = os.path.join(workdir, 'process-0.log')
  deadline = 600
  while deadline > 0 and 'step 10/' not in open(log_0).read():
    assert all(p.poll() is None for p in procs), open(log_0).read()[-3000:]
    time.sleep(0.2)
    deadline -= 0.2
  procs[1].send_signal(signal.SIGTERM)  # SIGTERM to process 1 only, during the eval at step 10
  assert [p.wait(timeout=600) for p in procs] == [0, 0], open(log_0).read()[-3000:]
  logs = [open(os.path.join(workdir, f'process-{i}.log')).read() for i in range(2)]
  stopped = test_resume.saved_steps(workdir)[-1]
  assert 10 <= stopped < 20
  assert all(f'Preempted: saved checkpoint {stopped}' in log for log in logs)

  port = _free_port()
  procs = [_start(workdir, port, i, args) for i in range(2)]
  assert [p.wait(timeout=600) for p in procs] == [0, 0]
  logs = [open(os.path.join(workdir, f'process-{i}.log')).read() for i in range(2)]
  assert all(f'Resumed from step {stopped}' in log for log in logs)
  assert test_resume.saved_steps(workdir)[-1] == 20
  steps = [r['step'] for r in _rows(workdir) if 'loss' in r]
  assert sorted(set(steps)) == list(range(1, 21))
