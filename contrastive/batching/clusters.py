"""'clusters': batches made of whole clusters of the current embeddings (NGAME).

Dahiya et al. 2023, "NGAME: Negative Mining-aware Mini-batching for Extreme Classification"
(WSDM), sec. 3: every few epochs the training points are clustered by their current
embeddings into small clusters of equal size, and a batch is a random set of whole clusters,
so the in-batch negatives are hard ones the model already confuses.

Contract (`recluster_every` epochs): the caller computes the embeddings for the period
p = epoch // recluster_every, partitions them with `balanced_clusters`, and passes the
assignment; the plan of epoch e is a pure function of (seed, e, that assignment), so a run
resumes exactly if the assignment of the current period is stored with the checkpoint (or
recomputed identically).

Guarantees of `cluster_batches`: every batch is the union of B / c whole clusters; every
clustered row appears at most once per epoch; of the N // c clusters, (N // c) mod (B / c)
(drawn anew each epoch) and the N mod c unclustered rows are left out of the epoch.
"""

import numpy as np

from contrastive.batching import shuffle


def check_cluster_size(cluster_size, global_batch_size, num_rows):
  """Raises ValueError unless 1 <= c <= B, c divides B and B <= N."""
  c, b = int(cluster_size), int(global_batch_size)
  if c < 1:
    raise ValueError(f'clusters: cluster_size must be >= 1; got {c}.')
  if c > b:
    raise ValueError(f'clusters: clusters larger than the batch (cluster_size {c} > '
                     f'global_batch_size {b}).')
  if b % c:
    raise ValueError(f'clusters: cluster_size {c} must divide global_batch_size {b} '
                     f'(a batch is B / c whole clusters).')
  if b > num_rows:
    raise ValueError(f'clusters: global_batch_size {b} is larger than the dataset ({num_rows} '
                     'rows).')


def _pieces_sums(xs, starts, lefts, ends):
  """Sums of xs over rows [start, left) and [left, end) of each segment: ([S, D], [S, D])."""
  padded = np.concatenate([xs, np.zeros((1, xs.shape[1]), xs.dtype)])  # index N is valid
  sums = np.add.reduceat(padded, np.stack([starts, lefts, ends], 1).ravel(), axis=0)
  return sums[0::3], sums[1::3]


