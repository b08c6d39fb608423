"""BECLR's DyCE: a clustered memory of past keys whose nearest items become pseudo-positives.

Poulakakis-Daktylidis & Jamali-Rad 2024, "BECLR: Batch Enhanced Contrastive Few-Shot Learning"
(ICLR), Section 4 (Dynamic Clustered mEmory). The memory holds the last M keys x_j (L2-normalised,
no gradient), each with a cluster label l_j in [0, P), and P prototypes c_p. Each step:

  1. pseudo-positives (`neighbours`): key k_i goes to its nearest prototype
     p_i = argmax_p k_i . c_p, and its pseudo-positives are the n items x_j of cluster p_i most
     similar to k_i (a cluster with fewer than n items is filled up with the nearest items of
     the rest of the memory, as the authors' code falls back to the whole memory);
  2. update (`update`): the batch's keys are assigned to the prototypes by an equipartitioned
     optimal transport (Sinkhorn-Knopp on the scores k_i . c_p, as in SwAV: Caron et al. 2020,
     "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments"), written over
     the oldest B slots with their labels, and every prototype moves to the mean of its items:
     c_p <- m c_p + (1 - m) mean_{j: l_j = p} x_j (a cluster left empty keeps its prototype);
  3. the partition starts when the memory first fills: k-means (`kmeans.py`) of the whole memory
     gives the first prototypes and labels; until then there are no pseudo-positives.

The transport scores are cosine similarities (the cost 1 - cos is minimised, each prototype
receiving B / P keys of the batch). The memory is a logical global array, split along the
mesh's `data` axis inside the jitted step like MoCo's queue (`queue.py`), so every device's
keys meet every device's memory. How the pseudo-positives enter InfoNCE: `positive_shift`.
"""

import flax
import jax
import jax.numpy as jnp

from contrastive.losses import l2_normalize
from contrastive.samplers import kmeans
from contrastive.samplers.queue import check_queue_size

_OTHER_CLUSTER = 4.0  # added to the scores outside the key's cluster: |cos| <= 1 ranks them after
_UNWRITTEN = 8.0  # ... and after those, the slots never written


@flax.struct.dataclass
class DyCE:
  """keys: [M, D] L2-normalised past keys; labels: [M] int32 cluster of each slot; prototypes:
  [P, D]; ptr: [] int32 next slot to write (the oldest); count: [] int32 slots written so far
  (at most M); ready: [] bool, the partition has started (the memory filled once)."""
  keys: jax.Array
  labels: jax.Array
  prototypes: jax.Array
  ptr: jax.Array
  count: jax.Array
  ready: jax.Array


def check_args(size, num_clusters, topk, batch_size):
  """Raises ValueError unless M is a multiple of B, 2 <= P <= M and 1 <= n <= M."""
  check_queue_size(size, batch_size)
  if not 2 <= num_clusters <= size:
    raise ValueError(f'num_clusters={num_clusters} must satisfy 2 <= P <= the memory size '
                     f'M={size}.')
  if not 1 <= topk <= size:
    raise ValueError(f'topk={topk} must satisfy 1 <= n <= the memory size M={size}.')


def init_dyce(size, dim, num_clusters, batch_size, dtype=jnp.float32):
  """An empty memory of `size` slots for `dim`-wide keys with `num_clusters` prototypes."""
  check_queue_size(size, batch_size)
  return DyCE(keys=jnp.zeros((size, dim), dtype), labels=jnp.zeros((size,), jnp.int32),
              prototypes=jnp.zeros((num_clusters, dim), dtype), ptr=jnp.zeros((), jnp.int32),
              count=jnp.zeros((), jnp.int32), ready=jnp.zeros((), bool))


def sinkhorn_assign(scores, *, epsilon=0.05, iterations=3):
  """Equipartitioned assignment of B points to P prototypes: [B, P] scores -> [B] int32.

  Q = exp(scores / epsilon), then alternately each prototype's column scaled to total 1/P and
  each point's row to 1/B (Sinkhorn-Knopp; SwAV's Algorithm with its epsilon and 3
  iterations); a point goes to the prototype of its largest transported mass.
  """
  b, p = scores.shape
  log_q = (scores - jnp.max(scores)) / epsilon  # scaled before exp: no overflow

  def body(_, lq):
    lq = lq - jax.nn.logsumexp(lq, axis=0, keepdims=True) - jnp.log(p)  # columns: 1/P
    return lq - jax.nn.logsumexp(lq, axis=1, keepdims=True) - jnp.log(b)  # rows: 1/B

  log_q = jax.lax.fori_loop(0, iterations, body, log_q)
  return jnp.argmax(log_q, axis=1).astype(jnp.int32)


