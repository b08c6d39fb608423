"""Hard-negative mining: each query's most similar negatives, dense or streamed in blocks.

`top_k_negatives` ranks, for every query, the candidates that are its negatives by cosine
similarity and returns the top k (optionally after skipping the very top, which are often
false negatives); `indices_keep` turns the result into a keep-function, so the loss's
denominator holds the positive and the mined negatives only. Mining is a selection: no gradient
flows through it.
"""

import numbers

import jax
import jax.numpy as jnp

from contrastive.losses import common


def _is_int(x, low):
  return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= low


def _check(query, candidates, k, skip_top, block_size):
  if query.ndim != 2 or candidates.ndim != 2 or query.shape[1] != candidates.shape[1]:
    raise ValueError(f'query must be [B, D] and candidates [N, D] with the same D; got query: '
                     f'{tuple(query.shape)}, candidates: {tuple(candidates.shape)}.')
  if not _is_int(k, 1):
    raise ValueError(f'k must be an int >= 1, got {k!r}.')
  if not _is_int(skip_top, 0):
    raise ValueError(f'skip_top must be an int >= 0, got {skip_top!r}.')
  if block_size is not None and not _is_int(block_size, 1):
    raise ValueError(f'block_size must be None or a positive int, got {block_size!r}.')


def _scores(q, c, col_ids, keep, n):
  """Similarities of all B queries to a column block, -inf where not a negative."""
  row_ids = jnp.arange(q.shape[0], dtype=jnp.int32)
  sim = q @ c.T  # (B, D) . (D, c) -> (B, c)
  valid = (col_ids[None, :] != row_ids[:, None]) & (col_ids[None, :] < n)
  if keep is not None:
    valid &= keep(row_ids, col_ids, sim)
  return jnp.where(valid, sim, -jnp.inf)


