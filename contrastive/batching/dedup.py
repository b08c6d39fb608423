"""`no_duplicates`: no two rows with the same key (group id, text hash) in one global batch.

Rows with the same key are false negatives of each other (the same image under two captions,
synonyms, a repeated text); the loss can mask them, but a batch without them keeps all of its
B - 1 negatives. Applies after any method: the method's epoch (its batches, then the rows it
left out) is read as one sequence, and each batch is filled in order, first with rows pushed
back from earlier batches, then from the sequence; a row whose key is already in the batch is
pushed to a later one. The method's order is kept as far as the keys allow, so its per-batch
structure (one topic, whole clusters, seeds next to neighbours) holds only approximately.

When the sequence runs out before the last batch is full, the remaining pushed rows are
swapped into earlier batches in exchange for rows that fit (`_fill_by_swaps`); this always
succeeds when S batches are feasible at all: sum_k min(n_k, S) >= S B, with n_k the rows of key
k (each key can give at most one row to each batch). `feasible_steps` is the largest such S;
a plan with keys keeps min(method's S, that) batches per epoch. The rows still pushed back or
unread when the epoch's batches are full are dropped from that epoch: N - S B rows, as many as
the method drops when S is kept (but some of them are now rows that were pushed back), and
whole batches' worth more when the keys are too few for S batches. `DedupStats` counts them
(`epoch_order(..., with_stats=True)`, `EpochPlan.stats(epoch, seed)`).
"""

import typing

import numpy as np


class DedupStats(typing.NamedTuple):
  pushed: int  # rows of the method's batches placed in a later batch than it had them
  dropped: int  # rows of the epoch in no batch (the method's own left-out rows included)
  dropped_batches: int  # batches lost to the keys: method's S - S kept


def key_ids(keys, num_rows):
  """Keys of any hashable numpy dtype (ints, strings) -> [N] int64 ids; ValueError on length."""
  keys = np.asarray(keys)
  if keys.ndim != 1 or len(keys) != num_rows:
    raise ValueError(f'no_duplicates: keys must be [N] = [{num_rows}] (one key per row); got '
                     f'shape {keys.shape}.')
  return np.unique(keys, return_inverse=True)[1].reshape(-1).astype(np.int64)


def feasible_steps(key_counts, global_batch_size, max_steps):
  """The largest S <= max_steps with sum_k min(n_k, S) >= S B (0 if none).

  sum_k min(n_k, S) - S B is concave in S and 0 at S = 0, so the feasible S are 0 .. S*.
  """
  counts = np.sort(np.asarray(key_counts, np.int64))
  s = np.arange(max_steps + 1)
  below = np.searchsorted(counts, s)  # keys with n_k < S
  capacity = np.concatenate([[0], np.cumsum(counts)])[below] + s * (len(counts) - below)
  return int(np.flatnonzero(capacity >= s * global_batch_size).max())


def _fill_by_swaps(batch, seen, done, done_keys, pending, keys):
  """Fills `batch` from `pending` through earlier batches: a pending row r whose key is in
  `batch` goes to an earlier batch j without its key, and a row of j whose key is not in
  `batch` comes here. Returns False if no swap is left (only when S is infeasible)."""
  for i, r in enumerate(pending):
    k = keys[r]
    if k not in seen:  # fits directly
      batch.append(pending.pop(i))
      seen.add(k)
      return True
    for j in range(len(done) - 1, -1, -1):
      if k in done_keys[j]:
        continue
      for slot, other in enumerate(done[j]):
        if keys[other] not in seen:
          done[j][slot] = pending.pop(i)
          done_keys[j].discard(keys[other])
          done_keys[j].add(k)
          batch.append(other)
          seen.add(keys[other])
          return True
  return False


def no_duplicates(batches, rest, keys, *, steps=None):
  """Recomposes a method's epoch so that no global batch holds two rows with one key.

  Args:
    batches: [S, B] int, the method's batches of the epoch.
    rest: [R] int, the rows the method left out of the epoch (candidates to fill with).
    keys: [N] int key ids (`key_ids`).
    steps: batches to make (default S); must be feasible (`feasible_steps`).

  Returns:
    (batches [steps, B] int64, DedupStats).
  """
  batches = np.asarray(batches, np.int64)
  b = batches.shape[1]
  steps = len(batches) if steps is None else steps
  keys = np.asarray(keys).tolist()
  sequence = np.concatenate([batches.ravel(), np.asarray(rest, np.int64)]).tolist()
  position = {r: i for i, r in enumerate(sequence)}
  done, done_keys, pending, pushed, pos = [], [], [], set(), 0
  for _ in range(steps):
    batch, seen, kept = [], set(), []
    for r in pending:  # rows pushed back earlier, oldest first
      if len(batch) < b and keys[r] not in seen:
        batch.append(r)
        seen.add(keys[r])
      else:
        kept.append(r)
    pending = kept
    while len(batch) < b and pos < len(sequence):
      r = sequence[pos]
      pos += 1
      if keys[r] in seen:
        pending.append(r)
      else:
        batch.append(r)
        seen.add(keys[r])
    while len(batch) < b:
      if not _fill_by_swaps(batch, seen, done, done_keys, pending, keys):
        raise RuntimeError(f'no_duplicates: could not fill batch {len(done)} of {steps}; '
                           'steps must come from feasible_steps.')
    done.append(batch)
    done_keys.append(seen)
  for j, batch in enumerate(done):
    pushed.update(r for r in batch if j < position[r] // b < len(batches))
  out = np.asarray(done, np.int64).reshape(steps, b)
  return out, DedupStats(pushed=len(pushed), dropped=len(sequence) - steps * b,
                         dropped_batches=len(batches) - steps)
