"""IDX parsing, the tfds builder on a small slice, the grain loader, and missing-data errors."""

import gzip
import os

import jax
import ml_collections
import numpy as np
import pytest

from contrastive.data import fashion_mnist
from contrastive.data import pipeline


def write_idx(path, array):
  """IDX writer independent of the reader: magic (0, 0, 0x08, ndim), big-endian sizes, data."""
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
  data = header + np.ascontiguousarray(array, np.uint8).tobytes()
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(data)


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  """A small Fashion-MNIST-shaped set: 96 train and 40 test examples with known ids/labels."""
  d = tmp_path_factory.mktemp('idx')
  rng = np.random.default_rng(0)
  for split, n, images, labels in (('train', 96, 'train-images-idx3-ubyte.gz',
                                    'train-labels-idx1-ubyte.gz'),
                                   ('test', 40, 't10k-images-idx3-ubyte',
                                    't10k-labels-idx1-ubyte')):
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    x[:, 0, 0] = np.arange(n)  # pixel (0, 0) = example index, to check ids below
    write_idx(str(d / images), x)
    write_idx(str(d / labels), np.arange(n, dtype=np.uint8) % 10)
  return str(d)


@pytest.fixture(scope='module')
def dataset_cfg(idx_dir, tmp_path_factory):
  return ml_collections.ConfigDict(dict(name='fashion_mnist_idx', idx_dir=idx_dir,
                                        data_dir=str(tmp_path_factory.mktemp('tfds'))))


def test_read_idx_gz_and_plain(tmp_path):
  x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  for name in ('a.gz', 'b'):
    write_idx(str(tmp_path / name), x)
    np.testing.assert_array_equal(fashion_mnist.read_idx(str(tmp_path / name)), x)


def test_read_idx_rejects_truncated(tmp_path):
  path = str(tmp_path / 'bad')
  write_idx(path, np.zeros((4, 5), np.uint8))
  with open(path, 'r+b') as f:
    f.truncate(16)
  with pytest.raises(ValueError, match='truncated'):
    fashion_mnist.read_idx(path)


def test_builder_writes_array_record_and_reads_back(dataset_cfg):
  train = pipeline.get_source(dataset_cfg, 'train')
  test = pipeline.get_source(dataset_cfg, 'test')
  assert len(train) == 96 and len(test) == 40
  files = os.listdir(os.path.join(dataset_cfg.data_dir, 'fashion_mnist_idx', '1.0.0'))
  assert any('array_record' in f for f in files)
  for i in range(len(train)):
    r = train[i]
    assert r['image'].shape == (28, 28, 1) and r['image'].dtype == np.uint8
    assert r['image'][0, 0, 0] == r['id'] and r['label'] == r['id'] % 10
  assert sorted(int(train[i]['id']) for i in range(96)) == list(range(96))


def test_loader_is_seeded_repeats_and_resumes(dataset_cfg):
  source = pipeline.get_source(dataset_cfg, 'train')
  ids = lambda it, n: [next(it)['id'].tolist() for _ in range(n)]
  first = ids(iter(pipeline.train_loader(source, global_batch_size=32, seed=1)), 6)
  again = ids(iter(pipeline.train_loader(source, global_batch_size=32, seed=1)), 6)
  other = ids(iter(pipeline.train_loader(source, global_batch_size=32, seed=2)), 6)
  assert first == again and first != other
  epoch1, epoch2 = sum(first[:3], []), sum(first[3:], [])
  assert sorted(epoch1) == sorted(epoch2) == list(range(96))  # each epoch sees every example once
  assert epoch1 != epoch2  # and is reshuffled
  it = iter(pipeline.train_loader(source, global_batch_size=32, seed=1))
  ids(it, 2)
  state = it.get_state()
  resumed = iter(pipeline.train_loader(source, global_batch_size=32, seed=1))
  resumed.set_state(state)
  assert ids(resumed, 4) == first[2:]


