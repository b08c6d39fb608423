"""Checkpoints with orbax: the train state and the data iterator's state, saved together.

A workdir's `checkpoints/` holds one folder per saved step; orbax writes each atomically
(a temporary folder renamed when complete), so an interrupted save never hides the previous
good checkpoint.
"""

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `save_every` steps (keeping the newest `keep`) and restores the latest."""

  def __init__(self, directory, *, save_every, keep, async_save=True):
    # orbax needs absolute paths: resolve local ones, keep URLs (gs://...) as they are.
    self.directory = directory if '://' in directory else os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=save_every,
            enable_async_checkpointing=async_save, create=True))

  def latest_step(self):
    return self._manager.latest_step()

  def save(self, step, state, data_state, *, force=False):
    """Saves (state, data_state) at `step` if the interval says so, or always with force.

    data_state: the grain iterator's `get_state()` (a JSON-able dict) or None.
    """
    return self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=ocp.args.JsonSave(data_state or {})),
        force=force)

  def restore_latest(self, state):
    """Returns (state, data_state) from the latest checkpoint, or (state, None) if there is none.

    `state` gives the structure, shapes, dtypes and shardings to restore into.
    """
    step = self._manager.latest_step()
    if step is None:
      return state, None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      data=ocp.args.JsonRestore()))
    print(f'Resumed from step {step} in {self.directory}', flush=True)
    return restored['state'], (restored['data'] or None)

  def close(self):
    """Waits for pending asynchronous saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
