"""Non-finite guard (config.nonfinite) and the config checks that run before compiling."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive import optim
from contrastive import parallel
from contrastive import train
from contrastive import validate
from contrastive.losses import nt_xent
from contrastive.models import build_model
from tests import test_distributed
from tests.test_train import _config


def _one_step(loss_fn, nonfinite):
  """One jitted train step of the small test_distributed model; returns (before, after, metrics)."""
  cfg = test_distributed._config()  # pylint: disable=protected-access
  mesh = parallel.make_mesh([('data', -1)], devices=jax.devices()[:1])
  model = build_model(cfg.model)
  tx, schedule = optim.build_optimizer(cfg.optimizer, total_steps=10)
  state = train.create_train_state(model, tx, (16, 16, 1), jax.random.key(0), mesh)
  before = jax.device_get(state)  # the step donates `state`
  step = train.jit_train_step(mesh, state, model=model, tx=tx, loss_fn=loss_fn,
                              aug_cfg=cfg.augment, schedule=schedule, nonfinite=nonfinite)
  batch = jax.device_put(test_distributed._batches(1)[0], parallel.data_sharding(mesh))  # pylint: disable=protected-access
  state, metrics = step(state, batch, jax.random.key(1))
  return before, jax.device_get(state), jax.device_get(metrics)


def _nan_loss(z1, z2):
  loss, metrics = nt_xent(z1, z2, temperature=0.2)
  return loss * jnp.nan, metrics


def test_skip_keeps_state_on_nonfinite_loss():
  before, after, metrics = _one_step(_nan_loss, 'skip')
  assert np.isnan(metrics['loss']) and int(metrics['skipped_steps']) == 1
  assert int(after.step) == 1 and int(after.skipped_steps) == 1
  for part in ('params', 'batch_stats', 'opt_state'):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
                 getattr(before, part), getattr(after, part))


@pytest.mark.slow  # make test-all; CI keeps the suite under 10 min
def test_skip_is_a_no_op_on_finite_steps():
  loss_fn = functools.partial(nt_xent, temperature=0.2)
  _, skip, skip_metrics = _one_step(loss_fn, 'skip')
  _, error, error_metrics = _one_step(loss_fn, 'error')
  assert int(skip_metrics['skipped_steps']) == 0 and skip_metrics['loss'] == error_metrics['loss']
  jax.tree.map(np.testing.assert_array_equal, skip, error)


@pytest.mark.slow  # make test-all; CI keeps the suite under 10 min
def test_error_mode_applies_the_update():
  before, after, metrics = _one_step(_nan_loss, 'error')
  assert int(metrics['skipped_steps']) == 0
  assert not np.all(np.isfinite(jax.tree.leaves(after.params)[0]))
  assert not np.array_equal(jax.tree.leaves(before.params)[0], jax.tree.leaves(after.params)[0])


@pytest.mark.slow  # make test-all; CI keeps the suite under 10 min
def test_skip_mode_finishes_a_diverging_run(tmp_path, tfds_dir):
  config = _config(total_steps=5, nonfinite='skip')
  config.dataset.data_dir = tfds_dir
  config.optimizer.lr = 1e30  # the 'error' twin of this run raises (tests/test_train.py)
  config.eval.update(max_train_examples=200, max_test_examples=200, linear_steps=2)
  state, _ = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 5 and int(state.skipped_steps) > 0
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if '"loss"' in line]
  assert rows[-1]['skipped_steps'] == int(state.skipped_steps)


@pytest.mark.parametrize('field, value, match', [
    ('mesh', [('data', 3)], r"config.mesh=\[\('data', 3\)\] has 3 devices but there are 8"),
    ('mesh', [('data', -1), ('model', 3)], r'config.mesh=.* does not fit 8 devices'),
    ('nonfinite', 'ignore', r"config.nonfinite='ignore' is unknown; choose one of"),
    ('checkpoint_keep', 0, r'config.checkpoint_keep=0 must be >= 1'),
    ('checkpoint_every', 0, r'config.checkpoint_every=0 must be > 0'),
])
def test_config_errors_name_field_and_fix(field, value, match):
  config = _config(**{field: value})
  with pytest.raises(validate.ConfigError, match=match):
    validate.validate_config(config, num_devices=8, num_processes=1)


@pytest.mark.parametrize('path, value, match', [
    (('loss', 'name'), 'nt_xnet', 'nt_xnet'),
    (('model', 'preset'), 'resnet19', "config.model.preset='resnet19' is unknown"),
    (('optimizer', 'name'), 'adamm', "config.optimizer.name='adamm' is unknown"),
])
def test_unknown_names_fail_before_compiling(path, value, match, tmp_path, monkeypatch):
  compiled = []
  monkeypatch.setattr(jax, 'jit', lambda *a, **k: compiled.append(a) or (lambda *x: None))
  config = _config()
  config[path[0]][path[1]] = value
  with pytest.raises(validate.ConfigError, match=match):
    train.train_and_evaluate(config, str(tmp_path))
  assert not compiled
