"""Checkpoints with orbax: the train state and the data iterator's state, saved together.

A workdir's `checkpoints/` holds one folder per saved step. orbax writes each one atomically
(a temporary folder renamed when complete) and removes checkpoints beyond `keep` only after
the newer one is committed, so a save interrupted by a crash never hides the last good one.

Restoring never destroys a checkpoint. `restore_latest` tells three failures apart:
- *a different structure* (shapes, dtypes or tree of the saved state differ from the run's:
  a changed config): `CheckpointMismatchError`, nothing is touched;
- *a storage error* (OSError, an unavailable or timed-out store): retried, then raised as
  `CheckpointError`, nothing is touched;
- *proven damage* (unreadable metadata, a missing item, data that fails to decode on every
  try): the step folder is moved to `checkpoints.corrupt/<step>` (`<step>.1`, ... if taken, so
  nothing there is overwritten) and the previous checkpoint is tried. If none restores, the
  run stops with an error instead of silently starting over.
"""

import os
import time

import jax
import orbax.checkpoint as ocp
from etils import epath

from contrastive import workdir

RETRIES = 3
RETRY_WAIT_S = 1.0
# Storage errors that say nothing about the checkpoint itself.
_TRANSIENT = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'RESOURCE_EXHAUSTED', 'PERMISSION_DENIED',
              'Permission denied', 'Connection', 'timed out')


class CheckpointError(RuntimeError):
  """Checkpoints could not be read or written; the message names the folder and the fix."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint's state has another structure than the run's (a changed config)."""


def saved_steps(directory):
  """The committed step folders under a local `directory` (no orbax), sorted."""
  if '://' in directory or not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def latest_step_dir(workdir, *, step=None):
  """`<workdir>/checkpoints/<step>` of the newest committed checkpoint (or of `step`);
  raises CheckpointError naming the folder when there is none."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  steps = saved_steps(directory)
  if not steps or (step is not None and step not in steps):
    raise CheckpointError(f'No checkpoint {"" if step is None else f"{step} "}in {directory} '
                          f'(it has {steps or "none"}).')
  return os.path.join(directory, str(steps[-1] if step is None else step))


def _is_transient(error):
  return isinstance(error, OSError) or any(t in str(error) for t in _TRANSIENT)


def _flat(tree, is_leaf=None):
  """{'params/conv1/kernel': leaf}: one path syntax for dicts, dataclasses and sequences."""
  name = lambda k: str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
  return {'/'.join(name(k) for k in path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def structure_mismatch(saved, state):
  """Paths whose saved shape/dtype differ from `state`'s (or that only one side has), as
  'path: saved -> expected' strings; [] if they agree. saved: orbax tree metadata."""
  flat_saved = _flat(saved, is_leaf=lambda x: hasattr(x, 'shape'))
  flat_state = _flat(state)
  problems = []
  for path in sorted(flat_saved.keys() | flat_state.keys()):
    m, x = flat_saved.get(path), flat_state.get(path)
    if m is None or x is None:
      problems.append(f'{path}: ' + ('not in the checkpoint' if m is None else 'not in this run'))
    elif tuple(m.shape) != tuple(x.shape) or jax.numpy.dtype(m.dtype) != x.dtype:
      problems.append(f'{path}: {m.dtype}{list(m.shape)} -> {x.dtype}{list(x.shape)}')
  return problems


def read_state(step_dir):
  """The state arrays saved in a step folder (`<workdir>/checkpoints/<step>`), as a dict tree
  of numpy arrays, whatever device count saved it (no target tree needed)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as reader:
    path = os.path.join(os.path.abspath(step_dir), 'state')
    metadata = reader.metadata(path)
    tree = getattr(metadata, 'item_metadata', metadata)
    tree = getattr(tree, 'tree', tree)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree,
                          is_leaf=lambda x: hasattr(x, 'shape'))
    return jax.device_get(reader.restore(path, target))