def top_k_negatives(query, candidates, k, *, skip_top=0, keep=None, block_size=None):
  """The k most similar negatives of each query, after skipping the skip_top most similar.

  With s_ij the cosine similarity of query i and candidate j and N(i) = {j != i : keep_ij}
  its negatives (candidate i is its positive), sort N(i) by decreasing s_ij and return ranks
  skip_top .. skip_top + k - 1 (ties: the lower index first).

  Args:
    query: [B, D] embeddings (L2-normalised inside).
    candidates: [N, D] embeddings (L2-normalised inside); row i < B is the positive of
      query i, e.g. the keys followed by a memory queue, in the loss's column order.
    k: number of negatives per query, >= 1.
    skip_top: the number of most similar negatives to pass over first (likely false
      negatives), >= 0.
    keep: optional keep-function (row_ids [B], col_ids [c], sim [B, c]) -> bool [B, c], as for
      the losses' negative_mask; candidates it drops are never returned.
    block_size: None: one dense [B, N] similarity matrix. An int: the candidates are streamed
      in blocks of that many rows with `lax.scan`, keeping a running top-(k + skip_top) per
      query (memory O(B (block_size + k + skip_top))); N is padded to a multiple of it with
      masked entries.

  Returns:
    (sims, indices): sims [B, k] in decreasing order, float32 (float64 for float64 inputs),
    indices [B, k] int32 positions in `candidates`. When a query has fewer than skip_top + k
    negatives, the missing slots (at the end) hold sim -inf and index -1. Both carry no
    gradient.

  References:
    Xiong et al. 2021, "Approximate Nearest Neighbor Negative Contrastive Learning for Dense
    Text Retrieval" (ANCE); Zhan et al. 2021, "Optimizing Dense Retrieval Model Training with
    Hard Negatives" (ADORE); Deuser et al. 2023, "Sample4Geo: Hard Negative Sampling for
    Cross-View Geo-Localisation" (similarity mining); Cai et al. 2022, "Hard Negatives or False
    Negatives: Correcting Pooling Bias in Training Neural Ranking Models" (CIKM; the top-ranked
    candidates are often unlabelled positives, hence skip_top).

  >>> q, c = jax.random.normal(jax.random.key(0), (2, 8, 16))
  >>> sims, indices = top_k_negatives(q, c, 3, skip_top=1)
  """
  _check(query, candidates, k, skip_top, block_size)
  q = jax.lax.stop_gradient(common.l2_normalize(query))
  c = jax.lax.stop_gradient(common.l2_normalize(candidates))
  dtype = jnp.result_type(q, c)  # float32, or float64 for float64 inputs
  b, n, depth = q.shape[0], c.shape[0], k + skip_top
  if block_size is None:
    pad = max(depth - n, 0)  # lax.top_k needs at least `depth` columns
    c = jnp.pad(c, ((0, pad), (0, 0)))
    scores = _scores(q, c, jnp.arange(n + pad, dtype=jnp.int32), keep, n)  # (B, N)
    sims, idx = jax.lax.top_k(scores, depth)
  else:
    num_blocks = -(-n // block_size)
    c = jnp.pad(c, ((0, num_blocks * block_size - n), (0, 0)))
    blocks = c.reshape(num_blocks, block_size, -1)  # (nb, block, D)
    block_ids = jnp.arange(num_blocks * block_size, dtype=jnp.int32).reshape(num_blocks, -1)

    def step(carry, block):
      best, best_idx = carry  # (B, depth), running top values and their positions
      c_blk, ids = block
      scores = jnp.concatenate([best, _scores(q, c_blk, ids, keep, n)], axis=1)
      all_idx = jnp.concatenate([best_idx, jnp.broadcast_to(ids, (b, ids.shape[0]))], axis=1)
      best, pos = jax.lax.top_k(scores, depth)  # the running entries come first: ties go
      return (best, jnp.take_along_axis(all_idx, pos, axis=1)), None  # to the lower index

    init = (jnp.full((b, depth), -jnp.inf, dtype), jnp.full((b, depth), -1, jnp.int32))
    (sims, idx), _ = jax.lax.scan(step, init, (blocks, block_ids))
  sims, idx = sims[:, skip_top:], idx[:, skip_top:]
  idx = jnp.where(jnp.isneginf(sims), -1, idx).astype(jnp.int32)
  return sims, idx


def indices_keep(indices, num_candidates=None):
  """Keep-function keeping, for query r, only the candidates listed in indices[r].

      keep_ij = [j in indices[i]],

  so with `top_k_negatives` the loss's denominator is the positive plus the mined negatives.
  Entries -1 (missing negatives) match no candidate. The indices must be positions in the
  loss's candidate order (keys, then extra negatives): mine over concat(key, extra).

  Args:
    indices: [B, k] int candidate positions per query.
    num_candidates: N, if known. A call over all N columns (the dense path) then scatters
      the indices into a [b, N] mask (O(b (N + k))); tiles of the blockwise path binary-search
      each row's sorted indices (O(b c log k)).

  Returns:
    keep(row_ids, col_ids, sim) -> bool [b, c].
  """
  indices = jnp.asarray(indices)
  if indices.ndim != 2 or not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f'indices must be an int [B, k] array; got {indices.dtype} '
                     f'{tuple(indices.shape)}.')
  indices = jax.lax.stop_gradient(indices).astype(jnp.int32)
  ordered = jnp.sort(indices, axis=1)  # -1 (missing) first
  k = indices.shape[1]

  def keep(row_ids, col_ids, sim):
    del sim
    valid = col_ids[None, :] >= 0
    if num_candidates is not None and col_ids.shape[0] == num_candidates:
      rows = jnp.arange(row_ids.shape[0])[:, None]
      mine = jnp.where(indices[row_ids] < 0, num_candidates, indices[row_ids])  # -1: dropped
      mask = jnp.zeros((row_ids.shape[0], num_candidates), bool).at[rows, mine].set(
          True, mode='drop')
      return mask[:, jnp.clip(col_ids, 0, num_candidates - 1)] & valid
    mine = ordered[row_ids]  # (b, k) sorted
    pos = jax.vmap(lambda r: jnp.searchsorted(r, col_ids))(mine)  # (b, c)
    found = jnp.take_along_axis(mine, jnp.clip(pos, 0, k - 1), axis=1) == col_ids[None, :]
    return found & valid

  return keep
