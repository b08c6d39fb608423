"""Checkpoints with orbax: the train state and the data iterator's state, saved together.

A workdir's `checkpoints/` holds one folder per saved step. orbax writes each one atomically
(a temporary folder renamed when complete) and removes checkpoints beyond `keep` only after
the newer one is committed, so a save interrupted by a crash never hides the last good one.
A committed checkpoint can still be damaged afterwards (a truncated file, a deleted folder):
`restore_latest` then falls back to the newest one that restores, and moves the damaged
ones aside to `checkpoints.corrupt/` so later saves and `keep` never count them.
"""

import os

import jax
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
  """Saves every `save_every` steps (keeping the newest `keep`) and restores the latest."""

  def __init__(self, directory, *, save_every, keep, async_save=True):
    # orbax needs absolute paths: resolve local ones, keep URLs (gs://...) as they are.
    self.directory = directory if '://' in directory else os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=save_every,
            enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True))  # a save killed halfway leaves a tmp folder

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

  def _restore(self, step, state):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      data=ocp.args.JsonRestore()))
    return restored['state'], (restored['data'] or None)

  def restore_latest(self, state):
    """Returns (state, data_state) from the newest checkpoint that restores, or (state, None).

    `state` gives the structure, shapes, dtypes and shardings to restore into. A checkpoint
    that fails to restore is reported with a warning naming it and the step used instead.
    """
    bad = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored = self._restore(step, state)
      except Exception as e:  # pylint: disable=broad-except  # any damage: try the previous one
        print(f'WARNING: checkpoint {step} in {self.directory} is incomplete or corrupt '
              f'({type(e).__name__}: {str(e)[:200]}).', flush=True)
        bad.append(step)
        continue
      if bad:
        print(f'WARNING: falling back from corrupt checkpoint {bad[0]} to step {step}.',
              flush=True)
      self._set_aside(bad)
      print(f'Resumed from step {step} in {self.directory}', flush=True)
      return restored
    if bad:
      print(f'WARNING: no checkpoint in {self.directory} restores (tried {bad}); starting from '
            'scratch.', flush=True)
      self._set_aside(bad)
    return state, None

  def _set_aside(self, steps):
    """Moves damaged step folders to `<directory>.corrupt/` (process 0) and rescans."""
    if not steps:
      return
    if jax.process_index() == 0:
      aside = epath.Path(self.directory + '.corrupt')
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target = aside / str(step)
        if target.exists():
          target.rmtree()
        (epath.Path(self.directory) / str(step)).rename(target)
        print(f'WARNING: moved corrupt checkpoint {step} to {target}.', flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('checkpoint_set_aside')
    self._manager.reload()

  def wait(self):
    """Blocks until pending asynchronous saves are committed."""
    self._manager.wait_until_finished()

  def close(self):
    """Waits for pending asynchronous saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
