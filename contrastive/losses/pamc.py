r"""PamC: InfoNCE whose negative sum runs over meta-nodes (soft clusters of keys), O(B K D).

InfoNCE's denominator pairs every query with every key, O(B^2 D). PamC (Kulatilleke, Portmann &
Chandra 2022) replaces the node pairs by node-to-cluster pairs: the keys are grouped into K
meta-nodes by soft assignments C [B, K] (rows on the simplex), and each meta-node stands for its
keys with its mass and its centroid,

    n_k = sum_j C_jk,        S_k = sum_j C_jk k_j,        mu_k = S_k / n_k.

With q, k L2-normalised, s_ij = q_i . k_j and tau the temperature, the positive stays exact and
only the B - 1 negatives are approximated. Row i's own key is taken out of every meta-node
first (its leave-one-out mass r_ik and centroid similarity m_ik):

    r_ik = n_k - C_ik,        m_ik = q_i . (S_k - C_ik k_i) / r_ik = (q_i . S_k - C_ik s_ii) / r_ik,

    sum_{j != i} exp(s_ij / tau)  ~  N^_i = sum_k r_ik exp(m_ik / tau),

    l_i = -s_ii / tau + log(exp(s_ii / tau) + N^_i),        loss = mean_i l_i.

The masses r_ik of row i add up to B - 1, its number of negatives. m_ik is the C_jk-weighted
mean of s_ij over the negatives j, so by Jensen (exp is convex) each meta-node's term is at most
the sum it replaces: N^_i <= sum_{j != i} exp(s_ij / tau), and the loss is at most InfoNCE's,
with equality when every meta-node's keys are identical, or K = B with C = I (each key its own
meta-node: the exact loss). The gap grows with the spread of s_ij inside a meta-node relative to
tau (a second-order expansion: ~ r_ik exp(m_ik/tau) Var_k(s_ij) / (2 tau^2) per meta-node).

Assignments. The paper learns soft assignments with a clustering head (graph clustering);
`assignments=` takes such learnt C, and the gradient then flows through it. Without them (the
SimCLR recipe has no clustering head) C comes from `iterations` steps of soft spherical k-means
on the stop-gradient keys, parameter-free and deterministic: the centroids start at the keys of
rows 0, s, 2s, ..., (K-1)s with s = B // K (the batch order is already random), and each step
sets C_jk = softmax_k(k_j . mu^_k / t_a) (mu^ the unit centroids, t_a = assignment_temperature)
and mu_k = sum_j C_jk k_j. A low t_a makes C nearly hard, which minimises the within-cluster
spread (the error above); a soft C keeps the loss a smooth function of the keys. No gradient
flows through the k-means (SwAV/DeepCluster-style targets): the gradient reaches q through s_ii
and m_ik, and k through s_ii and the centroid sums S_k.

Cost: 2 iterations + 4 products of [B, D] and [D, K] forward (the initial pick, two per k-means
step, the last assignment, S and q . S) and 3 backward, O(B K) memory: against the 3 [B, D] x
[D, B] products of InfoNCE it is faster while K < 3 B / (2 iterations + 7), B / 4.3 with the
default 3 iterations. Sharded, only the [K, D] sums (S and the k-means') and the [K] masses n
cross devices (a psum, O(K D)), so the loss over n devices equals the one-device loss.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from contrastive.losses import common

DATA = 'data'  # the mesh axis the batch is split over (as contrastive.parallel.DATA)
DEFAULT_ITERATIONS = 3
DEFAULT_ASSIGNMENT_TEMPERATURE = 0.02


def _is_int(x):
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_args(query, key, temperature, num_clusters, iterations, assignment_temperature,
               assignments, mesh):
  """Raises a one-line ValueError (naming the shapes) for arguments the loss cannot take."""
  common.check_pair(query, key, 'query', 'key')
  common.check_temperature(temperature)
  b = query.shape[0]
  if not _is_int(num_clusters) or not 1 <= num_clusters <= b:
    raise ValueError(f'num_clusters must be an int in [1, B = {b}] (query: {tuple(query.shape)}); '
                     f'got {num_clusters!r}.')
  if not _is_int(iterations) or iterations < 0:
    raise ValueError(f'iterations must be an int >= 0, got {iterations!r}.')
  if not (isinstance(assignment_temperature, (int, float, np.number)) and
          assignment_temperature > 0):
    raise ValueError(f'assignment_temperature must be a float > 0, got '
                     f'{assignment_temperature!r}.')
  if assignments is not None and tuple(assignments.shape) != (b, num_clusters):
    raise ValueError(f'assignments must be [B, K] = {(b, num_clusters)}; got '
                     f'{tuple(assignments.shape)}.')
  if mesh is not None:
    if DATA not in mesh.shape:
      raise ValueError(f'mesh must have a {DATA!r} axis; got axes {tuple(mesh.shape)}.')
    if b % mesh.shape[DATA]:
      raise ValueError(f'B = {b} must be divisible by the mesh\'s {DATA!r} axis '
                       f'({mesh.shape[DATA]} devices).')


def soft_kmeans(keys, num_clusters, *, iterations, assignment_temperature, row_ids, total,
                reduce=lambda x: x):
  """Soft spherical k-means assignments C [b, K] of unit keys [b, D] (no gradient).

  Centroids start at the keys of global rows 0, s, ..., (K-1) s (s = total // K): a one-hot
  [b, K] selection summed over rows, so a sharded batch needs only the [K, D] psum. Then
  `iterations` times: C = softmax(keys . unit(mu)^T / t_a), mu = C^T keys.

  Args:
    keys: [b, D] L2-normalised keys (this device's rows; all rows when unsharded).
    num_clusters: K.
    iterations: centroid updates after the initial pick.
    assignment_temperature: t_a > 0.
    row_ids: [b] int, the rows' global positions.
    total: B, the global number of rows.
    reduce: sums a per-device partial over the devices (lax.psum; identity unsharded).

  Returns:
    [b, K] assignments, each row on the simplex, in keys' dtype.
  """
  keys = lax.stop_gradient(keys)
  stride = total // num_clusters
  picked = row_ids[:, None] == stride * jnp.arange(num_clusters)[None, :]  # (b, K) one-hot
  centroids = reduce(common.einsum('bk,bd->kd', picked.astype(keys.dtype), keys))  # (K, D)

  def assign(centroids):
    logits = common.matmul(keys, common.l2_normalize(centroids).T)  # (b, D) . (D, K) -> (b, K)
    return jax.nn.softmax(logits / assignment_temperature, axis=1)

  def update(_, centroids):
    return reduce(common.einsum('bk,bd->kd', assign(centroids), keys))  # (K, D)

  return assign(lax.fori_loop(0, iterations, update, centroids))


def _rows(q, k, c, temperature, reduce):
  """Per-row loss terms and metric sums from this device's rows; `reduce` sums over devices.

  Args:
    q, k: [b, D] unit queries and keys (accumulation dtype).
    c: [b, K] assignments of the keys.
    temperature: tau.
    reduce: lax.psum over the data axis, or the identity.

  Returns:
    (loss_rows [b], {metric name: sum over this device's rows}) and the [K] masses n.
  """
  n = reduce(jnp.sum(c, axis=0))  # (K,) masses n_k, global
  s = reduce(common.einsum('bk,bd->kd', c, k))  # (K, D) sums S_k = sum_j C_jk k_j, global
  k_sum = reduce(jnp.sum(k, axis=0))  # (D,) for the exact mean negative similarity
  pos = common.rowwise_dot(q, k)  # (b,) s_ii
  qs = common.matmul(q, s.T)  # (b, D) . (D, K) -> (b, K): q_i . S_k = n_k q_i . mu_k
  r = n[None, :] - c  # (b, K) leave-one-out masses, sum_k r_ik = B - 1
  # Masses below the rounding noise of n_k carry no information (and r = 0 exactly for a
  # key alone in its meta-node): left out, with every division and log kept away from 0.
  keep = r > jnp.finfo(r.dtype).eps * jnp.maximum(n[None, :], 1.0)
  safe_r = jnp.where(keep, r, 1.0)
  # m_ik = q_i . (S_k - C_ik k_i) / r_ik: a mean of cosines, in [-1, 1]; clipped there, as
  # cancellation in the numerator can push it out for masses near the noise floor.
  m = jnp.clip((qs - c * pos[:, None]) / safe_r, -1.0, 1.0)
  log_terms = m / temperature + jnp.log(safe_r)  # (b, K) log(r_ik exp(m_ik / tau))
  logits = jnp.concatenate([(pos / temperature)[:, None], log_terms], axis=1)  # (b, 1 + K)
  lse = common.masked_logsumexp(logits, jnp.pad(keep, ((0, 0), (1, 0)), constant_values=True))
  loss_rows = lse - pos / temperature
  total = n.sum()  # B
  neg = (common.matmul(q, k_sum[:, None])[:, 0] - pos) / jnp.maximum(total - 1.0, 1.0)
  best_meta = jnp.max(jnp.where(keep, m, -jnp.inf), axis=1)
  sums = {'accuracy': jnp.sum((pos > best_meta).astype(q.dtype)), 'pos_sim': jnp.sum(pos),
          'neg_sim': jnp.sum(neg), 'logsumexp': jnp.sum(lse)}
  return loss_rows, sums, n


def _mass_metrics(n):
  """Cluster usage from the [K] masses: perplexity exp(H(n / B)) in [1, K], largest share."""
  p = n / jnp.sum(n)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {'cluster_perplexity': jnp.exp(entropy), 'cluster_max_mass': jnp.max(p)}


def _body(q, k, given, temperature, *, num_clusters, iterations, assignment_temperature, total,
          axis):
  """The loss and metrics from this device's rows (all rows when axis is None)."""
  reduce = (lambda x: x) if axis is None else functools.partial(lax.psum, axis_name=axis)
  b = q.shape[0]
  offset = 0 if axis is None else lax.axis_index(axis) * b
  if given is None:
    c = soft_kmeans(k, num_clusters, iterations=iterations,
                    assignment_temperature=assignment_temperature,
                    row_ids=offset + jnp.arange(b), total=total, reduce=reduce)
  else:
    c = given.astype(k.dtype)
  loss_rows, sums, n = _rows(q, k, c, temperature, reduce)
  metrics = {name: reduce(value) / total for name, value in sums.items()}
  metrics.update(_mass_metrics(n))
  return reduce(jnp.sum(loss_rows)) / total, metrics


def pamc_info_nce(query, key, *, temperature, num_clusters, iterations=DEFAULT_ITERATIONS,
                  assignment_temperature=DEFAULT_ASSIGNMENT_TEMPERATURE, assignments=None,
                  mesh=None):
  """InfoNCE with PamC's meta-node negatives: exact positive, B - 1 negatives as K meta-nodes.

      l_i = -s_ii/tau + log(exp(s_ii/tau) + sum_k r_ik exp(m_ik/tau)),    loss = mean_i l_i,

  with r_ik = n_k - C_ik and m_ik = (q_i . S_k - C_ik s_ii) / r_ik the leave-one-out mass and
  centroid similarity of meta-node k (module docstring). At most InfoNCE's loss (Jensen);
  K = B with C = I gives InfoNCE exactly.

  Args:
    query: [B, D] embeddings (L2-normalised inside).
    key: [B, D] embeddings; row i is the positive of query i, the other rows its negatives.
    temperature: tau > 0, a Python float or a traced scalar.
    num_clusters: K in [1, B], the number of meta-nodes.
    iterations: soft k-means centroid updates (0: the initial strided keys' assignments).
    assignment_temperature: t_a > 0 of the k-means softmax (lower: harder assignments).
    assignments: optional [B, K] learnt soft assignments of the keys (rows summing to 1, e.g.
      a clustering head's softmax); replaces the k-means, and is differentiated.
    mesh: optional Mesh with a `data` axis: the loss runs per device under shard_map and only
      [K, D] sums cross devices (psum). None: global arrays (under jit with a batch-sharded
      input XLA partitions the same sums). B must divide over the axis.

  Returns:
    (loss, metrics): loss a scalar (float32, or float64 for float64 inputs); metrics with
    `pos_sim` (mean s_ii) and `neg_sim` (mean s_ij, j != i), both exact; `accuracy`, the
    fraction of queries whose s_ii beats every meta-node's m_ik (an upper bound of InfoNCE's
    top-1 accuracy: a mean never exceeds the maximum; equal for K = B, C = I); `logsumexp`
    (mean approximate log-denominator); `cluster_perplexity` (exp of the entropy of n / B: the
    effective number of meta-nodes, 1 to K) and `cluster_max_mass` (largest n_k / B).

  References:
    Kulatilleke, Portmann & Chandra 2022, "Efficient block contrastive learning via
    parameter-free meta-node approximation" (PamC, arXiv:2209.14067); van den Oord et al.
    2018 (InfoNCE).

  >>> q, k = jax.random.normal(jax.random.key(0), (2, 64, 16))
  >>> loss, metrics = pamc_info_nce(q, k, temperature=0.1, num_clusters=8)
  """
  check_args(query, key, temperature, num_clusters, iterations, assignment_temperature,
             assignments, mesh)
  acc = common.accumulation_dtype(common.compute_dtype(jnp.result_type(query, key)))
  q = common.normalize(query).astype(acc)  # (B, D); bfloat16 rounded as the other losses'
  k = common.normalize(key).astype(acc)
  body = functools.partial(_body, num_clusters=num_clusters, iterations=iterations,
                           assignment_temperature=assignment_temperature, total=query.shape[0])
  temperature = jnp.asarray(temperature, acc)
  if mesh is None:
    return body(q, k, assignments, temperature, axis=None)
  if assignments is None:  # shard_map takes arrays: the k-means variant has no C argument
    fn = lambda q, k, t: body(q, k, None, t, axis=DATA)
    args, specs = (q, k, temperature), (P(DATA), P(DATA), P())
  else:
    fn = functools.partial(body, axis=DATA)
    args, specs = (q, k, assignments, temperature), (P(DATA), P(DATA), P(DATA), P())
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P())(*args)
