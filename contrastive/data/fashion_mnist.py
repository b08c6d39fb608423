"""Fashion-MNIST as a tfds builder that reads local IDX files (no download, no TensorFlow).

The Debian package `dataset-fashion-mnist` installs the four IDX files under
`/usr/share/datasets/fashion-mnist/`. The builder below parses them with NumPy and
writes `array_record` shards, which `tfds.data_source` then reads with random access.

    builder = FashionMnistIdx(data_dir='~/tensorflow_datasets')
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=IDX_DIR),
        file_format='array_record')
    train = builder.as_data_source(split='train')   # train[i] -> {'image', 'label', 'id'}
"""

import gzip
import os
import zlib

import numpy as np
import tensorflow_datasets as tfds

DEBIAN_IDX_DIR = '/usr/share/datasets/fashion-mnist'
DEBIAN_PACKAGE = 'dataset-fashion-mnist'

_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_IDX_DTYPES = {0x08: np.uint8}

CLASS_NAMES = ('t-shirt/top', 'trouser', 'pullover', 'dress', 'coat', 'sandal',
               'shirt', 'sneaker', 'bag', 'ankle boot')


class MissingDatasetError(FileNotFoundError):
  """A dataset's files are not where the config says; the message says how to get them."""


def _find(idx_dir, stem):
  """Returns the path of `stem` or `stem.gz` in `idx_dir`, or raises MissingDatasetError."""
  for name in (stem, stem + '.gz'):
    path = os.path.join(idx_dir, name)
    if os.path.exists(path):
      return path
  raise MissingDatasetError(
      f'Fashion-MNIST file {stem}[.gz] not found in {idx_dir!r}: install the Debian package '
      f'`{DEBIAN_PACKAGE}` (apt-get install {DEBIAN_PACKAGE}, which provides {DEBIAN_IDX_DIR}) '
      'or point --config.dataset.idx_dir at a folder holding the four IDX files.')


def check_idx_files(idx_dir):
  """Raises MissingDatasetError (naming the package and the path) unless all four files exist."""
  source_files(idx_dir)


def source_files(idx_dir):
  """The paths of the four IDX files in `idx_dir` (raises MissingDatasetError if one is absent)."""
  return [_find(idx_dir, stem) for stems in _FILES.values() for stem in stems]


def read_idx(path):
  """Parses one IDX file (optionally gzipped) into a NumPy array.

  IDX layout: 2 zero bytes, a dtype byte (0x08 = uint8), the number of dimensions n,
  n big-endian uint32 sizes, then the data in C order.
  """
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      raw = f.read()
  except (EOFError, OSError, zlib.error) as e:  # a truncated or damaged .gz
    raise ValueError(f'{path!r} cannot be read ({type(e).__name__}: {e}): reinstall '
                     f'{DEBIAN_PACKAGE} or replace the file.') from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f'{path!r} is not a uint8 IDX file (header {raw[:4]!r}).')
  ndim = raw[3]
  shape = tuple(int(s) for s in np.frombuffer(raw, '>u4', count=ndim, offset=4))
  data = np.frombuffer(raw, _IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
  if data.size != int(np.prod(shape)):
    raise ValueError(f'{path!r} is truncated: header says {shape}, found {data.size} values.')
  return data.reshape(shape)


def load_split(idx_dir, split):
  """Returns (images [N, 28, 28] uint8, labels [N] uint8) of `split` in {'train', 'test'}."""
  images_stem, labels_stem = _FILES[split]
  images = read_idx(_find(idx_dir, images_stem))
  labels = read_idx(_find(idx_dir, labels_stem))
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f'{split}: {images.shape[0]} images but {labels.shape[0]} labels in {idx_dir!r}.')
  return images, labels


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (Xiao et al. 2017) from local IDX files; images [28, 28, 1] uint8."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Built from the IDX files of the Debian package.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'apt-get install {DEBIAN_PACKAGE} (files in {DEBIAN_IDX_DIR}), or pass '
      'DownloadConfig(manual_dir=...) naming a folder with the four IDX files.')

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
            'id': tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
    )

  def _split_generators(self, dl_manager):
    idx_dir = os.fspath(dl_manager.manual_dir)
    check_idx_files(idx_dir)
    return {split: self._generate_examples(idx_dir, split) for split in _FILES}

  def _generate_examples(self, idx_dir, split):
    images, labels = load_split(idx_dir, split)
    for i in range(images.shape[0]):
      yield i, {'image': images[i, :, :, None], 'label': int(labels[i]), 'id': i}
