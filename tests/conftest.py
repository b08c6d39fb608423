"""Test-session setup: 8 virtual CPU devices, so meshes of 1, 2 and 8 devices fit in one process,
and a compilation cache for the session.

XLA reads the flag once, when jax first initialises its backend, so it is set here, before
any test module imports jax. Meshes over `jax.devices()[:n]` then give the 1-, 2- and 8-device
runs that the distributed tests compare.
"""

import atexit
import fcntl
import os
import shutil
import sys
import tempfile

import pytest

from tests import xla_flags

NUM_TEST_DEVICES = 8

if 'jax' in sys.modules:
  raise RuntimeError('jax was imported before tests/conftest.py could set the device count.')
# tests/xla_flags.py: 8 devices, compiled fast. pytest-xdist's workers (pytest.ini: -n 2)
# inherit these from the controller.
for flag in xla_flags.with_devices(NUM_TEST_DEVICES).split():
  if flag not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# One persistent XLA compilation cache for this test session, shared with the subprocesses the
# tests start (they inherit the environment): the resume and multi-process tests run the same
# programs in several processes. A cached executable is the same binary, so bitwise-equality
# checks are unaffected; a user's own JAX_COMPILATION_CACHE_DIR is kept.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='contrastive_jax_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """A tfds data_dir holding Fashion-MNIST converted from the Debian IDX files, shared by every
  test that trains on it (converting takes ~20 s); skips where the package is absent.
  pytest-xdist's workers share one copy in the session's folder: the first converts it while
  the others wait on a lock."""
  from contrastive.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  from contrastive.data import pipeline  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(fashion_mnist.DEBIAN_IDX_DIR):
    pytest.skip('apt-get install dataset-fashion-mnist')
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # this session's folder, above each worker's own
  data_dir = str(root / 'tfds')
  with open(root / 'tfds.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    pipeline.get_source(ml_collections.ConfigDict(dict(
        name='fashion_mnist_idx', data_dir=data_dir, idx_dir=fashion_mnist.DEBIAN_IDX_DIR)),
                        'train')
  return data_dir


# Modules that train or start processes go first, so that pytest-xdist's 2 workers (whole
# modules each, pytest.ini) finish together instead of one running a long module alone at the end.
LONG_MODULES = ('test_multiprocess.py', 'test_two_tower.py', 'test_reliability.py',
                'test_resume.py', 'test_two_tower_main.py', 'test_notebooks.py', 'test_train.py',
                'test_faults.py', 'test_moco.py')


def pytest_collection_modifyitems(items):
  # Longest first, in LONG_MODULES's order; the rest as collected (the sort is stable).
  rank = {name: i for i, name in enumerate(LONG_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))
