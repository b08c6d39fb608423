"""Interleaved benchmark workers: each implementation in its own process, driven a step at a time.

The protocol of `benchmarks/step_vs_torch.py` and `benchmarks/two_tower_step.py`. A benchmark
script is both the orchestrator and, started with `--worker POINT_JSON`, one worker:

  worker side:       serve(run, count)   answers 'step i' with run(i) (a dict with 'time_s' and
                                         anything else, one JSON line) until 'exit', then its
                                         peak RSS
  orchestrator side: Worker(python, script, point).step(i) -> that dict; .close() -> peak RSS

Each worker has its own thread pools and peak RSS, and the orchestrator sends one step to each
worker in turn, so a shared machine's drift hits all implementations alike.
"""

import json
import os
import resource
import subprocess
import sys


def cores():
  """The cores this process may run on (its CPU affinity where the OS has one)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def peak_rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB


def serve(run, count):
  """Worker loop: prints {'params': count}, then run(i) for each 'step i' line on stdin, then
  {'peak_rss_gib'} on 'exit'; one JSON line each on stdout."""
  print(json.dumps(dict(params=count)), flush=True)
  for line in sys.stdin:
    cmd, *arg = line.split()
    if cmd == 'exit':
      break
    print(json.dumps(run(int(arg[0]))), flush=True)
  print(json.dumps(dict(peak_rss_gib=peak_rss_gib())), flush=True)


class Worker:
  """`script --worker POINT` run by `python` in its own process, driven one step at a time."""

  def __init__(self, python, script, point):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)  # the device count is the point's
    env.pop('JAX_NUM_CPU_DEVICES', None)
    self.proc = subprocess.Popen([python, os.path.abspath(script), '--worker', json.dumps(point)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.params = self._read()['params']

  def _read(self):
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'worker exited with {self.proc.wait()} (its stderr is above)')
    return json.loads(line)

  def step(self, i):
    """Runs step i in the worker: its dict ({'time_s', ...})."""
    self.proc.stdin.write(f'step {i}\n')
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    """Ends the worker: its peak RSS in GiB."""
    self.proc.stdin.write('exit\n')
    self.proc.stdin.flush()
    rss = self._read()['peak_rss_gib']
    self.proc.wait()
    return rss
