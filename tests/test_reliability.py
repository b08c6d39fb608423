"""Reliability of a run through `python -m contrastive.main`: the workdir's identity, lock and
checkpoints, failing fast, and the end of a run.

Black-box tests start the entry point in subprocesses on a copy of one finished 6-step run
(`finished`); each refusal happens before compiling, so most take a few seconds.
"""

import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from contrastive.data import fashion_mnist
from tests import xla_flags

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
CONFIG = os.path.join(REPO, 'configs', 'simclr_fmnist.py')
SLOW = pytest.mark.slow  # make test-all; CI keeps the suite under 10 min
pytestmark = pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_IDX_DIR),
                                reason='apt-get install dataset-fashion-mnist')


def main(workdir, tfds_dir, *flags, timeout=300, config=CONFIG + ':runlocal'):
  """Runs the entry point to its end; returns (returncode, stdout + stderr)."""
  cmd = [sys.executable, '-m', 'contrastive.main', f'--config={config}', f'--workdir={workdir}',
         f'--config.dataset.data_dir={tfds_dir}', *flags]
  env = dict(os.environ, XLA_FLAGS=xla_flags.FAST_COMPILE, JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO)
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  return out.returncode, out.stdout + out.stderr


def last_error(output):
  """The entry point's final 'ERROR: ...' line."""
  lines = [l for l in output.splitlines() if l.startswith('ERROR: ')]
  assert lines, output[-3000:]
  return lines[-1]


def listing(folder):
  return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.fixture(scope='module')
def finished(tfds_dir, tmp_path_factory):
  """A finished runlocal run (6 steps, checkpoints 3 and 6)."""
  workdir = str(tmp_path_factory.mktemp('finished') / 'run')
  rc, out = main(workdir, tfds_dir)
  assert rc == 0, out[-3000:]
  assert listing(os.path.join(workdir, 'checkpoints')) == ['3', '6']
  return workdir


@pytest.fixture
def copy(finished, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished, workdir)
  return workdir


def test_config_json_records_the_run(finished):
  with open(os.path.join(finished, 'config.json')) as f:
    saved = json.load(f)
  assert saved['model.width'] == 8 and saved['batch_size'] == 64 and saved['total_steps'] == 6
  with open(os.path.join(finished, 'config_changes.jsonl')) as f:
    starts = [json.loads(line) for line in f]
  assert starts[0]['resumed'] is False and starts[0]['devices'] >= 1


@pytest.mark.parametrize('flags, match', [
    (['--config.model.width=16'], r'model\.width: 8 -> 16.*use a new --workdir'),
    pytest.param(['--config.batch_size=128'], r'batch_size: 64 -> 128', marks=SLOW),
    (['--config.total_steps=9'], r'total_steps: 6 -> 9.*allow_config_changes=total_steps'),
    (['--config.total_steps=3', '--config.allow_config_changes=total_steps'],
     r'newest checkpoint is step 6, past this config\'s 3 steps'),
    pytest.param(['--config.allow_config_changes=model'], r'can never change on resume',
                 marks=SLOW),
])
def test_changed_config_is_refused_and_nothing_moves(copy, tfds_dir, flags, match):
  before = listing(os.path.join(copy, 'checkpoints'))
  with open(os.path.join(copy, 'config.json')) as f:
    config_before = f.read()
  rc, out = main(copy, tfds_dir, *flags)
  assert rc == 1 and re.search(match, last_error(out)), out[-3000:]
  assert 'ConfigError' in last_error(out)
  assert listing(os.path.join(copy, 'checkpoints')) == before
  assert not os.path.exists(os.path.join(copy, 'checkpoints.corrupt'))
  with open(os.path.join(copy, 'config.json')) as f:
    assert f.read() == config_before
  assert 'Traceback' not in out  # a config mistake is one line


@pytest.mark.slow  # make test-all; tests/test_run_config.py covers it fast
def test_allowed_change_resumes_and_is_recorded(copy, tfds_dir):
  rc, out = main(copy, tfds_dir, '--config.total_steps=7',
                 '--config.allow_config_changes=total_steps', '--config.eval.linear_steps=5')
  assert rc == 0, out[-3000:]
  assert 'Resumed from step 6' in out and 'step 7/7' in out
  with open(os.path.join(copy, 'config_changes.jsonl')) as f:
    last = json.loads(f.readlines()[-1])
  assert last['resumed'] and last['changes']['total_steps'] == [6, 7]
  assert last['changes']['eval.linear_steps'] == [50, 5]  # free: recorded, not refused


def test_second_run_on_a_locked_workdir_fails_at_once(copy, tfds_dir):
  lock = os.path.join(copy, 'lock')
  with open(lock, 'w') as f:  # held by a live process: this test's
    json.dump(dict(host=socket.gethostname(), pid=os.getpid(), started='now'), f)
  start = time.monotonic()
  rc, out = main(copy, tfds_dir)
  assert rc == 1 and f'process {os.getpid()} on host {socket.gethostname()}' in last_error(out)
  assert time.monotonic() - start < 60  # before any data or compilation
  assert os.path.exists(lock)  # not the second run's to remove


@pytest.mark.slow  # make test-all; tests/test_run_config.py covers it fast
def test_stale_lock_is_taken_over(copy, tfds_dir):
  dead = subprocess.Popen(['true'])
  dead.wait()
  with open(os.path.join(copy, 'lock'), 'w') as f:
    json.dump(dict(host=socket.gethostname(), pid=dead.pid, started='then'), f)
  rc, out = main(copy, tfds_dir)  # the run is complete: it evaluates step 6 and exits
  assert rc == 0, out[-3000:]
  assert 'taking over the stale lock' in out
  assert not os.path.exists(os.path.join(copy, 'lock'))  # released at the end


