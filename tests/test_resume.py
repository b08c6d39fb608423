"""Exact resume through the real entry point: kill, preempt or corrupt a run, rerun, compare.

Each test runs `python -m contrastive.main --config configs/simclr_fmnist.py:runlocal` in
subprocesses and compares with one uninterrupted run of the same command: the final params
(restored with contrastive.checkpoint) must be bitwise equal and every step's loss equal.

Deterministic settings this relies on (and that a user must keep to reproduce a run bit for
bit): the same backend (CPU here: XLA CPU kernels are deterministic for a fixed program), the
same device count and mesh (contrastive.main's default on CPU, one device per core, for every
run of one test; a different count changes reduction order), the same XLA_FLAGS otherwise, the
same jax/jaxlib version and the same config. The step rng is fold_in(seed, step) and the grain
iterator state is saved with the train state, so no state lives outside the checkpoint.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from contrastive import checkpoint
from contrastive import optim
from contrastive import parallel
from contrastive import step as step_lib
from contrastive.data import fashion_mnist
from contrastive.models import build_model
from tests import xla_flags

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
CONFIG = os.path.join(REPO, 'configs', 'simclr_fmnist.py')
TOTAL = 20  # checkpoints every 3 steps (runlocal), evals at 10 and 20
STOP_AT = 10  # the signal is sent when step 10 is printed, i.e. during the eval at step 10
pytestmark = pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_IDX_DIR),
                                reason='apt-get install dataset-fashion-mnist')


def _command(workdir, tfds_dir):
  return [sys.executable, '-m', 'contrastive.main', f'--config={CONFIG}:runlocal',
          f'--workdir={workdir}', f'--config.dataset.data_dir={tfds_dir}',
          f'--config.total_steps={TOTAL}', '--config.eval.every=10']


def _env():
  # No device count: contrastive.main's default, one CPU device per core (as many as divide the
  # batches), the same for every run of a test on one machine.
  return dict(os.environ, XLA_FLAGS=xla_flags.FAST_COMPILE,
              JAX_PLATFORMS='cpu', PYTHONPATH=REPO)


def run(workdir, tfds_dir, cwd=REPO):
  """Runs the command to completion (from `cwd`); returns its stdout."""
  out = subprocess.run(_command(workdir, tfds_dir), cwd=cwd, env=_env(), capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  return out.stdout


def run_and_signal(workdir, tfds_dir, sig, at_step=STOP_AT):
  """Starts the command and sends `sig` when it prints `step {at_step}/`; returns (rc, stdout)."""
  proc = subprocess.Popen(_command(workdir, tfds_dir), cwd=REPO, env=_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(f'step {at_step}/'):
      proc.send_signal(sig)
      break
  lines.extend(proc.stdout)
  return proc.wait(timeout=600), ''.join(lines)


def losses(workdir):
  """{step: loss} (a step logged twice would keep the last)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


