"""The 'random' method: `pipeline.train_loader`'s shuffle, as epoch plans and as a stream.

train_loader reads `grain.MapDataset.range(N).shuffle(seed).repeat()` cut into global batches:
epoch e is a permutation of the N rows drawn from seed + e, the epochs follow each other with
no gap, and a batch may straddle two epochs (nothing is ever dropped). `RandomStream` gives
exactly those batches; `random_batches` gives epoch e's permutation cut into whole batches (the
last N mod B rows of each epoch dropped), which is the same thing when B divides N.

Also here: `epoch_rng`, the numpy generator every other method draws its epoch from.
"""

import functools

from grain.experimental import index_shuffle
import numpy as np

# Salts that keep the methods' random streams apart for the same (seed, epoch).
SALTS = {'random': 0, 'tas_b': 1, 'clusters': 2, 'neighbours': 3}


def epoch_rng(seed, epoch, method):
  """A numpy Generator that is a pure function of (seed, epoch, method)."""
  return np.random.default_rng([int(seed), int(epoch), SALTS[method]])


def _shuffled(num_rows, seed, epoch):
  """i -> the row at position i of epoch `epoch` in train_loader: grain's
  `MapDataset.shuffle` (index_shuffle, 4 rounds, the epoch's seed seed + e taken mod 2**32)."""
  return functools.partial(index_shuffle, max_index=num_rows - 1,
                           seed=(int(seed) + int(epoch)) % 2**32, rounds=4)


def positions(num_rows, seed, start, count):
  """Rows at positions [start, start + count) of train_loader's endless shuffled sequence:
  position e N + i is row i of epoch e's shuffle."""
  out = np.empty(count, np.int64)
  for n, position in enumerate(range(start, start + count)):
    epoch, index = divmod(position, num_rows)
    out[n] = _shuffled(num_rows, seed, epoch)(index)
  return out


def permutation(num_rows, seed, epoch):
  """Epoch `epoch`'s row order in train_loader for `seed`: [N] int64, a permutation of range(N).

  Grain's index shuffle, one row at a time (~10 us a row: ~10 s for a million rows).
  """
  return np.fromiter(map(_shuffled(num_rows, seed, epoch), range(num_rows)), np.int64,
                     num_rows)


def random_batches(seed, epoch, *, num_rows, global_batch_size):
  """Epoch `epoch` of the 'random' method cut into whole batches.

  Guarantees: every row at most once per epoch; all but the last N mod B rows of the epoch's
  permutation exactly once. Identical to train_loader's batches when B divides N.

  Returns:
    (batches [N // B, B] int64, rest [N mod B] int64: the rows the epoch leaves out).
  """
  order = permutation(num_rows, seed, epoch)
  steps = num_rows // global_batch_size
  return order[:steps * global_batch_size].reshape(steps, global_batch_size), \
      order[steps * global_batch_size:]


class RandomStream:
  """The 'random' plan as train_loader reads it: global batch s = positions [s B, (s + 1) B)
  of the endless sequence of per-epoch permutations (batches may straddle epochs).

  Each batch costs B index shuffles, as in train_loader; no epoch is held in memory.
  Grain's shuffle is reproduced here (grain.experimental.index_shuffle), not called, and
  tests/test_batching.py checks the batches against train_loader's.
  """

  method = 'random'

  def __init__(self, *, num_rows, global_batch_size):
    self.num_rows, self.global_batch_size = int(num_rows), int(global_batch_size)
    self.steps_per_epoch = self.num_rows // self.global_batch_size  # whole batches per N rows

  def rows(self, step, seed):
    """The global batch of `step`: [B] int64 row indices."""
    b = self.global_batch_size
    return positions(self.num_rows, seed, int(step) * b, b)

  def __call__(self, epoch, seed):
    """Epoch `epoch` cut into whole batches ([N // B, B]; see `random_batches`)."""
    return random_batches(seed, epoch, num_rows=self.num_rows,
                          global_batch_size=self.global_batch_size)[0]
