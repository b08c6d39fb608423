"""Epoch plans: every method's global batches as a pure function of (seed, epoch).

`epoch_order(method, epoch, seed, ...)` is epoch `epoch`'s [S, B] row indices for one method;
`plan(method, ...)` checks the arguments once and returns the object `composed_loader` reads,
which maps a global step to its batch (step // S is the epoch, step % S the row of its plan)
and keeps the last epochs' plans. Everything raises a one-line ValueError on bad input before
any work: an unknown method, a batch larger than the dataset, a cluster size that does not
divide the batch, a neighbour table or keys of the wrong shape.

Every epoch plan drops what does not fill a whole batch at the end of the epoch (train_loader's
drop_remainder, per epoch). Only 'random' without keys keeps train_loader's own semantics
exactly: its plan is a `shuffle.RandomStream`, whose batches straddle epochs.
"""

import threading

import numpy as np

from contrastive.batching import clusters as clusters_lib
from contrastive.batching import dedup
from contrastive.batching import neighbours as neighbours_lib
from contrastive.batching import shuffle
from contrastive.batching import topics

METHODS = ('random', 'tas_b', 'clusters', 'neighbours')
# Each method's function (seed, epoch, *, num_rows, global_batch_size, **args) -> (batches,
# rest), and the arguments it takes: (required, optional).
_FUNCTIONS = {'random': shuffle.random_batches, 'tas_b': topics.tas_b_batches,
              'clusters': clusters_lib.cluster_batches,
              'neighbours': neighbours_lib.neighbour_batches}
_ARGS = {'random': ((), ()), 'tas_b': (('clusters',), ('partial',)),
         'clusters': (('assignments', 'cluster_size'), ()),
         'neighbours': (('neighbours',), ('per_seed',))}