def balanced_clusters(embeddings, cluster_size, seed, *, num_iters=5, cosine=True):
  """Partitions the N rows into N // c clusters of exactly c rows by recursive balanced 2-means.

  A set of rows worth m clusters (m c rows) is split into floor(m / 2) c and ceil(m / 2) c rows
  by a balanced 2-means: two centroids start at two random rows of the set; each iteration
  ranks the rows by |x - c1|^2 - |x - c2|^2 = 2 x . (c2 - c1) + const, gives the first
  floor(m / 2) c to c1 and the rest to c2, and moves each centroid to the mean of its side.
  Each side is split again until it holds one cluster. All the sets of one level of the tree
  are split together (vectorised), so the cost is ceil(log2(N / c)) levels of num_iters
  O(N D) passes and a sort. The N mod c rows left over are chosen at random first and get id
  -1 (pass a different seed at each reclustering, e.g. seed + period, so that it is not always
  the same rows).

  Args:
    embeddings: [N, D] float, the current embeddings.
    cluster_size: c, 1 <= c <= N.
    seed: int; the result is a pure function of (embeddings, cluster_size, seed, num_iters).
    num_iters: 2-means iterations per split, >= 1.
    cosine: cluster the L2-normalised rows.

  Returns:
    [N] int32 ids: N // c clusters with ids 0 .. N // c - 1 of exactly c rows each, -1 for the
    rest. Nearby ids are nearby clusters (siblings in the split tree).
  """
  x = np.asarray(embeddings, np.float32)
  if x.ndim != 2:
    raise ValueError(f'embeddings must be [N, D]; got shape {x.shape}.')
  n, c = len(x), int(cluster_size)
  if not 1 <= c <= n:
    raise ValueError(f'cluster_size must satisfy 1 <= c <= N = {n}; got {c}.')
  if cosine:
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  rng = np.random.default_rng([int(seed), 2])
  order = np.sort(rng.permutation(n)[:n // c * c])  # the clustered rows, segment by segment
  # The tree's current level: segment j holds order[starts[j]:starts[j] + clusters[j] c] and
  # becomes clusters firsts[j] .. firsts[j] + clusters[j] - 1.
  starts, clusters, firsts = np.zeros(1, np.int64), np.array([n // c]), np.zeros(1, np.int64)
  while clusters.max() > 1:
    sizes = clusters * c
    split = clusters > 1  # segments of one cluster stay as they are
    lefts = starts + np.where(split, clusters // 2 * c, sizes)
    segment = np.repeat(np.arange(len(starts)), sizes)  # segment of each position of order
    first = starts + (rng.random(len(starts)) * sizes).astype(np.int64)
    second = starts + (first - starts + 1 + (rng.random(len(starts)) * (sizes - 1)).astype(
        np.int64)) % sizes  # a different row of the same segment
    c1, c2 = x[order[first]], x[order[second]]
    xs = x[order]
    for _ in range(max(num_iters, 1)):
      score = np.einsum('nd,nd->n', xs, (c2 - c1)[segment])  # x . (c2 - c1), [N]
      score[~split[segment]] = 0
      by_score = np.lexsort((score, segment))  # sorted by score within each segment
      order, xs = order[by_score], xs[by_score]
      left_sums, right_sums = _pieces_sums(xs, starts, lefts, starts + sizes)
      c1 = left_sums / np.maximum(lefts - starts, 1)[:, None]
      c2 = right_sums / np.maximum(starts + sizes - lefts, 1)[:, None]
    half = clusters // 2
    starts = np.where(split[:, None], np.stack([starts, lefts], 1), starts[:, None])
    firsts = np.where(split[:, None], np.stack([firsts, firsts + half], 1), firsts[:, None])
    clusters = np.where(split[:, None], np.stack([half, clusters - half], 1),
                        np.stack([clusters, 0 * clusters], 1))
    keep = clusters.ravel() > 0
    starts, firsts, clusters = starts.ravel()[keep], firsts.ravel()[keep], clusters.ravel()[keep]
  ids = np.full(n, -1, np.int32)
  ids[order] = np.repeat(firsts, c)
  return ids


def check_assignments(assignments, num_rows, cluster_size):
  """Raises ValueError unless `assignments` is [N] ints with N // c clusters 0 .. N // c - 1 of
  exactly c rows each and -1 for the other rows (as `balanced_clusters` returns)."""
  a = np.asarray(assignments)
  if a.shape != (num_rows,) or not np.issubdtype(a.dtype, np.integer):
    raise ValueError(f'clusters: assignments must be [N] = [{num_rows}] ints; got shape '
                     f'{a.shape}, dtype {a.dtype}.')
  m = num_rows // cluster_size
  counts = np.bincount(a[a >= 0], minlength=m)
  if a.min() < -1 or len(counts) != m or np.any(counts != cluster_size):
    raise ValueError(f'clusters: assignments must hold N // c = {m} clusters (ids 0..{m - 1}) '
                     f'of exactly c = {cluster_size} rows and -1 elsewhere; got ids in '
                     f'[{a.min()}, {a.max()}], cluster sizes {sorted(set(counts.tolist()))} '
                     '(use balanced_clusters).')


def cluster_batches(seed, epoch, *, num_rows, global_batch_size, assignments, cluster_size):
  """Epoch `epoch` of NGAME's cluster batches: a random selection of B / c whole clusters each.

  Args:
    seed, epoch: with `assignments`, all the plan depends on.
    num_rows: N.
    global_batch_size: B, a multiple of cluster_size.
    assignments: [N] int cluster ids (`balanced_clusters` of the current embeddings).
    cluster_size: c.

  Returns:
    (batches [(N // c) // (B / c), B] int64, each row a run of B / c whole clusters;
     rest [R] int64: the rows of the clusters left out, then the unclustered rows).
  """
  check_cluster_size(cluster_size, global_batch_size, num_rows)
  check_assignments(assignments, num_rows, cluster_size)
  a = np.asarray(assignments, np.int64)
  per_batch, m = global_batch_size // cluster_size, num_rows // cluster_size
  members = np.argsort(a, kind='stable')[num_rows - m * cluster_size:]  # skip the -1 rows
  members = members.reshape(m, cluster_size)  # [m, c] rows of cluster 0, 1, ...
  rng = shuffle.epoch_rng(seed, epoch, 'clusters')
  order = rng.permutation(m)
  steps = m // per_batch
  batches = members[order[:steps * per_batch]].reshape(steps, global_batch_size)
  rest = np.concatenate([members[order[steps * per_batch:]].ravel(),
                         rng.permutation(np.flatnonzero(a < 0))])
  return batches, rest