def _read_only(folder):
  """Makes `folder` unwritable, even for root (an immutable attribute); returns the undo."""
  if os.geteuid() != 0:
    os.chmod(folder, 0o555)
    return lambda: os.chmod(folder, 0o755)
  if subprocess.run(['chattr', '+i', folder], capture_output=True).returncode:
    pytest.skip('chattr +i is not available here')
  return lambda: subprocess.run(['chattr', '-i', folder], check=True)


def test_unwritable_checkpoint_folder_fails_fast(tfds_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  os.makedirs(os.path.join(workdir, 'checkpoints'))
  undo = _read_only(os.path.join(workdir, 'checkpoints'))
  try:
    rc, out = main(workdir, tfds_dir, timeout=240)  # used to hang at exit
  finally:
    undo()
  assert rc == 1 and 'checkpoints is not writable' in last_error(out), out[-3000:]
  assert 'step 1/' not in out  # before training
  assert len(out.splitlines()) < 40, out  # summarised, not ~1,100 lines of orbax threads


@pytest.mark.parametrize('kind', [pytest.param('empty', marks=SLOW),
                                  pytest.param('file', marks=SLOW), 'read_only'])
def test_bad_workdir_is_one_line(kind, tfds_dir, tmp_path):
  path = {'empty': '', 'file': str(tmp_path / 'f'), 'read_only': str(tmp_path / 'ro')}[kind]
  undo = lambda: None
  if kind == 'file':
    open(path, 'w').close()
  if kind == 'read_only':
    os.makedirs(path)
    undo = _read_only(path)
  try:
    rc, out = main(path, tfds_dir)
  finally:
    undo()
  assert rc == 1 and 'WorkdirError' in last_error(out) and 'Traceback' not in out, out[-3000:]


@pytest.mark.parametrize('flag, match', [
    ('--config.total_steps=-5', r'config.total_steps=-5 must be >= 0'),
    # The rest of the numeric checks are unit tests (tests/test_faults.py).
    pytest.param('--config.log_every=0', r'config.log_every=0 must be >= 1', marks=SLOW),
    pytest.param('--config.eval.knn_temperature=0.0',
                 r'config.eval.knn_temperature=0.0 must be > 0', marks=SLOW),
])
def test_nonsense_values_fail_before_anything_runs(flag, match, tfds_dir, tmp_path):
  rc, out = main(str(tmp_path / 'run'), tfds_dir, flag)
  assert rc == 1 and re.search(match, last_error(out)), out[-3000:]
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_a_cpu_host_prints_one_error_line_without_libtpu_noise(tfds_dir, tmp_path):
  """Without JAX_PLATFORMS on a host with no accelerator device file, the run selects the CPU
  platform before any backend starts: libtpu (installed for contrastive.aot) does not probe
  for TPU workers, so a config error is the run's only output line on stderr."""
  from contrastive import distributed  # pylint: disable=g-import-not-at-top
  if not distributed.cpu_only_platform(env={}):
    pytest.skip('this host has an accelerator device file')
  cmd = [sys.executable, '-m', 'contrastive.main', f'--config={CONFIG}:runlocal',
         f'--workdir={tmp_path / "run"}', f'--config.dataset.data_dir={tfds_dir}',
         "--config.mesh=(('data', 3),)"]
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  out = subprocess.run(cmd, cwd=REPO, env=dict(env, PYTHONPATH=REPO), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [last_error(out.stderr)], out.stderr[-3000:]
  assert 'has 3 devices' in out.stderr


def test_only_a_host_without_accelerators_or_a_choice_gets_the_cpu_platform():
  from contrastive import distributed  # pylint: disable=g-import-not-at-top
  none = lambda pattern: []
  assert distributed.cpu_only_platform(env={}, find=none) == 'cpu'
  assert distributed.cpu_only_platform(env={'JAX_PLATFORMS': 'tpu'}, find=none) is None
  for device in ('/dev/accel0', '/dev/vfio/0', '/dev/nvidia0'):
    find = lambda pattern, d=device: fnmatch.filter([d], pattern)
    assert distributed.cpu_only_platform(env={}, find=find) is None, device


def test_sigterm_during_start_up_exits_with_a_message(tfds_dir, tmp_path):
  cmd = [sys.executable, '-m', 'contrastive.main', f'--config={CONFIG}:runlocal',
         f'--workdir={tmp_path / "run"}', f'--config.dataset.data_dir={tfds_dir}']
  env = dict(os.environ, XLA_FLAGS=xla_flags.FAST_COMPILE, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith('Mesh '):  # the workdir is locked, the data and model not yet built
      proc.send_signal(signal.SIGTERM)
      break
  lines.extend(proc.stdout)
  out = ''.join(lines)
  assert proc.wait(timeout=300) == 0, out[-3000:]
  assert 'Stopped by SIGTERM during start-up, before step 1' in out
  assert 'step 1/' not in out
  assert not os.path.exists(tmp_path / 'run' / 'lock')


def test_installed_package_runs_from_any_folder(tmp_path):
  """`make install` installs the project: no PYTHONPATH, another working directory."""
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  out = subprocess.run([sys.executable, '-c', 'import contrastive; print(contrastive.__file__)'],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr[-2000:]
  assert os.path.realpath(out.stdout.strip()).startswith(os.path.realpath(REPO))
  out = subprocess.run([sys.executable, '-m', 'contrastive.main', '--helpfull'], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
  assert 'contrastive.main' in out.stdout and '--workdir' in out.stdout, out.stderr[-2000:]
