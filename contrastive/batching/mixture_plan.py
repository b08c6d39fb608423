"""A mixture's batches (`data/mixture.py`): a fixed number of rows of each part in every global
batch, each part shuffled by its own `RandomStream`."""

import numpy as np

from contrastive.batching.shuffle import RandomStream


class MixturePlan:
  """Global batch s of a mixture: B f_k rows of each part k, part k's rows in its own
  `RandomStream` (train_loader's shuffle of that part, seed + k), offset to the mixture's
  row numbers. Deterministic in (seed, s): resume is exact."""

  method = 'mixture'

  def __init__(self, part_sizes, part_batch_sizes):
    self.starts = np.cumsum([0] + list(part_sizes))[:-1]
    self.streams = [RandomStream(num_rows=n, global_batch_size=b)
                    for n, b in zip(part_sizes, part_batch_sizes)]
    self.num_rows, self.global_batch_size = int(sum(part_sizes)), int(sum(part_batch_sizes))
    self.steps_per_epoch = min(s.steps_per_epoch for s in self.streams)

  def rows(self, step, seed):
    """[B] int64: the parts' rows of global batch `step`, part by part."""
    return np.concatenate([start + stream.rows(step, seed + k) for k, (start, stream) in
                           enumerate(zip(self.starts, self.streams))])
