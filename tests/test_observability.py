"""Observability: TensorBoard scalars beside metrics.jsonl, a profiler trace of chosen steps,
and the devices' memory in use."""

import glob
import json
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive import metric_writer
from contrastive import run_config
from contrastive import train
from contrastive import validate
from tests import xla_flags
from tests.test_data import write_idx

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
CONFIG = os.path.join(REPO, 'configs', 'simclr_fmnist.py')


def read_events(logdir):
  """[(step, {tag: value})] of every scalar Event in logdir's event files, in file order.

  A TFRecord reader written from the format (u64 length, u32 masked CRC of it, the data, u32
  masked CRC of the data), checking both CRCs, with tensorboardX's Event proto classes: no
  TensorFlow or TensorBoard needed."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top
  out = []
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,), (header_crc,) = struct.unpack('Q', header), struct.unpack(
          'I', data[pos + 8:pos + 12])
      record = data[pos + 12:pos + 12 + length]
      (record_crc,) = struct.unpack('I', data[pos + 12 + length:pos + 16 + length])
      assert header_crc == masked_crc32c(header) and record_crc == masked_crc32c(record), path
      pos += 16 + length
      event = event_pb2.Event.FromString(record)
      if event.HasField('summary'):
        out.append((event.step, {v.tag: v.simple_value for v in event.summary.value}))
  return out


def _numeric(row):
  return {k: v for k, v in row.items() if k != 'step' and isinstance(v, (int, float))}


def test_event_file_holds_the_numeric_metrics(tmp_path):
  writer = metric_writer.MetricWriter(str(tmp_path))
  rows = [dict(loss=2.5, lr=np.float32(1e-3), finite=np.bool_(True), count=np.int32(7),
               hist_pos=[1, 2, 3]),
          {'random_init/knn_top1': 0.125}]
  writer.write(1, rows[0])
  writer.write(10, rows[1])
  writer.write(11, {'hist_pos': [1, 2]})  # nothing numeric: no event
  writer.close()
  assert len(glob.glob(str(tmp_path / 'events.out.tfevents.*'))) == 1
  assert read_events(str(tmp_path)) == [
      (1, dict(loss=2.5, lr=pytest.approx(1e-3, rel=1e-6), finite=1.0, count=7.0)),
      (10, {'random_init/knn_top1': 0.125})]
  # Another start writes a new file beside it; a disabled writer (processes > 0) writes none.
  metric_writer.MetricWriter(str(tmp_path)).close()
  metric_writer.MetricWriter(str(tmp_path / 'off'), enabled=False).close()
  assert len(glob.glob(str(tmp_path / 'events.out.tfevents.*'))) == 2
  assert not os.path.exists(tmp_path / 'off')


class _Device:
  platform = 'gpu'

  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    return self.stats


class _Writer:
  def __init__(self):
    self.rows = []

  def write(self, step, metrics):
    self.rows.append((step, metrics))


def test_resume_drops_the_lines_of_the_steps_run_again(tmp_path, capsys):
  """Resuming from step 3: the killed run's lines of steps 4, 5 and its refresh before update
  4 (logged at step 3) are removed; step 3's training and evaluation lines stay."""
  rows = [dict(step=2, loss=1.0), dict(step=3, loss=0.9), dict(step=3, knn_top1=0.5),
          {'step': 3, 'hard_negatives/refresh_seconds': 1.0}, dict(step=4, loss=0.8),
          dict(step=5, loss=0.7)]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  writer = metric_writer.MetricWriter(str(tmp_path), tensorboard=False)
  assert writer.drop_replayed(3, {'hard_negatives/refresh_seconds'}) == 3
  writer.write(4, dict(loss=0.8))
  writer.close()
  with open(tmp_path / 'metrics.jsonl') as f:
    assert [json.loads(line) for line in f] == rows[:3] + [dict(step=4, loss=0.8)]
  assert 'removed 3 line(s)' in capsys.readouterr().out


def test_device_memory_max_over_devices_and_none(capsys):
  gib = 2**30
  devices = [_Device(dict(bytes_in_use=1 * gib, peak_bytes_in_use=3 * gib, bytes_limit=16 * gib)),
             _Device(dict(bytes_in_use=2 * gib, peak_bytes_in_use=2 * gib, bytes_limit=15 * gib))]
  writer = _Writer()
  metrics = metric_writer.log_device_memory(1, writer, devices)
  assert metrics == {'memory/bytes_in_use_max': 2 * gib, 'memory/peak_bytes_in_use_max': 3 * gib,
                     'memory/bytes_limit_min': 15 * gib}
  assert writer.rows == [(1, metrics)]
  assert ('Device memory after step 1 (max over 2 local device(s)): 2.00 GiB in use, peak '
          '3.00 GiB of 15.00 GiB.') in capsys.readouterr().out
  # Partial stats: only what every device reports.
  assert metric_writer.device_memory([_Device(dict(bytes_in_use=5)), _Device(None)]) == {
      'memory/bytes_in_use_max': 5}
  # CPU: memory_stats() is None; one line at most, nothing written.
  cpu = [_Device(None), _Device(None)]
  cpu[0].platform = 'cpu'
  writer = _Writer()
  assert metric_writer.log_device_memory(1, writer, cpu) == {}
  assert metric_writer.log_device_memory(2, writer, cpu, report_unavailable=False) == {}
  assert writer.rows == []
  assert capsys.readouterr().out == ('Device memory: no memory stats on cpu (TPU and GPU report '
                                     'them).\n')
  assert metric_writer.device_memory(jax.local_devices()[:1]) == {}  # the real CPU device


