"""Metrics as JSON lines in the workdir, and a one-line progress report."""

import contextlib
import json
import os
import time

import numpy as np


class MetricWriter:
  """Appends {'step': s, **metrics} as one JSON line per call to workdir/metrics.jsonl.

  Each line is written with one write() and flushed. A run killed mid-write (or by a full
  disk) can still leave a partial last line; the next start removes it with a warning, so
  the file stays one JSON object per line.
  """

  def __init__(self, workdir, enabled=True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if enabled:
      repair_partial_line(self.path)
    self._file = open(self.path, 'a', encoding='utf-8') if enabled else None

  def write(self, step, metrics):
    if self._file is None:
      return
    row = {'step': int(step)}
    row.update({k: _scalar(v) for k, v in metrics.items()})
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None


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
          f'ETA {_duration(eta)}', flush=True)

  @contextlib.contextmanager
  def paused(self):
    start = time.perf_counter()
    yield
    self._last_time += time.perf_counter() - start
