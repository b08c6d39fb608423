"""contrastive.checkpoint: restore never destroys a checkpoint, and tells damage, a changed
structure and a storage error apart (small states, no training)."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from contrastive import checkpoint


def _state(width=3, extra=False):
  state = {'w': jnp.arange(4 * width, dtype=jnp.float32).reshape(4, width),
           'step': jnp.int32(7)}
  if extra:
    state['queue'] = jnp.zeros(5)
  return state


@pytest.fixture
def saved(tmp_path):
  """A checkpoint folder with steps 3 and 6 (6 holds w + 1)."""
  directory = str(tmp_path / 'checkpoints')
  ckpt = checkpoint.Checkpointer(directory, save_every=1, keep=None)
  ckpt.save(3, _state(), {'pos': 3}, force=True)
  ckpt.save(6, dict(_state(), w=_state()['w'] + 1), {'pos': 6}, force=True)
  ckpt.close()
  return directory


def _restore(directory, state=None):
  ckpt = checkpoint.Checkpointer(directory, save_every=1, keep=None)
  try:
    return ckpt.restore_latest(_state() if state is None else state)
  finally:
    ckpt.close()


def test_restores_the_newest(saved):
  state, data = _restore(saved)
  np.testing.assert_array_equal(state['w'], _state()['w'] + 1)
  assert data == {'pos': 6}


def test_damage_twice_keeps_both_copies_aside(saved, monkeypatch):
  monkeypatch.setattr(checkpoint, 'RETRY_WAIT_S', 0.0)
  for _ in range(2):
    shutil.rmtree(os.path.join(saved, '6', 'state'))
    _, data = _restore(saved)
    assert data == {'pos': 3}
    ckpt = checkpoint.Checkpointer(saved, save_every=1, keep=None)
    ckpt.save(6, _state(), {'pos': 6}, force=True)  # the run goes on and saves 6 again
    ckpt.close()
  assert sorted(os.listdir(saved + '.corrupt')) == ['6', '6.1']


def test_changed_structure_is_an_error_that_moves_nothing(saved):
  for state, match in ((_state(width=5), r"w: float32\[4, 3\] -> float32\[4, 5\]"),
                       (_state(extra=True), 'queue: not in the checkpoint')):
    with pytest.raises(checkpoint.CheckpointMismatchError, match=match):
      _restore(saved, state)
  assert sorted(os.listdir(saved)) == ['3', '6'] and not os.path.exists(saved + '.corrupt')


def test_storage_error_is_retried_then_raised_and_moves_nothing(saved, monkeypatch):
  monkeypatch.setattr(checkpoint, 'RETRY_WAIT_S', 0.0)
  calls = []

  def failing(self, step, state):
    calls.append(step)
    raise OSError(5, 'Input/output error')
  monkeypatch.setattr(checkpoint.Checkpointer, '_restore', failing)
  with pytest.raises(checkpoint.CheckpointError, match='could not be read after 3 tries'):
    _restore(saved)
  assert calls == [6, 6, 6]  # not "fallen back" to 3
  assert sorted(os.listdir(saved)) == ['3', '6'] and not os.path.exists(saved + '.corrupt')


def test_storage_error_that_passes_restores(saved, monkeypatch):
  monkeypatch.setattr(checkpoint, 'RETRY_WAIT_S', 0.0)
  real, calls = checkpoint.Checkpointer._restore, []  # pylint: disable=protected-access

  def flaky(self, step, state):
    calls.append(step)
    if len(calls) == 1:
      raise OSError(5, 'Input/output error')
    return real(self, step, state)
  monkeypatch.setattr(checkpoint.Checkpointer, '_restore', flaky)
  _, data = _restore(saved)
  assert data == {'pos': 6} and calls == [6, 6]


def test_no_checkpoint_restores_is_an_error_not_a_fresh_start(saved, monkeypatch):
  monkeypatch.setattr(checkpoint, 'RETRY_WAIT_S', 0.0)
  for step in ('3', '6'):
    shutil.rmtree(os.path.join(saved, step, 'state'))
  with pytest.raises(checkpoint.CheckpointError, match=r'No checkpoint .* restores: \[6, 3\]'):
    _restore(saved)
  assert sorted(os.listdir(saved + '.corrupt')) == ['3', '6']
  state, data = _restore(saved)  # the rerun starts from scratch
  assert data is None and int(state['step']) == 7


def test_unwritable_folder_fails_at_construction(tmp_path):
  folder = tmp_path / 'checkpoints'
  folder.mkdir()
  if os.geteuid() == 0:
    if os.system(f'chattr +i {folder} 2>/dev/null'):
      pytest.skip('chattr +i is not available here')
  else:
    folder.chmod(0o555)
  try:
    with pytest.raises(checkpoint.CheckpointError, match='is not writable'):
      checkpoint.Checkpointer(str(folder), save_every=1, keep=None)
  finally:
    if os.geteuid() == 0:
      os.system(f'chattr -i {folder}')
    folder.chmod(0o755)
