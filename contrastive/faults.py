"""Fault handling in the train loop: preemption (SIGTERM) and non-finite updates.

Preemption: Cloud TPU, SLURM and Kubernetes send SIGTERM some seconds before killing a job.
`Preemption` turns the signal into a flag that the loop reads between steps, so the last
checkpoint is written from a consistent state rather than from inside a signal handler.

Non-finite updates: `keep_if_finite` selects, inside the jitted step, between the updated and
the previous state on one scalar flag, so a step with a NaN/inf loss or gradient can be
skipped (config.nonfinite='skip') without a host round trip.
"""

import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np

NONFINITE_MODES = ('error', 'skip')


class Preemption:
  """Context manager: while active, SIGTERM sets a flag instead of killing the process.

  Use:
    with Preemption() as preempted:
      for step in ...:
        ...
        if preempted.requested():
          save; break
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._signals = signals
    self._event = threading.Event()
    self._previous = {}

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    print(f'Received {signal.Signals(signum).name}: saving a checkpoint after this step.',
          flush=True)
    self._event.set()

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signals need the main thread
      for s in self._signals:
        self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def requested(self):
    """True once any process got the signal; in a multi-process job all processes agree.

    With several processes this is a small collective, so call it at the same steps on all.
    """
    flag = self._event.is_set()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
    return flag


def all_finite(*trees):
  """Scalar bool: every element of every array leaf is finite."""
  leaves = [x for t in trees for x in jax.tree.leaves(t)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def keep_if_finite(ok, new, old):
  """`new` where the scalar flag `ok` is true, else `old` (leaf by leaf, same structure)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