def metric_keys(workdir):
  """[(step, sorted keys)] of every metrics.jsonl line, in order."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], sorted(r)) for r in map(json.loads, f)]


def saved_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())


def final_state(workdir, dtype=jnp.float32):
  """The newest checkpoint's TrainState, restored with contrastive.checkpoint onto the host
  (a run with config.dtype='float64': dtype=jnp.float64, under float64.enabled())."""
  from tests.test_configs import load_config  # pylint: disable=g-import-not-at-top
  config = load_config(CONFIG, 'runlocal')
  mesh = parallel.make_mesh(config.mesh, devices=jax.devices()[:1])
  tx, _ = optim.build_optimizer(
      ml_collections.ConfigDict(dict(config.optimizer, batch_size=config.batch_size)), TOTAL)
  state = step_lib.create_train_state(build_model(config.model), tx, (28, 28, 1),
                                   jax.random.key(0), mesh, dtype=dtype)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), save_every=1, keep=None)
  state, _ = ckpt.restore_latest(state)
  ckpt.close()
  return jax.device_get(state)


def assert_bitwise_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    assert np.array_equal(x, y), np.max(np.abs(np.asarray(x, np.float64) - y))


@pytest.fixture(scope='module')
def reference(tfds_dir, tmp_path_factory):
  """One uninterrupted run: (workdir, {step: loss}, final state). As in the README's command,
  --workdir is relative, and the command runs from outside the checkout."""
  base = tmp_path_factory.mktemp('reference')
  out = run('run', tfds_dir, cwd=str(base))
  assert f'step {TOTAL}/{TOTAL}' in out and 'knn_top1' in out, out[-2000:]
  devices = parallel.default_cpu_devices([64, 200], env={}) or 1  # runlocal's batch sizes
  assert f"Mesh {{'data': {devices}}} over {devices} cpu devices" in out, out[:2000]
  workdir = str(base / 'run')
  return workdir, losses(workdir), final_state(workdir)


def test_sigkill_then_rerun_is_bitwise_identical(reference, tfds_dir, tmp_path):
  _, ref_losses, ref_state = reference
  workdir = str(tmp_path)
  rc, _ = run_and_signal(workdir, tfds_dir, signal.SIGKILL)
  assert rc == -signal.SIGKILL
  assert saved_steps(workdir) and max(saved_steps(workdir)) < TOTAL  # killed mid-run
  assert losses(workdir) == {s: ref_losses[s] for s in range(1, STOP_AT + 1)}
  out = run(workdir, tfds_dir)
  assert 'Resumed from step' in out
  assert losses(workdir) == ref_losses
  # Each step once: the killed run's lines of the replayed steps were removed on resume, so
  # the file has the uninterrupted run's lines (clock readings aside).
  assert 'line(s) of' in out and 'written for the steps run again' in out
  assert metric_keys(workdir) == metric_keys(reference[0])
  # A save cut short by the kill leaves an orbax tmp folder; the rerun removes it.
  assert not [d for d in os.listdir(os.path.join(workdir, 'checkpoints')) if not d.isdigit()]
  state = final_state(workdir)
  assert int(state.step) == TOTAL
  assert_bitwise_equal(state, ref_state)


@pytest.mark.slow  # make test-all; CI keeps the suite under 10 min
def test_sigterm_saves_then_rerun_is_bitwise_identical(reference, tfds_dir, tmp_path):
  _, ref_losses, ref_state = reference
  workdir = str(tmp_path)
  rc, out = run_and_signal(workdir, tfds_dir, signal.SIGTERM)
  assert rc == 0, out[-3000:]
  assert f'Preempted: saved checkpoint {STOP_AT}' in out
  assert max(saved_steps(workdir)) == STOP_AT
  out = run(workdir, tfds_dir)
  assert f'Resumed from step {STOP_AT}' in out
  assert losses(workdir) == ref_losses
  assert_bitwise_equal(final_state(workdir), ref_state)


def test_truncated_newest_checkpoint_falls_back(reference, tfds_dir, tmp_path):
  ref_workdir, ref_losses, ref_state = reference
  workdir = str(tmp_path / 'run')
  shutil.copytree(ref_workdir, workdir)
  newest, previous = saved_steps(workdir)[-2:][::-1]
  data_dir = os.path.join(workdir, 'checkpoints', str(newest), 'state', 'ocdbt.process_0', 'd')
  for name in os.listdir(data_dir):  # every data file: ocdbt may hold files no array reads
    with open(os.path.join(data_dir, name), 'r+b') as f:
      f.truncate(os.path.getsize(os.path.join(data_dir, name)) // 2)
  out = run(workdir, tfds_dir)
  assert f'falling back from corrupt checkpoint {newest} to step {previous}' in out
  assert f'Resumed from step {previous}' in out
  assert os.path.isdir(os.path.join(workdir, 'checkpoints.corrupt', str(newest)))
  assert saved_steps(workdir)[-1] == TOTAL
  assert losses(workdir) == ref_losses
  assert_bitwise_equal(final_state(workdir), ref_state)


@pytest.mark.slow  # make test-all; CI keeps the suite under 10 min
def test_missing_state_folder_falls_back(reference, tfds_dir, tmp_path):
  ref_workdir, _, ref_state = reference
  workdir = str(tmp_path / 'run')
  shutil.copytree(ref_workdir, workdir)
  newest, previous = saved_steps(workdir)[-2:][::-1]
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(newest), 'state'))
  out = run(workdir, tfds_dir)
  assert f'falling back from corrupt checkpoint {newest} to step {previous}' in out
  assert_bitwise_equal(final_state(workdir), ref_state)
