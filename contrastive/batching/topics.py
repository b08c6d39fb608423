"""'tas_b': topic-aware batches, each drawn from one cluster of queries, balanced over the epoch.

Hofstätter et al. 2021, "Efficiently Teaching an Effective Dense Retriever with Balanced Topic
Aware Sampling" (SIGIR), sec. 3: the training queries are clustered once (k-means of a fixed
embedding of each query) and every batch is sampled from a single cluster, so that its
in-batch negatives share a topic.

Here an epoch visits every row once. The clusters are laid out one after another (their order
drawn from (seed, epoch), each cluster's rows shuffled), the sequence is cut into batches of B,
and the batches are put in a random order. A random order of all the epoch's batches is the
same as drawing, at every step, a cluster with probability proportional to the batches it has
left: clusters are sampled in proportion to their size.

A cluster whose size is not a multiple of B leaves a partial batch, handled by `partial`:
  'fill' (default): filled from the next cluster in the epoch's cluster order. Every row
    appears exactly once per epoch except the last N mod B of the sequence; every batch lies
    in one cluster except those at a boundary between two clusters (at most k - 1 per epoch).
  'drop': left out of the epoch. Every batch lies in one cluster; each cluster c contributes
    floor(n_c / B) batches and leaves out n_c mod B of its rows (different ones each epoch).
"""

import jax
import numpy as np

from contrastive.batching import shuffle
from contrastive.samplers import kmeans as kmeans_lib

PARTIAL = ('fill', 'drop')


def topic_clusters(embeddings, num_clusters, seed, *, num_iters=20, cosine=True):
  """k-means clusters of a fixed query embedding, computed once before training.

  Reuses `contrastive.samplers.kmeans` (k-means++ then Lloyd's, under jax.jit on the default
  device), seeded by `seed`: the same embedding, seed and platform give the same clusters.
  Store the result with the run (or recompute it identically) so a resumed run has the same plan.

  Args:
    embeddings: [N, D] float, one row per training example (e.g. a query encoder's output).
    num_clusters: k, 1 <= k <= N.
    seed: int, the k-means++ seeding.
    num_iters: Lloyd iterations.
    cosine: cluster the L2-normalised rows (embeddings compared by cosine).

  Returns:
    [N] int32 cluster ids in [0, k) (a cluster may be empty).
  """
  x = np.asarray(embeddings, np.float32)
  if x.ndim != 2:
    raise ValueError(f'embeddings must be [N, D]; got shape {x.shape}.')
  _, assignments, _ = kmeans_lib.kmeans(jax.random.key(int(seed)), x, int(num_clusters),
                                        num_iters=num_iters, cosine=cosine)
  return np.asarray(assignments, np.int32)


def check(clusters, num_rows, global_batch_size, partial):
  """Raises ValueError for clusters of the wrong shape or a `partial` mode it does not know;
  returns the number of batches per epoch."""
  clusters = np.asarray(clusters)
  if clusters.shape != (num_rows,) or not np.issubdtype(clusters.dtype, np.integer):
    raise ValueError(f"tas_b: clusters must be [N] = [{num_rows}] ints (one cluster id per "
                     f'row); got shape {clusters.shape}, dtype {clusters.dtype}.')
  if clusters.min() < 0:
    raise ValueError(f'tas_b: cluster ids must be >= 0; got min {clusters.min()}.')
  if partial not in PARTIAL:
    raise ValueError(f'tas_b: partial must be one of {PARTIAL}; got {partial!r}.')
  if partial == 'fill':
    return num_rows // global_batch_size
  steps = int(np.sum(np.bincount(clusters) // global_batch_size))
  if steps == 0:
    raise ValueError(f"tas_b: with partial='drop' no cluster has B = {global_batch_size} rows "
                     f'(largest: {np.bincount(clusters).max()}); use fewer clusters.')
  return steps


def tas_b_batches(seed, epoch, *, num_rows, global_batch_size, clusters, partial='fill'):
  """Epoch `epoch` of topic-aware balanced sampling (see the module docstring).

  Args:
    seed, epoch: the epoch's plan is a pure function of (seed, epoch, clusters).
    num_rows: N.
    global_batch_size: B.
    clusters: [N] int cluster ids (e.g. `topic_clusters`).
    partial: 'fill' or 'drop' (module docstring).

  Returns:
    (batches [S, B] int64, rest [R] int64: the rows the epoch leaves out, in a seeded order).
  """
  check(clusters, num_rows, global_batch_size, partial)
  clusters = np.asarray(clusters, np.int64)
  b = global_batch_size
  rng = shuffle.epoch_rng(seed, epoch, 'tas_b')
  rank = rng.permutation(int(clusters.max()) + 1)  # the epoch's cluster order
  order = np.lexsort((rng.random(num_rows), rank[clusters]))  # by cluster rank, shuffled within
  if partial == 'fill':
    steps = num_rows // b
    batches, rest = order[:steps * b].reshape(steps, b), order[steps * b:]
  else:
    position = np.arange(num_rows) - np.searchsorted(rank[clusters[order]],
                                                     rank[clusters[order]])  # index in cluster
    size = np.bincount(clusters, minlength=len(rank))[clusters[order]]
    keep = position < size // b * b
    batches, rest = order[keep].reshape(-1, b), order[~keep]
  return batches[rng.permutation(len(batches))], rest
