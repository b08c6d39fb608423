"""Metrics as JSON lines and TensorBoard scalars in the workdir, a one-line progress report, a
profiler trace of chosen steps, and the devices' memory in use."""

import contextlib
import json
import os
import time

import jax
import numpy as np

from contrastive.config_lib import ConfigError


class MetricWriter:
  """Appends {'step': s, **metrics} as one JSON line per call to workdir/metrics.jsonl, and
  the numeric scalars among the metrics to a TensorBoard event file beside it (same steps).

  Each line is written with one write() and flushed. A run killed mid-write (or by a full
  disk) can still leave a partial last line; the next start removes it with a warning, so
  the file stays one JSON object per line. Each start opens a new event file
  (`events.out.tfevents.*`); TensorBoard reads them together: `tensorboard --logdir WORKDIR`.
  """

  def __init__(self, workdir, enabled=True, tensorboard=True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if enabled:
      repair_partial_line(self.path)
    self._file = open(self.path, 'a', encoding='utf-8') if enabled else None
    self._events = None
    if enabled and tensorboard:
      try:
        self._events = EventWriter(workdir)
      except ImportError:  # pip install -r requirements.txt has it; `pip install .` does not
        print('WARNING: tensorboardX is not installed: metrics go to metrics.jsonl only '
              '(pip install -r requirements.txt).', flush=True)

  def drop_replayed(self, start, redone=()):
    """On resuming from the checkpoint of step `start`: removes the lines a killed run wrote
    for the steps it will run again (step > start, and at step `start` lines holding only the
    keys `redone`, e.g. a table refresh before update start + 1), so the file holds each step
    once. Returns the number of lines removed."""
    if self._file is None:
      return 0
    self._file.close()
    removed = drop_lines_after(self.path, start, set(redone))
    self._file = open(self.path, 'a', encoding='utf-8')
    return removed

  def write(self, step, metrics):
    if self._file is None:
      return
    row = {'step': int(step)}
    row.update({k: _scalar(v) for k, v in metrics.items()})
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()
    if self._events is not None:
      self._events.write(step, {k: v for k, v in row.items() if k != 'step'})

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._events is not None:
      self._events.close()
      self._events = None


class EventWriter:
  """TensorBoard scalars in `<logdir>/events.out.tfevents.*` through tensorboardX, which
  needs no TensorFlow.

  Each write() is one Event at `step` holding every numeric scalar (int, float, bool) of
  the metrics, written in the calling thread and flushed: the event file holds what
  metrics.jsonl holds, whenever the run stops. Lists (histograms) are left out.
  """

  def __init__(self, logdir):
    # pylint: disable=g-import-not-at-top
    from tensorboardX import event_file_writer
    from tensorboardX.proto import event_pb2
    from tensorboardX.proto import summary_pb2
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    # The file name has the time in seconds and the host; the suffix keeps two starts within
    # the same second (a quick resume) from writing to the same file.
    self._writer = event_file_writer.EventsWriter(
        os.path.join(logdir, 'events'), filename_suffix=f'.{time.time_ns() % 10**9:09d}')

  def write(self, step, scalars):
    values = [self._summary_pb2.Summary.Value(tag=k, simple_value=float(v))
              for k, v in scalars.items()
              if isinstance(v, (int, float))]
    if not values:
      return
    self._writer.write_event(self._event_pb2.Event(
        wall_time=time.time(), step=int(step), summary=self._summary_pb2.Summary(value=values)))
    self._writer.flush()

  def close(self):
    self._writer.close()


def repair_partial_line(path):
  """Truncates `path` after its last newline if it ends in a partial line; returns the number
  of bytes removed (0 if the file is whole or absent)."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return 0
  with open(path, 'rb+') as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) == b'\n':
      return 0
    data = f.seek(0) or f.read()
    keep = data.rfind(b'\n') + 1
    f.truncate(keep)
  print(f'WARNING: removed a partial last line of {path} ({len(data) - keep} bytes, left by an '
        'interrupted run).', flush=True)
  return len(data) - keep


def drop_lines_after(path, start, redone):
  """Rewrites `path` without its lines of step > start or of step == start with only keys in
  `redone`; returns how many were removed (with a message if any)."""
  if not os.path.exists(path):
    return 0
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  def replayed(line):
    row = json.loads(line)
    keys = set(row) - {'step'}
    return row['step'] > start or (row['step'] == start and keys and keys <= redone)
  keep = [line for line in lines if not replayed(line)]
  if len(keep) == len(lines):
    return 0
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.writelines(keep)
  os.replace(path + '.tmp', path)
  print(f'Resuming from step {start}: removed {len(lines) - len(keep)} line(s) of {path} '
        'written for the steps run again.', flush=True)
  return len(lines) - len(keep)


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


def format_metrics(step, metrics):
  """'step 100 | knn_top1 0.8312 | ...' for printing."""
  parts = [f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in metrics.items()]
  return ' | '.join([f'step {step}'] + parts)


def _duration(seconds):
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s'


class Progress:
  """Every `every` steps: writes the step's metrics and prints step, loss, steps/s, ex/s, ETA.

  Rates are measured over the last interval, excluding time spent inside `paused()` (evals).
  """

  def __init__(self, start_step, total_steps, batch_size, writer):
    self.total = total_steps
    self.batch_size = batch_size
    self.writer = writer
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def update(self, step, metrics, *, every):
    if step % every and step != self.total:
      return
    now = time.perf_counter()
    steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = (self.total - step) / max(steps_per_s, 1e-9)
    self.writer.write(step, dict(metrics, steps_per_s=steps_per_s,
                                 examples_per_s=steps_per_s * self.batch_size))
    print(f'step {step}/{self.total} | loss {float(metrics["loss"]):.4f} | '
          f'{steps_per_s:.2f} steps/s | {steps_per_s * self.batch_size:.0f} examples/s | '
          f'ETA {_duration(eta)}' + (f' | skipped_samples {int(metrics["skipped_samples"])}'
                                     if 'skipped_samples' in metrics else ''), flush=True)

  @contextlib.contextmanager
  def paused(self):
    start = time.perf_counter()
    yield
    self._last_time += time.perf_counter() - start


class StepProfiler:
  """A jax.profiler trace of steps first..last (`config.profile_steps`) in `<workdir>/profile`.

  The trace starts before the first of those steps that this start runs (so it includes the
  step's input transfer) and stops once step `last`'s results are ready; leaving the context
  (the end of the run, preemption, an error) stops a trace still open, so none is left
  running, and a trace that cannot start or be written is a warning. Steps are global: a run resumed past `last` traces nothing. Process 0 only (the
  trace holds its host's devices). jax writes `profile/plugins/profile/<time>/<host>.xplane.pb`
  and `.trace.json.gz`: `tensorboard --logdir WORKDIR` (with tensorboard-plugin-profile) or
  https://ui.perfetto.dev opens them.
  """

  def __init__(self, workdir, profile_steps=(), *, enabled=True):
    steps = tuple(profile_steps or ())
    if steps and not (len(steps) == 2 and all(isinstance(s, int) for s in steps) and
                      1 <= steps[0] <= steps[1]):
      raise ConfigError(f'config.profile_steps={profile_steps!r} must be (first, last) with '
                        '1 <= first <= last (e.g. --config.profile_steps="(10, 12)"), or () '
                        'for no trace.')
    self.steps = steps if enabled else ()
    self.directory = os.path.join(workdir, 'profile')
    self.active = False

  def before_step(self, step):
    if self.steps and not self.active and self.steps[0] <= step <= self.steps[1]:
      try:
        jax.profiler.start_trace(self.directory)
      except Exception as e:  # pylint: disable=broad-except  # e.g. a trace already running
        print(f'WARNING: no profile: jax.profiler.start_trace failed ({e}).', flush=True)
        self.steps = ()
        return
      self.active = True
      print(f'Profiling steps {step}..{self.steps[1]} into {self.directory}.', flush=True)

  def after_step(self, step, outputs):
    """Stops the trace after step `last`, once `outputs` (the step's results) are ready."""
    if self.active and step >= self.steps[1]:
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self):
    """Stops the trace if one is running; a failure to write it is a warning, not the run's
    end."""
    if not self.active:
      return
    self.active = False
    self.steps = ()  # one trace per start
    try:
      jax.profiler.stop_trace()
    except Exception as e:  # pylint: disable=broad-except
      print(f'WARNING: the profile could not be written ({e}).', flush=True)
      return
    print(f'Profile written to {self.directory}.', flush=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.stop()


MEMORY_STATS = ('bytes_in_use', 'peak_bytes_in_use')


def device_memory(devices=None):
  """{'memory/bytes_in_use_max': ..., 'memory/peak_bytes_in_use_max': ...,
  'memory/bytes_limit_min': ...}: the largest use and the smallest limit over `devices` (default:
  this process's), from `device.memory_stats()`; {} where the backend has none (CPU)."""
  stats = [d.memory_stats() for d in (jax.local_devices() if devices is None else devices)]
  stats = [s for s in stats if s]
  out = {f'memory/{k}_max': max(s[k] for s in stats) for k in MEMORY_STATS
         if stats and all(k in s for s in stats)}
  if stats and all('bytes_limit' in s for s in stats):
    out['memory/bytes_limit_min'] = min(s['bytes_limit'] for s in stats)
  return out


def log_device_memory(step, writer, devices=None, *, report_unavailable=True):
  """Prints this process's device memory after `step` and writes it as metrics; on a backend
  without memory stats prints one line saying so (if `report_unavailable`) and writes nothing."""
  devices = jax.local_devices() if devices is None else devices
  metrics = device_memory(devices)
  if not metrics:
    if report_unavailable:
      print(f'Device memory: no memory stats on {devices[0].platform} '
            '(TPU and GPU report them).', flush=True)
    return metrics
  writer.write(step, metrics)
  gib = lambda key: f'{metrics[key] / 2**30:.2f} GiB' if key in metrics else '?'
  limit = (f' of {gib("memory/bytes_limit_min")}' if 'memory/bytes_limit_min' in metrics
           else '')
  print(f'Device memory after step {step} (max over {len(devices)} local device(s)): '
        f'{gib("memory/bytes_in_use_max")} in use, peak {gib("memory/peak_bytes_in_use_max")}'
        f'{limit}.', flush=True)
  return metrics
