"""Fault handling in the train loop: preemption (SIGTERM, SIGINT) and non-finite updates.

Preemption: Cloud TPU, SLURM and Kubernetes send SIGTERM some seconds before killing a job;
a user stops a run with Ctrl-C (SIGINT).
`Preemption` turns the signal into a flag that the loop reads between steps, so the last
checkpoint is written from a consistent state rather than from inside a signal handler.

Non-finite updates: `keep_if_finite` selects, inside the jitted step, between the updated and
the previous state on one scalar flag, so a step with a NaN/inf loss, gradient or new state
can be skipped (config.nonfinite='skip') without a host round trip.
"""

import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np

NONFINITE_MODES = ('error', 'skip')


class Preemption:
  """Context manager: while active, SIGTERM and SIGINT (Ctrl-C) set a flag instead of killing
  the process. A second SIGINT interrupts at once (KeyboardInterrupt), as usual.

  Use:
    with Preemption() as preempted:
      for step in ...:
        ...
        if preempted.requested():
          save; break
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._signals = signals
    self._event = threading.Event()
    self._previous = {}
    self._received = None

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    if signum == signal.SIGINT and self._event.is_set():
      raise KeyboardInterrupt
    self._received = self._received or signal.Signals(signum).name
    print(f'Received {signal.Signals(signum).name}: saving a checkpoint after this step'
          + (' (Ctrl-C again to stop at once).' if signum == signal.SIGINT else '.'), flush=True)
    self._event.set()

  def signal_name(self):
    """'SIGTERM' etc. of the first signal received, for messages."""
    return self._received or 'a signal'

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
  """Scalar bool: every element of every floating-point leaf is finite."""
  leaves = [x for t in trees for x in jax.tree.leaves(t) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def keep_if_finite(ok, new, old):
  """`new` where the scalar flag `ok` is true, else `old` (leaf by leaf, same structure)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
