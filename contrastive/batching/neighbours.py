"""'neighbours': batches of seed rows and their nearest neighbours (Sample4Geo).

Deuser et al. 2023, "Sample4Geo: Hard Negative Sampling For Cross-View Geo-Localisation"
(ICCV), sec. 3.3: after the first epoch, the nearest neighbours of every sample by the current
embeddings are computed, and a batch is built by taking random samples and adding, next to
each, its not-yet-used nearest neighbours, so that they are each other's hard negatives; every
sample is still used once per epoch.

Guarantees of `neighbour_batches`: every row appears exactly once per epoch except the last
N mod B of the epoch's sequence (at most once in all); next to each seed row its batch holds
its first `per_seed` neighbours (in table order) that were not used yet, as far as the batch
has room. Recompute the table (`neighbour_table`) when the embeddings change and store it with
the checkpoint: the plan of epoch e is a pure function of (seed, e, table).
"""

import numpy as np

from contrastive.batching import shuffle


def neighbour_table(embeddings, k, *, cosine=True, chunk=4096):
  """The k nearest other rows of every row, nearest first: [N, D] -> [N, k] int64.

  Brute force in numpy, `chunk` rows at a time ([chunk, N] distances in memory), O(N^2 D):
  for large N use an approximate index and pass its table. Deterministic for the same input
  (rows at equal distance are ordered as numpy's partition leaves them).
  """
  x = np.asarray(embeddings, np.float32)
  if x.ndim != 2:
    raise ValueError(f'embeddings must be [N, D]; got shape {x.shape}.')
  n = len(x)
  if not 1 <= k < n:
    raise ValueError(f'k must satisfy 1 <= k < N = {n}; got {k}.')
  if cosine:
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  sq = np.sum(x * x, -1)
  table = np.empty((n, k), np.int64)
  for start in range(0, n, chunk):
    block = slice(start, min(start + chunk, n))
    d2 = sq[block, None] - 2.0 * (x[block] @ x.T) + sq[None, :]  # (b, D) . (D, N) -> (b, N)
    d2[np.arange(d2.shape[0]), np.arange(block.start, block.stop)] = np.inf  # not itself
    nearest = np.argpartition(d2, k - 1, axis=1)[:, :k]  # the k nearest, unordered
    by_distance = np.argsort(np.take_along_axis(d2, nearest, 1), axis=1, kind='stable')
    table[block] = np.take_along_axis(nearest, by_distance, 1)
  return table


def check_table(neighbours, num_rows, per_seed):
  """Raises ValueError unless the table is [N, k] ints in [0, N) and per_seed >= 0."""
  t = np.asarray(neighbours)
  if t.ndim != 2 or t.shape[0] != num_rows or t.shape[1] < 1 or not np.issubdtype(
      t.dtype, np.integer):
    raise ValueError(f'neighbours: the table must be [N, k] = [{num_rows}, k >= 1] ints; got '
                     f'shape {t.shape}, dtype {t.dtype}.')
  if t.min() < 0 or t.max() >= num_rows:
    raise ValueError(f'neighbours: table entries must be row indices in [0, {num_rows}); got '
                     f'[{t.min()}, {t.max()}].')
  if per_seed < 0:
    raise ValueError(f'neighbours: per_seed must be >= 0; got {per_seed}.')


def neighbour_batches(seed, epoch, *, num_rows, global_batch_size, neighbours, per_seed=1):
  """Epoch `epoch` of Sample4Geo's neighbour batches.

  Seeds are taken in a random order drawn from (seed, epoch); a row already placed is skipped.
  Each seed is followed by up to `per_seed` of its not-yet-placed neighbours (stopping at the
  end of the batch), and the sequence is cut into batches of B.

  Args:
    seed, epoch: with `neighbours`, all the plan depends on.
    num_rows: N.
    global_batch_size: B.
    neighbours: [N, k] int table, nearest first (`neighbour_table`).
    per_seed: neighbours placed next to each seed, the first not-yet-placed ones of its table
      row (Sample4Geo's "neighbour_select").

  Returns:
    (batches [N // B, B] int64, rest [N mod B] int64: the rows left out).
  """
  check_table(neighbours, num_rows, per_seed)
  b = global_batch_size
  table = np.asarray(neighbours).tolist()
  used = bytearray(num_rows)
  sequence = []
  for s in shuffle.epoch_rng(seed, epoch, 'neighbours').permutation(num_rows).tolist():
    if used[s]:
      continue
    used[s] = 1
    sequence.append(s)
    wanted = len(sequence) + min(per_seed, -len(sequence) % b)  # stop at the end of the batch
    for nb in table[s]:
      if len(sequence) == wanted:
        break
      if not used[nb]:
        used[nb] = 1
        sequence.append(nb)
  sequence = np.asarray(sequence, np.int64)
  steps = num_rows // b
  return sequence[:steps * b].reshape(steps, b), sequence[steps * b:]
