"""configs/siglip_webdataset.py:runlocal through `python -m contrastive.main` on shards it has
never seen: kill -9 of the whole process group (grain's workers included) and a rerun end
bitwise equal to an uninterrupted run, skipped samples counted alike; two processes train as
one; bad input is a one-line error before anything compiles."""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import test_resume
from tests import webdataset_shards as ws
from tests import xla_flags

REPO = test_resume.REPO
CONFIG = os.path.join(REPO, 'configs', 'siglip_webdataset.py')
STEPS = 12  # checkpoints every 3 (runlocal)


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  """4 training shards (one with a sample of every bad kind) and an eval shard."""
  folder = tmp_path_factory.mktemp('shards')
  ws.clean_shards(str(folder), num_shards=5, per_shard=40, height=96, width=128)
  ws.messy_shard(str(folder / '00003.tar'))
  (folder / 'classes.txt').write_text('red\ngreen\nblue\n')
  return str(folder)


def _command(workdir, shards, *extra):
  return [sys.executable, '-m', 'contrastive.main', f'--config={CONFIG}:runlocal',
          f'--workdir={workdir}', f'--config.dataset.train_shards={shards}/{{00000..00003}}.tar',
          f'--config.dataset.eval_shards={shards}/00004.tar', f'--config.total_steps={STEPS}',
          '--config.dataset.max_skipped_fraction=0.2', '--config.dataset.group_key=group',
          '--config.dataset.worker_count=1', f'--config.dataset.class_names={shards}/classes.txt',
          '--config.dataset.label_key=label', *extra]


def _env(devices=None):
  flags = xla_flags.with_devices(devices) if devices else xla_flags.FAST_COMPILE
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r for r in rows if 'loss' in r}  # a step logged twice keeps the last


def _run(cmd, env=None):
  out = subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  return out.stdout


def test_kill_9_and_rerun_is_bitwise_identical(shards, tmp_path):
  reference = str(tmp_path / 'reference')
  out = _run(_command(reference, shards))
  assert 'a2b/r@1' in out and 'zero_shot/top1' in out and f'step {STEPS}/{STEPS}' in out
  assert 'Skipped sample' in out  # the messy shard's samples are drawn and named

  workdir = str(tmp_path / 'killed')
  proc = subprocess.Popen(_command(workdir, shards), cwd=REPO, env=_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)  # its own process group: grain's workers
  for line in proc.stdout:
    if line.startswith('step 7/'):
      os.killpg(proc.pid, signal.SIGKILL)  # the host preempted: every process at once
      break
  assert proc.wait(timeout=60) == -signal.SIGKILL
  assert max(test_resume.saved_steps(workdir)) < STEPS
  out = _run(_command(workdir, shards))
  assert 'Resumed from step' in out

  expected, got = _rows(reference), _rows(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  assert [got[s]['loss'] for s in got] == [expected[s]['loss'] for s in got]
  assert [got[s]['skipped_samples'] for s in got] == [expected[s]['skipped_samples'] for s in got]
  assert expected[STEPS]['skipped_samples'] > 0
  assert json.loads(open(os.path.join(reference, 'metrics.jsonl')).readlines()[-1]) == \
      json.loads(open(os.path.join(workdir, 'metrics.jsonl')).readlines()[-1])  # final eval


def test_missing_shard_is_one_line_before_compiling(shards, tmp_path):
  cmd = _command(str(tmp_path / 'w'), shards)
  cmd[5] = f'--config.dataset.train_shards={shards}/{{00000..00009}}.tar'
  out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('ERROR: MissingDatasetError: shard') and '00005.tar' in last, last
  assert 'Traceback' not in out.stderr and 'step 1/' not in out.stdout


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow  # ~2 min of three jax processes: make test-all; the process split of the
# loader is tested in CI (test_webdataset.py)
def test_two_processes_match_one(shards, tmp_path):
  args = ['--config.dtype=float64']
  single = str(tmp_path / 'single')
  _run(_command(single, shards, *args), env=_env(devices=8))
  multi = str(tmp_path / 'multi')
  cmd = _command(multi, shards, *args)
  env = dict(os.environ, CONFIG=f'{CONFIG}:runlocal', WORKDIR=multi, NUM_PROCESSES='2',
             DEVICES_PER_PROCESS='4', PORT=str(_free_port()), PYTHON=sys.executable,
             PYTHONPATH=REPO, XLA_FLAGS=xla_flags.FAST_COMPILE)
  out = subprocess.run(['bash', 'launch/local_multiprocess.sh', *cmd[5:]], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  one, two = _rows(single), _rows(multi)
  assert sorted(two) == list(range(1, STEPS + 1))
  for s in one:
    assert two[s]['skipped_samples'] == one[s]['skipped_samples']
    np.testing.assert_allclose(two[s]['loss'], one[s]['loss'], rtol=1e-9)
