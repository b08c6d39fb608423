"""Non-finite guard (config.nonfinite) and the config checks that run before compiling."""

import functools
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive import evaluate
from contrastive import faults
from contrastive import metric_writer
from contrastive import objectives
from contrastive import optim
from contrastive import parallel
from contrastive import step as step_lib
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
  state = step_lib.create_train_state(model, tx, (16, 16, 1), jax.random.key(0), mesh)
  before = jax.device_get(state)  # the step donates `state`
  objective = objectives.image_views(model=model, loss_fn=loss_fn, aug_cfg=cfg.augment)
  step = step_lib.jit_train_step(mesh, state, objective=objective, tx=tx, schedule=schedule,
                              nonfinite=nonfinite)
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
    ('mesh', [('data', -1), ('fsdp', 3)], r'config.mesh=.* does not fit 8 devices'),
    ('mesh', [('data', -1), ('model', 2)], r"axis 'model' is unknown"),
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


def _saved_states(workdir):
  """{step: the saved TrainState's arrays} of every checkpoint in workdir (no target tree)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, 'checkpoints')
  with ocp.StandardCheckpointer() as reader:
    return {int(s): reader.restore(os.path.join(directory, s, 'state'))
            for s in os.listdir(directory) if s.isdigit()}


@pytest.mark.slow  # make test-all; CI keeps the suite under 10 min (the skip-mode state guard runs in CI)
def test_nonfinite_state_is_never_checkpointed(tmp_path, tfds_dir):
  """lr=1e9 overflows the state (BatchNorm variance, moments) while the loss is still finite:
  the run stops at that step, and the checkpoint it names as good is finite."""
  config = _config(total_steps=12)
  config.dataset.data_dir = tfds_dir
  config.optimizer.lr = 1e9
  with pytest.raises(train.NonFiniteLossError, match=r'last good checkpoint: (\d+|None)') as e:
    train.train_and_evaluate(config, str(tmp_path))
  states = _saved_states(str(tmp_path))
  named = e.value.args[0].split('last good checkpoint: ')[1].split()[0]
  assert named == 'None' or int(named) in states
  assert all(np.all(np.isfinite(x)) for s in states.values() for x in jax.tree.leaves(s)
             if np.issubdtype(np.asarray(x).dtype, np.floating)), sorted(states)


@pytest.mark.slow  # make test-all; CI keeps the suite under 10 min
def test_skip_mode_stops_after_max_consecutive_skips(tmp_path, tfds_dir):
  config = _config(total_steps=12, nonfinite='skip', max_consecutive_skips=3)
  config.dataset.data_dir = tfds_dir
  config.optimizer.lr = 1e30
  with pytest.raises(train.NonFiniteLossError, match=r'3 step\(s\) in a row skipped up to step'):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.slow  # make test-all; CI keeps the suite under 10 min
def test_final_step_is_saved_before_the_final_evaluation(tmp_path, tfds_dir, monkeypatch):
  config = _config(total_steps=4)  # checkpoints every 3: only the final save writes step 4
  config.dataset.data_dir = tfds_dir

  def killed(self, state):
    raise RuntimeError('killed during the final evaluation')
  monkeypatch.setattr(evaluate.Evaluator, '__call__', killed)
  with pytest.raises(RuntimeError, match='final evaluation'):
    train.train_and_evaluate(config, str(tmp_path))
  folder = os.path.join(tmp_path, 'checkpoints', '4')
  for _ in range(100):  # the save is asynchronous: give it time to commit
    if os.path.isdir(folder):
      break
    time.sleep(0.1)
  assert os.path.isdir(folder), os.listdir(os.path.join(tmp_path, 'checkpoints'))


def test_sigint_is_handled_like_sigterm_and_a_second_one_interrupts():
  # The handler before: default_int_handler in a terminal, SIG_IGN under a shell that started
  # the tests in the background (nohup ... &); either way it is restored on exit.
  before = signal.getsignal(signal.SIGINT)
  with faults.Preemption() as preemption:
    os.kill(os.getpid(), signal.SIGINT)
    assert preemption.requested() and preemption.signal_name() == 'SIGINT'
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is before


def test_metrics_partial_line_is_removed_on_the_next_start(tmp_path, capsys):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # a crash mid-write
  writer = metric_writer.MetricWriter(str(tmp_path))
  writer.write(3, {'loss': 1.5})
  writer.close()
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [1, 3]
  assert 'removed a partial last line' in capsys.readouterr().out
  assert metric_writer.repair_partial_line(str(path)) == 0  # whole lines stay as they are


@pytest.mark.parametrize('field, value, match', [
    ('total_steps', -5, r'config.total_steps=-5 must be >= 0'),
    ('log_every', 0, r'config.log_every=0 must be >= 1'),
    ('max_consecutive_skips', 0, r'config.max_consecutive_skips=0 must be >= 1'),
    ('num_epochs', 0.0, r'config.num_epochs=0.0 must be > 0'),
    ('seed', -1, r'config.seed=-1 must be >= 0'),
])
def test_numeric_fields_are_checked(field, value, match):
  config = _config(**{field: value})
  if field == 'num_epochs':
    config.total_steps = 0
  with pytest.raises(validate.ConfigError, match=match):
    validate.validate_config(config, num_devices=8, num_processes=1)


@pytest.mark.parametrize('path, value, match', [
    ('eval.knn_temperature', 0.0, 'must be > 0'), ('eval.knn_k', 0, 'must be >= 1'),
    ('eval.batch_size', 0, 'must be > 0'), ('eval.linear_lr', -1.0, 'must be > 0'),
    ('augment.hue', 0.7, r'must be in \[0, 0.5\]'), ('augment.gray_prob', 1.5, r'\[0, 1\]'),
    ('augment.crop_scale', (0.9, 0.3), 'min <= max'), ('optimizer.momentum', 1.0, r'\[0, 1\)'),
    ('optimizer.warmup_steps', -1, '>= 0'), ('model.head_hidden_dims', (0,), 'sizes >= 1'),
    ('samplers.threshold', 1.5, r'\[-1, 1\]'), ('mcl.kmeans_iters', 0, '>= 1'),
])
def test_nested_numeric_fields_are_checked(path, value, match):
  config = _config()
  section, field = path.split('.')
  config[section][field] = value
  with pytest.raises(validate.ConfigError, match=f'config.{path}=.*{match}'):
    validate.validate_config(config, num_devices=8, num_processes=1)
