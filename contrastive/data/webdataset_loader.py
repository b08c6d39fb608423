"""The training stream of webdataset shards (contrastive/data/webdataset.py): each step's global
batch is drawn as `pipeline.train_loader` draws it, decoded, cropped and tokenized in grain
worker processes, and checked for skipped samples in the main process.

    rows = TrainRows(shards, tokenizer, context, cfg)        # the source: len, spec, tokenizer
    loader = train_loader(rows, global_batch_size=B, seed=0, workers=3)
    it = iter(loader)          # next(it) -> this process's rows of the next global batch:
    # {'a': [b, S, S, 3] uint8, 'b': [b, L] int32, 'id': [b] int32, 'truncated': [b] int32,
    #  'skipped': [b] int32 (1: the drawn sample was unusable and replaced)}, b = B / processes
    it.get_state() / it.set_state(...)   # the next step (and grain's workers): exact resume
    it.check(step, metrics)    # raises SkippedSamplesError past max_skipped_fraction

Step s reads positions [s B + p b, s B + (p + 1) b) of the endless per-epoch shuffle
(`batching.shuffle`, grain's index shuffle), so any number of processes see the one-process
batches. Sample i's crop is drawn from (seed, step, global row): the same on every host count
and on resume. The dataset is `grain.MapDataset.range` over steps mapped to batches, so grain's
`mp_prefetch` gives worker w the steps w, w + W, ... and its state is the next step of each.
"""

import os
import sys
import threading
import time

from absl import flags
import grain
import jax
import numpy as np

from contrastive.batching import shuffle
from contrastive.data import image_decode
from contrastive.data import shard_index
from contrastive.data import webdataset

LOGGED_SKIPS = 5  # the first skipped samples of a process are named in the log


class SkippedSamplesError(RuntimeError):
  """More samples were skipped than config.dataset.max_skipped_fraction allows."""


class TrainRows:
  """The training samples as the two-tower recipe's source: `len`, `spec`, `tokenizer`,
  `context` (what the recipe and evaluator read) and `batch(step, ...)` (what the workers
  run)."""

  with_row = False
  spec = webdataset.SPEC

  def __init__(self, shards, tokenizer, context, cfg):
    self.shards, self.tokenizer, self.context = shards, tokenizer, int(context)
    self.image_size = int(cfg['image_size'])
    self.scale = tuple(float(x) for x in cfg['crop_scale'])
    self.max_skipped_fraction = float(cfg['max_skipped_fraction'])

  def __len__(self):
    return len(self.shards)

  def _row(self, index, rng, out):
    """Decodes sample `index` (or its replacement) into `out` [S, S, 3]; returns (caption,
    group id, status of the drawn sample)."""
    def decode(image, caption, group, _):
      out[...] = image_decode.crop(image, self.image_size, scale=self.scale, rng=rng)
      return caption, group
    (caption, group), _, status = webdataset.usable(self.shards, index, decode)
    return caption, group, status

  def batch(self, indices, step, seed, first_row):
    """The stacked rows of samples `indices` (rows first_row, ... of global batch `step`)."""
    images = np.empty((len(indices), self.image_size, self.image_size, 3), np.uint8)
    rows = [self._row(int(i), np.random.default_rng([int(seed), int(step), first_row + n]),
                      images[n]) for n, i in enumerate(indices)]
    tokens, truncated = self.tokenizer.encode([r[0] for r in rows], self.context, per_row=True)
    status = np.array([r[2] for r in rows], np.int8)
    return {'a': images, 'b': tokens, 'id': np.array([r[1] for r in rows], np.int32),
            'truncated': truncated, 'skipped': (status != shard_index.OK).astype(np.int32),
            'skip_reason': status, 'skip_index': np.asarray(indices, np.int64)}


class _StepBatch:
  """step -> this process's share of global batch `step` (runs in the grain workers)."""

  def __init__(self, rows, global_batch_size, seed):
    self.rows, self.seed = rows, int(seed)
    self.b = global_batch_size // jax.process_count()
    self.first = jax.process_index() * self.b
    self.global_batch_size = global_batch_size

  def __call__(self, step):
    start = int(step) * self.global_batch_size + self.first
    indices = shuffle.positions(len(self.rows), self.seed, start, self.b)
    return self.rows.batch(indices, step, self.seed, self.first)


