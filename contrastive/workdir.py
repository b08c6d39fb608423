"""The workdir of a run: checked before anything starts, and locked so one run owns it.

A workdir holds one run: `config.json` (the run's identity, contrastive/run_config.py),
`checkpoints/`, `metrics.jsonl`. Two runs writing it at once interleave their metrics and
overwrite each other's checkpoints, so `WorkdirLock` takes `<workdir>/lock` at start:

- the lock file holds the holder's host, process id and start time, and is created with
  O_CREAT | O_EXCL (atomic on local file systems and NFSv3+);
- a second run fails at once with `WorkdirLockedError` naming the holder;
- a lock left by a crashed run (kill -9, power loss) is stale and taken over: on the same host
  when its process id no longer runs; from another host when the holder stopped refreshing it
  (the holder touches the file every `HEARTBEAT_S` seconds from a daemon thread; stale after
  `STALE_S`);
- a multi-process job takes it once, in process 0.
"""

import datetime
import json
import os
import socket
import tempfile
import threading
import time

LOCK_NAME = 'lock'
HEARTBEAT_S = 60.0
STALE_S = 600.0


class WorkdirError(ValueError):
  """The workdir cannot hold a run (empty name, a file, not writable); the message says why."""


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir; the message names it."""


def check_workdir(path):
  """Creates `path` if needed and checks it is a writable folder; raises WorkdirError."""
  if not path or not str(path).strip():
    raise WorkdirError('--workdir is empty: name a folder for checkpoints and metrics.')
  if '://' in path:
    raise WorkdirError(f'--workdir={path!r}: the workdir must be a local (or mounted) folder; '
                       'metrics, the config and the lock are written with local file I/O.')
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f'--workdir={path!r} is a file, not a folder: choose another path.')
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f'--workdir={path!r} cannot be created ({e.strerror}): choose a folder '
                       'you can write to.') from None
  if not writable(path):
    raise WorkdirError(f'--workdir={path!r} is not writable: fix its permissions or choose '
                       'another folder.')


def writable(folder):
  """True if a file can be created (and removed) in `folder`: a real probe, since permission
  bits do not tell for root, immutable folders or read-only mounts."""
  try:
    with tempfile.NamedTemporaryFile(dir=folder, prefix='.write_probe_'):
      pass
  except OSError:
    return False
  return True


def _pid_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def read_holder(path):
  """The lock file's {'host', 'pid', 'started'} or None if absent or unreadable."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def is_stale(holder, lock_path, *, now=None):
  """True if the holder of `lock_path` is gone (see the module docstring)."""
  if holder is None:  # unreadable: a crash while writing it; judge by its age
    holder = {}
  if holder.get('host') == socket.gethostname() and isinstance(holder.get('pid'), int):
    return not _pid_alive(holder['pid'])
  try:
    age = (now or time.time()) - os.path.getmtime(lock_path)
  except OSError:
    return True
  return age > STALE_S


class WorkdirLock:
  """Context manager: holds `<workdir>/lock` for the duration of a run (process 0 only)."""

  def __init__(self, workdir, *, enabled=True):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._enabled = enabled
    self._held = False
    self._stop = threading.Event()
    self._thread = None

  def _try_create(self):
    record = dict(host=socket.gethostname(), pid=os.getpid(),
                  started=datetime.datetime.now().isoformat(timespec='seconds'))
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      json.dump(record, f)
    return True

  def acquire(self):
    """Takes the lock, taking over a stale one; raises WorkdirLockedError if held."""
    if not self._enabled:
      return
    if not self._try_create():
      holder = read_holder(self.path)
      if not is_stale(holder, self.path):
        who = (f"process {holder.get('pid')} on host {holder.get('host')}, started "
               f"{holder.get('started')}") if holder else 'a run whose lock is being written'
        raise WorkdirLockedError(
            f'{os.path.dirname(self.path)} is in use by {who}. Wait for it, stop it, or use '
            f'another --workdir (if that run is gone, delete {self.path}).')
      print(f'WARNING: taking over the stale lock of {holder} in {self.path}.', flush=True)
      os.remove(self.path)
      if not self._try_create():  # another run took it over first
        raise WorkdirLockedError(f'{os.path.dirname(self.path)} was taken by another run '
                                 f'while this one replaced a stale lock ({self.path}).')
    self._held = True
    self._thread = threading.Thread(target=self._heartbeat, daemon=True, name='workdir_lock')
    self._thread.start()

  def _heartbeat(self):
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:
        pass

  def release(self):
    """Removes the lock if this run holds it."""
    self._stop.set()
    if self._held:
      self._held = False
      holder = read_holder(self.path)
      if holder and holder.get('pid') == os.getpid() and holder.get('host') == (
          socket.gethostname()):
        os.remove(self.path)

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
