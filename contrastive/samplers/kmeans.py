"""k-means in jax.numpy (k-means++ seeding, then Lloyd's iterations), for cluster-restricted negatives.

Multistage Contrastive Learning (MCL) clusters the embeddings of the previous stage and, in the
next stage, keeps as negatives of an anchor only the samples of the anchor's own cluster: the
`assignments` returned here compare into such a mask, `assignments[:, None] == assignments[None]`.

Everything is written on logical global arrays. Under `kmeans(..., mesh=mesh)` the points are
split over the mesh's `data` axis and the centroids are replicated: each device assigns its own
rows, and XLA reduces the per-cluster sums of the update across devices.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from contrastive import parallel
from contrastive.losses import at_least_float32
from contrastive.losses import l2_normalize

_HIGHEST = jax.lax.Precision.HIGHEST


def check_args(x, k, num_iters=0):
  """Raises ValueError unless x is [N, D], 1 <= k <= N and num_iters >= 0."""
  if x.ndim != 2:
    raise ValueError(f'x must be [N, D]; got shape {tuple(x.shape)}.')
  n = x.shape[0]
  if not 1 <= k <= n:
    raise ValueError(f'k must satisfy 1 <= k <= N = {n} (x: {tuple(x.shape)}); got k = {k}.')
  if num_iters < 0:
    raise ValueError(f'num_iters must be >= 0; got {num_iters}.')


def squared_distances(x, centroids):
  """|x_i - c_j|^2 = |x_i|^2 - 2 x_i . c_j + |c_j|^2: [N, D], [k, D] -> [N, k] (clipped at 0)."""
  cross = jnp.dot(x, centroids.T, precision=_HIGHEST)  # (N, D) . (D, k) -> (N, k)
  d2 = jnp.sum(x * x, -1)[:, None] - 2.0 * cross + jnp.sum(centroids * centroids, -1)[None, :]
  return jnp.maximum(d2, 0.0)


def assign(x, centroids):
  """Index of the nearest centroid: [N, D], [k, D] -> [N] int32 (ties go to the lower index)."""
  return jnp.argmin(squared_distances(x, centroids), axis=-1).astype(jnp.int32)


def cluster_means(x, assignments, previous):
  """[k, D]: the mean of the points x [N, D] assigned ([N] int) to each cluster; a cluster
  with no point keeps its row of `previous` [k, D]."""
  onehot = jax.nn.one_hot(assignments, previous.shape[0], dtype=x.dtype)  # [N, k]
  sums = jnp.dot(onehot.T, x, precision=_HIGHEST)  # (k, N) . (N, D) -> (k, D)
  counts = jnp.sum(onehot, 0)[:, None]  # [k, 1]
  return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), previous)


def _row(x, i):
  """x[i] as a masked sum: with x's rows sharded this reduces a [D] vector across devices,
  where a dynamic-index gather would all-gather the whole of x."""
  return jnp.sum(jnp.where(jnp.arange(x.shape[0])[:, None] == i, x, 0), axis=0)


def kmeans_plus_plus_init(rng, x, k):
  """k-means++ seeding: k rows of x, each next one drawn with probability ~ D(x)^2.

  The first centre is uniform over the rows; centre t + 1 is row i with probability
  D_t(x_i)^2 / sum_j D_t(x_j)^2, where D_t(x) is the distance from x to the nearest of the
  first t centres. Rows already chosen have D = 0, so the k centres are distinct rows whenever
  x has at least k distinct rows (if all rows are already covered, the draw is uniform).

  Args:
    rng: a PRNG key.
    x: [N, D] points.
    k: number of centres, 1 <= k <= N (static).

  Returns:
    [k, D] centres, rows of x (in x's dtype, float32 for integer inputs).

  References:
    Arthur & Vassilvitskii 2007, "k-means++: The Advantages of Careful Seeding" (SODA), sec. 2.2.

  >>> x = jax.random.normal(jax.random.key(0), (32, 4))
  >>> kmeans_plus_plus_init(jax.random.key(1), x, 3).shape
  (3, 4)
  """
  check_args(x, k)
  x = jnp.asarray(x)
  x = x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)
  n = x.shape[0]
  first_rng, rng = jax.random.split(rng)
  first = _row(x, jax.random.randint(first_rng, (), 0, n))
  centres = jnp.zeros((k,) + x.shape[1:], x.dtype).at[0].set(first)
  min_d2 = jnp.sum((x - first) ** 2, -1)  # [N]; exact zeros at chosen rows

  def body(t, carry):
    centres, min_d2 = carry
    logits = jnp.where(min_d2 > 0, jnp.log(jnp.where(min_d2 > 0, min_d2, 1.0)), -jnp.inf)
    logits = jnp.where(jnp.any(min_d2 > 0), logits, 0.0)  # every row covered: uniform
    new = _row(x, jax.random.categorical(jax.random.fold_in(rng, t), logits))
    return centres.at[t].set(new), jnp.minimum(min_d2, jnp.sum((x - new) ** 2, -1))

  centres, _ = jax.lax.fori_loop(1, k, body, (centres, min_d2))
  return centres


def lloyd(x, centroids, num_iters):
  """num_iters of Lloyd's algorithm: assign each point to its nearest centroid, then move each
  centroid to the mean of its points.

  Empty clusters: a centroid that receives no point keeps its previous position (it is not
  re-seeded), so the iteration is deterministic and never produces NaNs; it may win points
  back in a later iteration.

  Args:
    x: [N, D] points.
    centroids: [k, D] starting centroids.
    num_iters: number of update steps, >= 0 (static; 0 only assigns).

  Returns:
    (centroids [k, D], assignments [N] int32, inertia): the final centroids, each point's
    nearest final centroid, and the scalar sum_i |x_i - c_{a_i}|^2; floats in float32 (float64
    for float64 points).

  References:
    Lloyd 1982, "Least squares quantization in PCM" (IEEE Trans. Inf. Theory).
  """
  check_args(x, centroids.shape[0], num_iters)
  if centroids.ndim != 2 or centroids.shape[1] != x.shape[1]:
    raise ValueError(f'centroids must be [k, D] with D = {x.shape[1]} as in x; got '
                     f'centroids: {tuple(centroids.shape)}, x: {tuple(x.shape)}.')
  x = at_least_float32(x)
  k = centroids.shape[0]

  def step(_, c):
    return cluster_means(x, assign(x, c), c)

  centroids = jax.lax.fori_loop(0, num_iters, step, jnp.asarray(centroids, x.dtype))
  assignments = assign(x, centroids)
  inertia = jnp.sum((x - centroids[assignments]) ** 2)
  return centroids, assignments, inertia


@functools.partial(jax.jit, static_argnames=('k', 'num_iters', 'cosine', 'mesh'))
def _kmeans(rng, x, *, k, num_iters, cosine, mesh):
  x = at_least_float32(x)
  if cosine:
    x = l2_normalize(x)
  if mesh is not None:
    x = jax.lax.with_sharding_constraint(x, parallel.data_sharding(mesh))
  centroids = kmeans_plus_plus_init(rng, x, k)
  if mesh is not None:
    centroids = jax.lax.with_sharding_constraint(centroids, parallel.replicated(mesh))
  centroids, assignments, inertia = lloyd(x, centroids, num_iters)
  if mesh is not None:
    centroids = jax.lax.with_sharding_constraint(centroids, parallel.replicated(mesh))
    assignments = jax.lax.with_sharding_constraint(assignments, parallel.data_sharding(mesh))
  return centroids, assignments, inertia


def kmeans(rng, x, k, *, num_iters=20, cosine=False, mesh=None):
  """k-means++ seeding followed by num_iters Lloyd iterations, under jax.jit.

  Args:
    rng: a PRNG key (for the seeding).
    x: [N, D] points.
    k: number of clusters, 1 <= k <= N.
    num_iters: Lloyd iterations, >= 0.
    cosine: L2-normalise the rows of x first (contrastive features are compared by cosine);
      the clustering is then Euclidean k-means of the unit vectors, and the centroids (means of
      unit vectors) are returned unnormalised.
    mesh: optional Mesh; x's rows are split over its `data` axis (N must be divisible by the
      axis size) and the centroids replicated. The result equals the one-device result up to
      the summation order of the centroid means.

  Returns:
    (centroids [k, D], assignments [N] int32, inertia scalar), as in `lloyd`: float32, or
    float64 for float64 points.

  >>> x = jax.random.normal(jax.random.key(0), (64, 8))
  >>> centroids, assignments, inertia = kmeans(jax.random.key(1), x, 4, num_iters=10)
  """
  x = x if hasattr(x, 'ndim') else np.asarray(x)
  check_args(x, k, num_iters)
  if mesh is not None:
    size = mesh.shape[parallel.DATA]
    if x.shape[0] % size:
      raise ValueError(f'N = {x.shape[0]} rows of x (shape {tuple(x.shape)}) must be divisible '
                       f'by the mesh {parallel.DATA!r} axis size {size}.')
    x = jax.device_put(x, parallel.data_sharding(mesh))
  return _kmeans(rng, x, k=int(k), num_iters=int(num_iters), cosine=bool(cosine), mesh=mesh)