class Loader:
  """`iter(loader)` -> a `GuardedIterator` over grain's (multi-process) stream."""

  def __init__(self, dataset, rows, global_batch_size):
    self.dataset, self.rows, self.global_batch_size = dataset, rows, global_batch_size

  def __iter__(self):
    return GuardedIterator(iter(self.dataset), self.rows, self.global_batch_size)


def train_loader(rows, *, global_batch_size, seed, workers, buffer=2):
  """The endless stream of this process's batches (`Loader`); `workers` grain processes
  decode (0: the main process, one step ahead in a thread)."""
  if not flags.FLAGS.is_parsed():  # grain reads absl flags; a library caller may not parse
    flags.FLAGS.mark_as_parsed()
  dataset = grain.MapDataset.range(sys.maxsize).map(_StepBatch(rows, global_batch_size, seed))
  if workers:
    dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(workers), per_worker_buffer_size=buffer),
                                  worker_init_fn=exit_with_parent)
  else:
    dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                        prefetch_buffer_size=buffer))
  return Loader(dataset, rows, global_batch_size)


def exit_with_parent(worker_index, worker_count, period_s=1.0):
  """grain's worker_init_fn: the worker exits once its parent is gone (killed with -9, or
  ended by os._exit after an error), instead of blocking forever on its full queue."""
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while True:
      time.sleep(period_s)
      if os.getppid() != parent:
        os._exit(0)  # pylint: disable=protected-access

  threading.Thread(target=watch, daemon=True, name='exit_with_parent').start()


class GuardedIterator:
  """grain's iterator with the skip bookkeeping: drops the per-row skip details from each
  batch (keeping 'skipped'), counts skips per shard, names the first few in the log."""

  def __init__(self, iterator, rows, global_batch_size):
    self._it, self.rows, self.global_batch_size = iterator, rows, global_batch_size
    self.per_shard = np.zeros(len(rows.shards.paths), np.int64)  # this process, this start
    self.logged = 0

  def __iter__(self):
    return self

  def __next__(self):
    # Copied out of grain's shared memory, which is then freed at once (not at exit).
    batch = {k: np.array(v) for k, v in next(self._it).items()}
    reason, drawn = batch.pop('skip_reason'), batch.pop('skip_index')
    for index, why in zip(drawn[reason != shard_index.OK], reason[reason != shard_index.OK]):
      shard, _ = self.rows.shards.locate(int(index))
      self.per_shard[shard] += 1
      if self.logged < LOGGED_SKIPS:
        self.logged += 1
        print(f'Skipped sample {self.rows.shards.key(int(index))!r} of '
              f'{self.rows.shards.paths[shard]}: {shard_index.REASONS[int(why)]} (replaced by '
              'the next usable sample of its shard).', flush=True)
    return batch

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)

  def close(self):
    close = getattr(self._it, 'close', None)
    if close:
      close()

  def check(self, step, metrics):
    """Raises SkippedSamplesError if the run's skipped samples (metrics['skipped_samples'],
    over all processes) exceed max_skipped_fraction of an epoch's samples (within the first
    epoch) or of the samples drawn so far (after it)."""
    total = int(metrics.get('skipped_samples', 0))
    drawn = int(step) * self.global_batch_size
    limit = self.rows.max_skipped_fraction * max(drawn, len(self.rows))
    if total > limit:
      raise SkippedSamplesError(
          f'{total} samples skipped by step {step} ({total / max(drawn, 1):.2%} of the '
          f'{drawn} drawn), more than config.dataset.max_skipped_fraction='
          f'{self.rows.max_skipped_fraction} of an epoch\'s {len(self.rows)}; worst shards '
          f'(this process): {self.rows.shards.worst(self.per_shard) or "none seen here"}.')


def check_index(shards, max_fraction):
  """Before compiling: raises SkippedSamplesError if the index already marks more than
  `max_fraction` of the samples unusable (missing members, empty captions, truncation)."""
  if shards.bad_fraction() > max_fraction:
    per_reason = shards.status_counts.sum(0)
    reasons = ', '.join(f'{int(n)} {shard_index.REASONS[r]}' for r, n in enumerate(per_reason)
                        if r and n)
    raise SkippedSamplesError(
        f'{shards.bad_fraction():.2%} of the {len(shards)} samples are unusable ({reasons}), '
        f'more than config.dataset.max_skipped_fraction={max_fraction}; worst shards: '
        f'{shards.worst(shards.status_counts[:, 1:].sum(1))}.')
