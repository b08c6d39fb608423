"""GISTEmbed with a frozen guide checkpoint (config.samplers.gist_guide,
contrastive/samplers/guide.py): the guide is read bitwise into the state, stays unchanged by
training, a checkpoint of another model is a one-line error, and the config is checked."""

import os

import jax
import numpy as np
import pytest

from contrastive import checkpoint
from contrastive import config_lib
from contrastive import parallel
from contrastive import validate
from contrastive.recipes import image_views
from contrastive.samplers import guide

CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'simclr_fmnist.py')


def config(variants='runlocal,gist', **fields):
  cfg = config_lib.load_config(CONFIG, variants)
  cfg.batch_size = 8
  for name, value in fields.items():
    section, key = name.split('__')
    if section == 'queue':
      cfg.queue_size = value
    else:
      cfg[section][key] = value
  return cfg


def save_guide(workdir, cfg, seed):
  """A checkpoint of a plain SimCLR state of `cfg`'s model, initialised from `seed`."""
  mesh = parallel.make_mesh([('data', 1)], devices=jax.devices()[:1])
  _, state, _ = image_views.step(image_views.settings(cfg), mesh, (28, 28, 1), 10, jax.random.key(seed))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), save_every=1, keep=1,
                                 async_save=False)
  ckpt.save(5, state, {}, force=True)
  ckpt.close()
  return state


def test_guide_is_loaded_bitwise_and_stays_frozen(tmp_path):
  plain = config('runlocal')
  saved = save_guide(str(tmp_path / 'guide'), plain, seed=7)
  cfg = config(momentum__base=0.0, samplers__gist_guide=str(tmp_path / 'guide'))
  validate.validate_config(cfg, num_devices=1, num_processes=1)
  mesh = parallel.make_mesh([('data', 1)], devices=jax.devices()[:1])
  _, state, step = image_views.step(image_views.settings(cfg), mesh, (28, 28, 1), 10, jax.random.key(0))
  state = guide.load_guide(state, str(tmp_path / 'guide'))
  for a, b in zip(jax.tree.leaves(saved.params), jax.tree.leaves(state.ema_params)):
    np.testing.assert_array_equal(a, b)
  online = jax.device_get(state.params)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(online),
                                                       jax.tree.leaves(saved.params)))
  batch = {'image': np.random.default_rng(0).integers(0, 255, (8, 28, 28, 1), np.uint8),
           'id': np.arange(8, dtype=np.int32)}
  new = state
  for i in range(2):  # the warm-up's learning rate is 0 at step 0
    new, metrics = step(new, batch, jax.random.key(i))
    assert np.isfinite(metrics['loss'])
  for a, b in zip(jax.tree.leaves(saved.params), jax.tree.leaves(new.ema_params)):
    np.testing.assert_array_equal(a, b)  # the guide never moves
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(online),
                                                       jax.tree.leaves(new.params)))


def test_a_guide_of_another_model_is_a_one_line_error(tmp_path):
  other = config('runlocal')
  other.model.width = 16  # twice the runlocal width
  save_guide(str(tmp_path / 'guide'), other, seed=0)
  cfg = config(momentum__base=0.0, samplers__gist_guide=str(tmp_path / 'guide'))
  mesh = parallel.make_mesh([('data', 1)], devices=jax.devices()[:1])
  _, state, _ = image_views.step(image_views.settings(cfg), mesh, (28, 28, 1), 10, jax.random.key(0))
  with pytest.raises(ValueError, match=r'gist_guide: .* does not match this run\'s model '
                     r'\(\d+ difference\(s\), e.g. ') as e:
    guide.load_guide(state, str(tmp_path / 'guide'))
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('fields, message', [
    (dict(samplers__gist=False), r'is the guide of GIST: set config.samplers.gist=True'),
    (dict(momentum__base=0.99), r'replaces the momentum encoder as GIST\'s guide'),
    (dict(), r'has no checkpoint under'),
    (dict(queue__size=64), r'the queue keeps no guide embeddings'),
])
def test_config_errors(tmp_path, fields, message):
  cfg = config(**dict(dict(momentum__base=0.0, samplers__gist_guide=str(tmp_path)), **fields))
  with pytest.raises(validate.ConfigError, match=message) as e:
    validate.validate_config(cfg, num_devices=1, num_processes=1)
  assert '\n' not in str(e.value)