def test_to_global_shards_along_data_axis(dataset_cfg):
  from contrastive import parallel  # pylint: disable=g-import-not-at-top
  source = pipeline.get_source(dataset_cfg, 'train')
  batch = next(iter(pipeline.train_loader(source, global_batch_size=32, seed=0)))
  mesh = parallel.make_mesh([('data', -1)], devices=jax.devices()[:8])
  arrays = pipeline.to_global(batch, parallel.data_sharding(mesh))
  assert arrays['image'].shape == (32, 28, 28, 1)
  assert {s.data.shape for s in arrays['image'].addressable_shards} == {(4, 28, 28, 1)}
  np.testing.assert_array_equal(np.asarray(arrays['id']), batch['id'])


def test_missing_dataset_names_package_and_path(tmp_path):
  cfg = ml_collections.ConfigDict(dict(name='fashion_mnist_idx', idx_dir=str(tmp_path / 'none'),
                                       data_dir=str(tmp_path / 'tfds')))
  with pytest.raises(fashion_mnist.MissingDatasetError) as e:
    pipeline.get_source(cfg, 'train')
  msg = str(e.value)
  assert 'dataset-fashion-mnist' in msg and str(tmp_path / 'none') in msg
  assert 'idx_dir' in msg


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_IDX_DIR),
                    reason='Debian package dataset-fashion-mnist not installed')
def test_debian_files_parse():
  images, labels = fashion_mnist.load_split(fashion_mnist.DEBIAN_IDX_DIR, 'test')
  assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
  assert np.bincount(labels).tolist() == [1000] * 10


def _copy_idx(idx_dir, dest):
  os.makedirs(dest)
  for name in os.listdir(idx_dir):
    with open(os.path.join(idx_dir, name), 'rb') as src, open(os.path.join(dest, name), 'wb') as f:
      f.write(src.read())
  return dest


def _label_shift(cfg):
  """k such that every training label is (id + k) % 10 (the fixture writes k = 0)."""
  source = pipeline.get_source(cfg, 'train')
  shifts = {(int(r['label']) - int(r['id'])) % 10 for r in source.__getitems__(range(len(source)))}
  assert len(shifts) == 1, shifts
  return shifts.pop()


def test_changed_source_rebuilds_the_converted_copy(idx_dir, tmp_path, capsys):
  cfg = ml_collections.ConfigDict(dict(name='fashion_mnist_idx', data_dir=str(tmp_path / 'tfds'),
                                       idx_dir=_copy_idx(idx_dir, str(tmp_path / 'idx'))))
  assert _label_shift(cfg) == 0
  assert 'Rebuilding' not in capsys.readouterr().out
  # Fixed labels in the same folder: the copy is rebuilt from them, not read stale.
  write_idx(os.path.join(cfg.idx_dir, 'train-labels-idx1-ubyte.gz'),
            (np.arange(96, dtype=np.uint8) + 3) % 10)
  assert _label_shift(cfg) == 3
  assert 'changed since conversion' in capsys.readouterr().out
  # Another folder with the same files: its paths differ, so it is rebuilt from there.
  cfg.idx_dir = _copy_idx(cfg.idx_dir, str(tmp_path / 'idx2'))
  assert _label_shift(cfg) == 3
  assert 'source files' in capsys.readouterr().out
  assert _label_shift(cfg) == 3  # now current: no rebuild
  assert 'Rebuilding' not in capsys.readouterr().out


def test_missing_source_of_a_converted_copy_is_an_error(dataset_cfg):
  pipeline.get_source(dataset_cfg, 'train')  # converted
  cfg = ml_collections.ConfigDict(dict(dataset_cfg, idx_dir='/nonexistent'))
  for check in (pipeline.check_dataset, lambda c: pipeline.get_source(c, 'train')):
    with pytest.raises(fashion_mnist.MissingDatasetError, match="'/nonexistent'.*dataset-fashion"):
      check(cfg)


def test_truncated_gz_names_the_file(tmp_path):
  path = str(tmp_path / 'train-images-idx3-ubyte.gz')
  write_idx(path, np.zeros((50, 28, 28), np.uint8) + 7)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(ValueError, match='train-images-idx3-ubyte.gz.*cannot be read'):
    fashion_mnist.read_idx(path)