def _trace_files(directory):
  return glob.glob(os.path.join(directory, 'plugins', 'profile', '*', '*.xplane.pb'))


def test_profiler_stops_on_an_early_exit(tmp_path, capsys):
  with pytest.raises(KeyError):
    with metric_writer.StepProfiler(str(tmp_path), (2, 4)) as profiler:
      profiler.before_step(1)
      assert not profiler.active
      profiler.before_step(2)
      assert profiler.active
      jnp.ones((8, 8)).sum().block_until_ready()
      raise KeyError('the loop ended before step 4')
  assert not profiler.active and _trace_files(str(tmp_path / 'profile'))
  jax.profiler.start_trace(str(tmp_path / 'again'))  # no trace left running
  # A trace that cannot start (here: another one is running) is a warning, not an error.
  profiler = metric_writer.StepProfiler(str(tmp_path / 'busy'), (1, 1))
  profiler.before_step(1)
  assert not profiler.active and 'WARNING: no profile' in capsys.readouterr().out
  profiler.after_step(1, None)
  jax.profiler.stop_trace()
  # Off: the steps are () or this is not process 0.
  for profiler in (metric_writer.StepProfiler(str(tmp_path / 'a'), ()),
                   metric_writer.StepProfiler(str(tmp_path / 'b'), (1, 2), enabled=False)):
    profiler.before_step(1)
    assert not profiler.active


@pytest.mark.parametrize('steps', [(3, 2), (0, 1), (5,), (1, 2, 3), (1.5, 2)])
def test_bad_profile_steps_fail_before_compiling(steps, tmp_path):
  from tests.test_configs import load_config  # pylint: disable=g-import-not-at-top
  config = load_config(CONFIG, 'runlocal')
  config.profile_steps = steps
  with pytest.raises(validate.ConfigError, match='config.profile_steps=.* must be'):
    train.train_and_evaluate(config, str(tmp_path))


def test_profile_steps_may_change_on_resume():
  run_config.check_changes({'profile_steps': ([2, 3], [10, 12])}, allowed=())


@pytest.fixture(scope='module')
def small_fmnist(tmp_path_factory):
  """dataset fields for a Fashion-MNIST-shaped set of 256 train and 200 test images: converted
  in a second, where the real one takes ~20 s."""
  idx_dir = tmp_path_factory.mktemp('idx')
  rng = np.random.default_rng(0)
  for n, images, labels in ((256, 'train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
                            (200, 't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')):
    write_idx(str(idx_dir / images), rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    write_idx(str(idx_dir / labels), np.arange(n, dtype=np.uint8) % 10)
  return dict(idx_dir=str(idx_dir), data_dir=str(tmp_path_factory.mktemp('tfds')))


@pytest.mark.slow  # make test-all; CI keeps the suite under 10 min (the writer, profiler and memory units run in CI)
def test_main_writes_events_a_trace_and_memory_line(small_fmnist, tmp_path):
  """The runlocal recipe for 4 steps through `python -m contrastive.main` (which calls
  train.train_and_evaluate), profiling steps 2..3: in a process with one CPU device, which
  compiles the step in about half the time of the test session's 8."""
  workdir = str(tmp_path / 'run')
  cmd = [sys.executable, '-m', 'contrastive.main', f'--config={CONFIG}:runlocal',
         f'--workdir={workdir}', '--config.total_steps=4', '--config.profile_steps=(2, 3)',
         '--config.checkpoint_every=100', '--config.eval.knn_k=10',
         '--config.eval.linear_steps=5', '--config.eval.batch_size=200',
         *(f'--config.dataset.{k}={v}' for k, v in small_fmnist.items())]
  env = dict(os.environ, XLA_FLAGS=xla_flags.with_devices(1), PYTHONPATH=REPO)
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout

  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3, 4]
  events = read_events(workdir)
  assert [step for step, _ in events] == [r['step'] for r in rows]  # one event per line
  for (step, scalars), row in zip(events, rows):
    expected = _numeric(row)
    assert set(scalars) == set(expected) and {'loss', 'knn_top1'} & set(expected), row
    np.testing.assert_allclose([scalars[k] for k in expected],
                               np.float32([expected[k] for k in expected]), rtol=1e-6)

  traces = _trace_files(os.path.join(workdir, 'profile'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces
  assert 'Profiling steps 2..3 into' in out and 'Profile written to' in out
  assert out.count('Device memory: no memory stats on cpu') == 1  # CPU: after step 1 only