class Checkpointer:
  """Saves every `save_every` steps (keeping the newest `keep`) and restores the latest."""

  def __init__(self, directory, *, save_every, keep, async_save=True):
    # orbax needs absolute paths: resolve local ones, keep URLs (gs://...) as they are.
    self.directory = directory if '://' in directory else os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           data=ocp.JsonCheckpointHandler()),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=save_every,
            enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True))  # a save killed halfway leaves a tmp folder
    if '://' not in self.directory and jax.process_index() == 0 and not workdir.writable(self.directory):
      self._manager.close()
      raise CheckpointError(f'{self.directory} is not writable: no checkpoint could be saved. '
                            'Fix its permissions or free the disk, or use another --workdir.')

  def latest_step(self):
    return self._manager.latest_step()

  def save(self, step, state, data_state, *, force=False):
    """Saves (state, data_state) at `step` if the interval says so, or always with force.

    The device-to-host copy happens before this returns, so the caller may donate `state`'s
    buffers to the next step while the files are written in the background.

    data_state: the grain iterator's `get_state()` (a JSON-able dict) or None.
    """
    if force and step == self._manager.latest_step():
      return False  # already saved at this step
    return self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=ocp.args.JsonSave(data_state or {})),
        force=force)

  def _metadata(self, step):
    """The saved state's tree metadata; raises if it is unreadable or absent (damage)."""
    metadata = self._manager.item_metadata(step)
    saved = metadata.get('state') if hasattr(metadata, 'get') else None
    if saved is None:
      raise ValueError(f'no readable "state" item in checkpoint {step}')
    return getattr(saved, 'tree', saved)

  def _restore(self, step, state):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      data=ocp.args.JsonRestore()))
    return restored['state'], (restored['data'] or None)

  def _read(self, step, state):
    """(state, data_state) of `step`; raises _Damaged, CheckpointMismatchError or
    CheckpointError (storage), see the module docstring."""
    error = None
    for attempt in range(RETRIES):
      if attempt:
        time.sleep(RETRY_WAIT_S * attempt)
      try:
        saved = self._metadata(step)
      except Exception as e:  # pylint: disable=broad-except
        error = e
        if _is_transient(e):
          continue
        raise _Damaged(f'unreadable metadata: {type(e).__name__}: {str(e)[:200]}') from None
      problems = structure_mismatch(saved, state)
      if problems:
        raise CheckpointMismatchError(
            f'Checkpoint {step} in {self.directory} holds a state of another structure than '
            f'this run\'s config builds ({len(problems)} arrays differ, e.g. '
            f'{"; ".join(problems[:3])}): resume with the config that made it, or use a new '
            '--workdir.')
      try:
        return self._restore(step, state)
      except Exception as e:  # pylint: disable=broad-except
        error = e
    if _is_transient(error):
      raise CheckpointError(
          f'Checkpoint {step} in {self.directory} could not be read after {RETRIES} tries '
          f'({type(error).__name__}: {str(error)[:300]}); it was left as it is. Check the storage '
          'and rerun.') from error
    raise _Damaged(f'{type(error).__name__}: {str(error)[:200]}')

  def restore_latest(self, state):
    """Returns (state, data_state) from the newest checkpoint that restores, or (state, None)
    if there is none.

    `state` gives the structure, shapes, dtypes and shardings to restore into. Damaged
    checkpoints are moved aside with a warning naming them and the step used instead.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    bad = []
    for step in steps:
      try:
        restored = self._read(step, state)
      except _Damaged as e:
        print(f'WARNING: checkpoint {step} in {self.directory} is damaged ({e}).', flush=True)
        bad.append(step)
        continue
      if bad:
        print(f'WARNING: falling back from corrupt checkpoint {bad[0]} to step {step}.',
              flush=True)
      self._set_aside(bad)
      print(f'Resumed from step {step} in {self.directory}', flush=True)
      return restored
    if bad:
      aside = self._set_aside(bad)
      raise CheckpointError(
          f'No checkpoint in {self.directory} restores: {bad} are damaged and were moved to '
          f'{aside}. Rerun to start this run from scratch, or restore them from a copy.')
    return state, None

  def _set_aside(self, steps):
    """Moves damaged step folders into `<directory>.corrupt/` under names never used before
    (process 0), then rescans; returns that folder."""
    aside = epath.Path(self.directory + '.corrupt')
    if not steps:
      return aside
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target, n = aside / str(step), 0
        while target.exists():
          n += 1
          target = aside / f'{step}.{n}'
        (epath.Path(self.directory) / str(step)).rename(target)
        print(f'WARNING: moved damaged checkpoint {step} to {target}.', flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('checkpoint_set_aside')
    self._manager.reload()
    return aside

  def wait(self):
    """Blocks until pending asynchronous saves are committed."""
    self._manager.wait_until_finished()

  def close(self):
    """Waits for pending asynchronous saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


class _Damaged(Exception):
  """A checkpoint's files are unreadable or inconsistent (internal to restore_latest)."""
