"""contrastive/run_config.py and contrastive/workdir.py without training: which config changes a
resume accepts, and the lock's stale detection."""

import json
import os
import socket
import subprocess

import ml_collections
import pytest

from contrastive import run_config
from contrastive import validate
from contrastive import workdir
from tests.test_configs import set_fields


def _config(**changes):
  config = ml_collections.ConfigDict(dict(
      seed=0, batch_size=64, total_steps=6, log_every=1, allow_config_changes='',
      model=dict(width=8), optimizer=dict(name='adamw', lr=1e-3),
      dataset=dict(name='fashion_mnist_idx', data_dir='/a'), eval=dict(knn_k=200)))
  return set_fields(config, changes)


def test_free_changes_are_recorded_allowed_ones_accepted_others_refused(tmp_path):
  w = str(tmp_path)
  run_config.check_and_record(_config(), w, resuming=False)
  free = run_config.check_and_record(_config(**{'eval.knn_k': 50, 'dataset.data_dir': '/b'}),
                                     w, resuming=True)
  assert free == {'eval.knn_k': (200, 50), 'dataset.data_dir': ('/a', '/b')}
  with pytest.raises(validate.ConfigError, match=r'optimizer.lr: 0.001 -> 0.01.*'
                     r'allow_config_changes=optimizer.lr'):
    run_config.check_and_record(_config(**{'optimizer.lr': 1e-2}), w, resuming=True)
  allowed = _config(**{'optimizer.lr': 1e-2, 'allow_config_changes': 'optimizer'})
  assert 'optimizer.lr' in run_config.check_and_record(allowed, w, resuming=True)
  for field, value in (('model.width', 16), ('batch_size', 128), ('seed', 1),
                       ('dataset.name', 'cifar10')):
    with pytest.raises(validate.ConfigError, match=f'{field}: .* -> .*use a new --workdir'):
      run_config.check_and_record(_config(**{field: value}), w, resuming=True)
  with open(os.path.join(w, run_config.CHANGES_NAME)) as f:
    starts = [json.loads(line) for line in f]
  assert [s['resumed'] for s in starts] == [False, True, True]  # refused starts write nothing


def test_without_a_checkpoint_the_new_config_is_the_runs(tmp_path):
  run_config.check_and_record(_config(), str(tmp_path), resuming=False)
  assert run_config.check_and_record(_config(**{'model.width': 16}), str(tmp_path),
                                     resuming=False) == {}
  assert run_config.load_saved(str(tmp_path))['model.width'] == 16


def test_fixed_fields_cannot_be_allowed(tmp_path):
  with pytest.raises(validate.ConfigError, match='can never change on resume'):
    run_config.check_and_record(_config(allow_config_changes='batch_size'), str(tmp_path),
                                resuming=True)


def test_lock_is_exclusive_and_a_dead_holder_is_stale(tmp_path):
  with workdir.WorkdirLock(str(tmp_path)) as lock:
    with pytest.raises(workdir.WorkdirLockedError, match=f'process {os.getpid()}'):
      workdir.WorkdirLock(str(tmp_path)).acquire()
    assert not workdir.is_stale(workdir.read_holder(lock.path), lock.path)
  assert not os.path.exists(os.path.join(tmp_path, workdir.LOCK_NAME))
  dead = subprocess.Popen(['true'])
  dead.wait()
  path = os.path.join(tmp_path, workdir.LOCK_NAME)
  with open(path, 'w') as f:
    json.dump(dict(host=socket.gethostname(), pid=dead.pid), f)
  assert workdir.is_stale(workdir.read_holder(path), path)
  with open(path, 'w') as f:  # another host: judged by the heartbeat's age
    json.dump(dict(host='elsewhere', pid=1), f)
  assert not workdir.is_stale(workdir.read_holder(path), path)
  old = os.path.getmtime(path) - workdir.STALE_S - 1
  os.utime(path, (old, old))
  assert workdir.is_stale(workdir.read_holder(path), path)
  with workdir.WorkdirLock(str(tmp_path)):  # taken over
    assert workdir.read_holder(path)['pid'] == os.getpid()