def _check_method_args(method, num_rows, global_batch_size, seed, args):
  """Raises ValueError for any bad argument; returns the method's batches per epoch."""
  if method not in METHODS:
    raise ValueError(f'unknown batching method {method!r}; known: {", ".join(METHODS)}.')
  b = int(global_batch_size)
  if b < 1:
    raise ValueError(f'global_batch_size must be >= 1; got {b}.')
  if b > num_rows:
    raise ValueError(f'global_batch_size {b} is larger than the dataset ({num_rows} rows).')
  if seed is not None and not 0 <= int(seed) < 2**32:
    raise ValueError(f'seed must be in [0, 2**32); got {seed}.')
  required, optional = _ARGS[method]
  missing = [a for a in required if a not in args]
  unknown = [a for a in args if a not in required + optional]
  if missing or unknown:
    raise ValueError(f'{method}: takes {", ".join(required + optional) or "no arguments"}; '
                     f'missing {missing}, unknown {unknown}.')
  if method == 'tas_b':
    return topics.check(args['clusters'], num_rows, b, args.get('partial', 'fill'))
  if method == 'clusters':
    clusters_lib.check_cluster_size(args['cluster_size'], b, num_rows)
    if not callable(args['assignments']):
      clusters_lib.check_assignments(args['assignments'], num_rows, args['cluster_size'])
    return (num_rows // args['cluster_size']) // (b // args['cluster_size'])
  if method == 'neighbours' and not callable(args['neighbours']):
    neighbours_lib.check_table(args['neighbours'], num_rows, args.get('per_seed', 1))
  return num_rows // b


def _dedup_steps(keys, num_rows, global_batch_size, method_steps):
  """Key ids and the batches per epoch no_duplicates keeps; ValueError if it can keep none."""
  ids = dedup.key_ids(keys, num_rows)
  counts = np.bincount(ids)
  steps = dedup.feasible_steps(counts, global_batch_size, method_steps)
  if steps == 0:
    raise ValueError(f'no_duplicates: no global batch of {global_batch_size} rows with '
                     f'distinct keys exists ({len(counts)} distinct keys among {num_rows} rows).')
  return ids, steps


def epoch_order(method, epoch, seed, *, num_rows, global_batch_size, keys=None,
                with_stats=False, **method_args):
  """Epoch `epoch`'s global batches of row indices for `method`, a pure function of its inputs.

  Args:
    method: 'random' (shuffle.py), 'tas_b' (topics.py), 'clusters' (clusters.py) or
      'neighbours' (neighbours.py); each module states its paper and guarantees.
    epoch: int >= 0.
    seed: int in [0, 2**32).
    num_rows: N, the rows of the dataset.
    global_batch_size: B <= N.
    keys: optional [N] key per row (group id, text hash): no two rows with the same key in one
      batch (dedup.py); the epoch may then have fewer batches.
    with_stats: also return the epoch's `dedup.DedupStats` (rows pushed and dropped).
    **method_args: tas_b: clusters [N], partial; clusters: assignments [N], cluster_size;
      neighbours: neighbours [N, k], per_seed.

  Returns:
    [S, B] int64 row indices (and DedupStats if with_stats).
  """
  steps = _check_method_args(method, num_rows, global_batch_size, seed, method_args)
  ids = None if keys is None else _dedup_steps(keys, num_rows, global_batch_size, steps)
  return _compose(method, epoch, seed, num_rows, global_batch_size, method_args, ids,
                  with_stats)


def _compose(method, epoch, seed, num_rows, global_batch_size, args, ids, with_stats=True):
  batches, rest = _FUNCTIONS[method](seed, epoch, num_rows=num_rows,
                                     global_batch_size=global_batch_size, **args)
  if ids is None:
    stats = dedup.DedupStats(pushed=0, dropped=num_rows - batches.size, dropped_batches=0)
  else:
    batches, stats = dedup.no_duplicates(batches, rest, ids[0], steps=ids[1])
  return (batches, stats) if with_stats else batches


class EpochPlan:
  """A plan read one epoch at a time: fn(epoch, seed) -> [S, B] (or ([S, B], DedupStats)).

  `rows(step, seed)` is row step % S of epoch step // S's plan; the last `cache` epochs' plans
  are kept (thread-safe: grain may call from its reader thread).
  """

  def __init__(self, fn, *, steps_per_epoch, global_batch_size, num_rows=None, method=None,
               cache=2):
    if steps_per_epoch < 1:
      raise ValueError(f'steps_per_epoch must be >= 1; got {steps_per_epoch}.')
    self.fn, self.method, self.num_rows = fn, method, num_rows
    self.steps_per_epoch, self.global_batch_size = int(steps_per_epoch), int(global_batch_size)
    self._cache, self._size, self._lock = {}, cache, threading.Lock()

  def _get(self, epoch, seed):
    with self._lock:
      key = (int(epoch), int(seed))
      if key not in self._cache:
        out = self.fn(*key)
        batches, stats = out if isinstance(out, tuple) else (out, None)
        batches = np.asarray(batches, np.int64)
        if batches.shape != (self.steps_per_epoch, self.global_batch_size):
          raise ValueError(f'epoch {epoch}: the plan is {batches.shape}; expected [S, B] = '
                           f'[{self.steps_per_epoch}, {self.global_batch_size}].')
        while len(self._cache) >= self._size:
          self._cache.pop(next(iter(self._cache)))
        self._cache[key] = batches, stats
      return self._cache[key]

  def __call__(self, epoch, seed):
    """Epoch `epoch`'s [S, B] row indices."""
    return self._get(epoch, seed)[0]

  def stats(self, epoch, seed):
    """Epoch `epoch`'s DedupStats (None for a plan function that gives none)."""
    return self._get(epoch, seed)[1]

  def rows(self, step, seed):
    """The global batch of `step`: [B] int64 row indices."""
    epoch, index = divmod(int(step), self.steps_per_epoch)
    return self(epoch, seed)[index]


# The argument of each method that may be a function of the period (recomputed embeddings).
PERIODIC = {'clusters': 'assignments', 'neighbours': 'neighbours'}


def plan(method, *, num_rows, global_batch_size, keys=None, recluster_every=1, **method_args):
  """The plan of `method` for `composed_loader`, its arguments checked now (see epoch_order).

  'random' without keys is a `shuffle.RandomStream` (train_loader's batches exactly); every
  other plan is an `EpochPlan` over `epoch_order`. For 'clusters' the `assignments`, and for
  'neighbours' the `neighbours` table, may be a function period -> array, called once for
  each period = epoch // recluster_every (the caller's reclustering or neighbour search of the
  current embeddings, `clusters.balanced_clusters` / `neighbours.neighbour_table`). It must
  give the same array when asked again (store it with the checkpoint) for a run to resume
  exactly; grain reads ahead, so it is called up to `prefetch` steps before the period
  starts (`composed_loader(prefetch=0)` reads each batch when the loop asks for it).
  """
  steps = _check_method_args(method, num_rows, global_batch_size, None, method_args)
  if recluster_every < 1 or (recluster_every != 1 and method not in PERIODIC):
    raise ValueError(f"recluster_every applies to {tuple(PERIODIC)} only and must be >= 1; got "
                     f'{recluster_every} for {method!r}.')
  if method == 'random' and keys is None:
    return shuffle.RandomStream(num_rows=num_rows, global_batch_size=global_batch_size)
  ids = None if keys is None else _dedup_steps(keys, num_rows, global_batch_size, steps)
  name = PERIODIC.get(method)
  structure, periods = method_args.get(name), {}

  def fn(epoch, seed):
    args = method_args
    if callable(structure):
      period = epoch // recluster_every
      if period not in periods:
        periods.clear()  # one period at a time
        periods[period] = np.asarray(structure(period))
        if method == 'clusters':
          clusters_lib.check_assignments(periods[period], num_rows, args['cluster_size'])
        else:
          neighbours_lib.check_table(periods[period], num_rows, args.get('per_seed', 1))
      args = dict(method_args, **{name: periods[period]})
    return _compose(method, epoch, seed, num_rows, global_batch_size, args, ids)

  return EpochPlan(fn, steps_per_epoch=steps if ids is None else ids[1],
                   global_batch_size=global_batch_size, num_rows=num_rows, method=method)
