"""Input pipeline: tfds array_record sources read by grain, batches as global jax.Arrays.

Host side stays thin: it hands out uint8 images, labels and example ids; augmentation runs on
device inside the train step (`contrastive.data.augment`).
"""

import os
import shutil

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from contrastive.data import emoji
from contrastive.data import fashion_mnist
from contrastive.data import freshness
from contrastive.data import pairs
from contrastive.data import wordnet

# Our builders for offline data; any other name is a standard tfds dataset (needs internet
# the first time, e.g. 'fashion_mnist', 'cifar10').
LOCAL_BUILDERS = {'fashion_mnist_idx': fashion_mnist.FashionMnistIdx,
                  'emoji_cldr': emoji.EmojiCldr,  # image-text; two-tower records
                  'wordnet_gloss': wordnet.WordnetGloss,  # text-text; two-tower records
                  'jsonl_pairs': pairs.JsonlPairs}  # manual_dir (idx_dir) holds pairs.jsonl


def _data_dir(cfg):
  return os.path.expanduser(cfg.data_dir or os.path.join('~', 'tensorflow_datasets'))


# The source files each local builder converts (raising MissingDatasetError if one is absent),
# fingerprinted so that a changed source rebuilds the converted copy (data/freshness.py).
SOURCE_FILES = {'fashion_mnist_idx': lambda cfg: fashion_mnist.source_files(cfg.idx_dir)}


def check_dataset(cfg):
  """Raises MissingDatasetError (naming the package or path) if the dataset's source files are
  absent, converted copy or not (the copy is checked against them on use)."""
  if cfg.name in SOURCE_FILES:
    SOURCE_FILES[cfg.name](cfg)


def _prepared_builder(cfg):
  """The local builder of `cfg`, converted from its source files if it is not yet, or if they
  differ from those it was converted from (only process 0 writes in a multi-process job)."""
  builder = LOCAL_BUILDERS[cfg.name](data_dir=_data_dir(cfg))
  source = freshness.fingerprint(SOURCE_FILES[cfg.name](cfg)) if cfg.name in SOURCE_FILES else None
  stale = (source is not None and pairs.is_prepared(builder) and
           freshness.recorded(builder.data_dir) != source)
  if pairs.is_prepared(builder) and not stale:
    return builder
  if jax.process_index() == 0:
    if stale:
      print(f'Rebuilding {builder.data_dir}: '
            f'{freshness.describe_change(freshness.recorded(builder.data_dir), source)}.',
            flush=True)
      shutil.rmtree(builder.data_dir)
      builder = LOCAL_BUILDERS[cfg.name](data_dir=_data_dir(cfg))
    print(f'Converting {cfg.name} into array_record under {builder.data_dir}', flush=True)
    with pairs.quiet():  # tfds' "Unknown size" lines and warnings: the line above says it
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=cfg.get('idx_dir')),
          file_format='array_record')
    if source is not None:
      freshness.record(builder.data_dir, source)
  _sync_processes('prepare_' + cfg.name)
  # Re-read what process 0 wrote (a builder made before preparing has the default format).
  return LOCAL_BUILDERS[cfg.name](data_dir=_data_dir(cfg))


def get_source(cfg, split):
  """A random-access source of {'image', 'label', 'id'} records for `split` of dataset `cfg`.

  cfg fields: name, data_dir ('' = ~/tensorflow_datasets), idx_dir (for fashion_mnist_idx).
  Prepares the array_record files on first use, and again when the source files changed.
  """
  if cfg.name in LOCAL_BUILDERS:
    return _with_ids(_prepared_builder(cfg).as_data_source(split=split))
  return _with_ids(tfds.data_source(cfg.name, split=split, data_dir=_data_dir(cfg)))


class _with_ids(grain.sources.RandomAccessDataSource):
  """Keeps image and label and adds the record index as `id` when the dataset has none.

  `__getitems__` reads a whole batch in one call (array_record reads in parallel), which is
  ~5x faster than one `__getitem__` per record.
  """

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def _convert(self, index, record):
    return {'image': np.asarray(record['image'], np.uint8),
            'label': np.int32(record['label']),
            'id': np.int32(record.get('id', index))}

  def __getitem__(self, index):
    return self._convert(index, self._source[index])

  def __getitems__(self, indices):
    indices = [int(i) for i in indices]
    getitems = getattr(self._source, '__getitems__', None)
    records = getitems(indices) if getitems else [self._source[i] for i in indices]
    return [self._convert(i, r) for i, r in zip(indices, records)]


def _stack(records):
  return {k: np.stack([r[k] for r in records]) for k in records[0]}


def _sync_processes(name):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def train_loader(source, *, global_batch_size, seed, prefetch=2):
  """Shuffled, repeated, seeded grain dataset of this process's share of each global batch.

  The global order is the same for any number of processes: the record indices are reshuffled
  every epoch from `seed` and cut into global batches, and process p reads rows
  [p * b, (p + 1) * b) of each, b = global_batch_size / process_count. With the mesh's devices
  in process order (`jax.devices()`), `to_global` then puts every row where a single process
  would, so a multi-process run sees exactly the single-process batches. `iter(loader)` has
  `get_state()` / `set_state()`, which a checkpoint stores to resume the data stream exactly.

  Returns:
    grain.IterDataset of {'image': [b, H, W, C] uint8, 'label': [b] int32, 'id': [b] int32}.
  """
  num_processes, index = jax.process_count(), jax.process_index()
  local_batch = global_batch_size // num_processes
  batches = (grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
             .batch(global_batch_size, drop_remainder=True, batch_fn=np.asarray)
             .map(lambda idx: idx[index * local_batch:(index + 1) * local_batch])
             .map(lambda idx: _stack(source.__getitems__(idx))))
  return batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))


def to_global(batch, sharding):
  """Host-local numpy batch (this process's rows) -> dict of global jax.Arrays sharded by `sharding`."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def load_arrays(source, *, max_examples=None):
  """All records of `source` (or the first max_examples, if > 0) as numpy arrays."""
  n = min(len(source), max_examples) if max_examples else len(source)
  return _stack(source.__getitems__(range(n)))