def _start(mem, rng, kmeans_iters):
  """The first partition: k-means++ and Lloyd's iterations on the full memory."""
  seeds = kmeans.kmeans_plus_plus_init(rng, mem.keys, mem.prototypes.shape[0])
  prototypes, labels, _ = kmeans.lloyd(mem.keys, seeds, kmeans_iters)
  return mem.replace(prototypes=prototypes.astype(mem.keys.dtype), labels=labels,
                     ready=jnp.ones((), bool))


def update(mem, keys, rng, *, momentum=0.0, epsilon=0.05, sinkhorn_iterations=3,
           kmeans_iters=10):
  """Writes the global batch of keys [B, D] over the oldest B slots and updates the partition.

  Before the partition has started, the keys are written with label 0 and, once the memory is
  full, k-means (`kmeans_iters` Lloyd iterations, seeded from `rng`) starts it. After, the keys
  take their Sinkhorn assignment and each prototype its EMA update (module docstring, step 2).
  """
  m, b = mem.keys.shape[0], keys.shape[0]
  check_queue_size(m, b)
  keys = l2_normalize(jax.lax.stop_gradient(keys)).astype(mem.keys.dtype)

  def assigned(mem):
    return sinkhorn_assign(keys @ l2_normalize(mem.prototypes).T.astype(keys.dtype),
                           epsilon=epsilon, iterations=sinkhorn_iterations)

  labels = jax.lax.cond(mem.ready, assigned, lambda _: jnp.zeros((b,), jnp.int32), mem)
  written = mem.replace(
      keys=jax.lax.dynamic_update_slice(mem.keys, keys, (mem.ptr, jnp.zeros_like(mem.ptr))),
      labels=jax.lax.dynamic_update_slice(mem.labels, labels, (mem.ptr,)),
      ptr=(mem.ptr + b) % m, count=jnp.minimum(mem.count + b, m))

  def moved(mem):
    means = kmeans.cluster_means(mem.keys, mem.labels, mem.prototypes)
    return mem.replace(prototypes=momentum * mem.prototypes + (1.0 - momentum) * means)

  def warming(mem):
    return jax.lax.cond(mem.count == m, lambda x: _start(x, rng, kmeans_iters), lambda x: x, mem)

  return jax.lax.cond(mem.ready, moved, warming, written)


def neighbours(mem, keys, topk):
  """Each key's pseudo-positives: keys [B, D] -> ([B, n, D] memory items, [B, n] bool valid).

  Scores are cosines to the memory, lowered by _OTHER_CLUSTER outside the key's nearest
  prototype's cluster and by _UNWRITTEN on unwritten slots, so the top n are the cluster's
  nearest items first (module docstring, step 1). Nothing is valid before the partition starts.
  """
  k = l2_normalize(jax.lax.stop_gradient(keys)).astype(mem.keys.dtype)
  nearest = jnp.argmax(k @ l2_normalize(mem.prototypes).T, axis=1)  # [B]
  sim = k @ mem.keys.T  # (B, D) . (D, M) -> (B, M)
  slot = jnp.arange(mem.keys.shape[0])
  score = (sim - jnp.where(mem.labels[None, :] == nearest[:, None], 0.0, _OTHER_CLUSTER)
           - jnp.where(slot < mem.count, 0.0, _UNWRITTEN)[None, :])
  top, idx = jax.lax.top_k(score, topk)
  valid = mem.ready & (top > -_UNWRITTEN + 1.0)
  return mem.keys[idx], valid


def positive_shift(query, key, pseudo, valid, temperature):
  """What turns InfoNCE with the pseudo-positives as query negatives into their multi-positive
  loss (SupCon's L_out over P_i = {k_i} u {valid pseudo-positives of i}):

      -1/|P_i| sum_{p in P_i} log(exp(s_ip / tau) / sum_{a in A_i} exp(s_ia / tau))
        = [LSE_i - s_ii / tau] + [s_ii - 1/|P_i| sum_{p in P_i} s_ip] / tau,

  where the first bracket is `info_nce` with the pseudo-positives among query i's own
  negatives (so they are in its denominator A_i) and this function returns the mean over i of
  the second. query, key: [B, D]; pseudo: [B, n, D]; valid: [B, n] bool.
  """
  q, kk, ps = l2_normalize(query), l2_normalize(key), l2_normalize(pseudo)
  s_pos = jnp.sum(q * kk, -1)  # [B]
  s_pseudo = jnp.einsum('bd,bnd->bn', q, ps.astype(q.dtype))
  w = valid.astype(q.dtype)
  mean_pos = (s_pos + jnp.sum(w * s_pseudo, 1)) / (1.0 + jnp.sum(w, 1))
  return jnp.mean(s_pos - mean_pos) / temperature
