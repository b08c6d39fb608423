"""MoCHi: synthetic hard negatives mixed from each query's hardest real negatives.

For query q (unit norm) with hard negatives n_1..n_H (its H most similar negatives, mined with
`mining.top_k_negatives`), MoCHi synthesises

    h  = normalize(alpha n_i + (1 - alpha) n_j),  alpha ~ U(0, 1),  i != j random,  (num_mix)
    h' = normalize(beta q + (1 - beta) n_j),      beta ~ U(0, 0.5), j random,       (num_query_mix)

and appends them to that query's denominator only (the loss's `query_negatives: [B, S, D]`).
The synthetic points are constants for the loss: no gradient flows through them.
"""

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from contrastive.losses import common
from contrastive.samplers import mining


def _pick(u, n):
  """floor(u n) clipped to [0, n - 1]: uniform indices from u ~ U[0, 1)."""
  return jnp.clip(jnp.floor(u * n), 0, n - 1).astype(jnp.int32)


def _mix_row(rng, q, hard, count, *, num_mix, num_query_mix):
  """One query's mixes: q [D], hard [H, D] (the first `count` valid) -> [S, D] unnormalised."""
  # One draw per row, sliced: [i | offset | alpha] x num_mix, [j | beta / 0.5] x num_query_mix.
  u = jax.random.uniform(rng, (3 * num_mix + 2 * num_query_mix,), q.dtype)
  u_i, u_off, alpha, u_j, u_beta = jnp.split(
      u, np.cumsum([num_mix, num_mix, num_mix, num_query_mix]))
  n = jnp.maximum(count, 1)
  i = _pick(u_i, n)
  # j = i + offset (mod n) with offset uniform in [1, n - 1]: distinct from i; n = 1: j = i.
  j = (i + 1 + _pick(u_off, jnp.maximum(n - 1, 1))) % n
  mixed = alpha[:, None] * hard[i] + (1.0 - alpha[:, None]) * hard[j]  # (num_mix, D)
  beta = 0.5 * u_beta[:, None]  # U(0, 0.5)
  query_mixed = beta * q[None, :] + (1.0 - beta) * hard[_pick(u_j, n)]  # (num_query_mix, D)
  return jnp.concatenate([mixed, query_mixed], axis=0)


def mochi_negatives(rng, query, candidates, *, num_hard, num_mix, num_query_mix, keep=None,
                    block_size=None, hard_indices=None):
  """MoCHi's synthetic negatives for each query, from its num_hard hardest real negatives.

  Per query i, with H_i its hard set (the top-`num_hard` negatives by cosine similarity:
  candidate i is its positive and is never used, nor any candidate that `keep` drops):

      h  = normalize(alpha n_a + (1 - alpha) n_b),  n_a != n_b in H_i,  alpha ~ U(0, 1),
      h' = normalize(beta q_i + (1 - beta) n_c),    n_c in H_i,         beta ~ U(0, 0.5),

  num_mix of the first kind, then num_query_mix of the second, with q_i and the n's
  L2-normalised. Picks are uniform among the valid hard negatives: a row with fewer than
  num_hard negatives samples among those it has; with exactly one, h is that negative itself
  (no distinct pair exists); with none, its synthetic negatives are zero vectors marked
  invalid in the returned mask (drop them in the loss: a zero vector would add exp(0) to the
  denominator). Each row draws from its own key, split from `rng`.

  Args:
    rng: a jax PRNG key.
    query: [B, D] embeddings.
    candidates: [N, D] embeddings; row i < B is the positive of query i (e.g. the keys followed
      by a memory queue).
    num_hard: H >= 1, the size of each query's hard set.
    num_mix: >= 0 negatives mixed from two hard negatives.
    num_query_mix: >= 0 negatives mixed from the query and a hard negative.
    keep: optional keep-function restricting the negatives, as in `mining.top_k_negatives`.
    block_size: None or the column block of the streamed mining (`mining.top_k_negatives`).
    hard_indices: optional [B, num_hard] int, the hard sets already mined (e.g. the first
      num_hard columns of `mining.top_k_negatives` with a larger k); -1 marks a missing one.

  Returns:
    (negatives, valid): negatives [B, S, D] float32 (float64 for float64 inputs, whose draws
    are made in float64) with S = num_mix + num_query_mix, unit norm where valid, zero
    elsewhere, without gradient; valid [B, S] bool, False for the rows that have no negative
    at all.

  References:
    Kalantidis et al. 2020, "Hard Negative Mixing for Contrastive Learning" (MoCHi, NeurIPS),
    Section 4 (mixing the hardest negatives; mixing with the query).

  >>> q, c = jax.random.normal(jax.random.key(0), (2, 8, 16))
  >>> negs, valid = mochi_negatives(jax.random.key(1), q, c, num_hard=4, num_mix=3,
  ...                               num_query_mix=2)
  """
  for name, value, low in (('num_hard', num_hard, 1), ('num_mix', num_mix, 0),
                           ('num_query_mix', num_query_mix, 0)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
      raise ValueError(f'{name} must be an int >= {low}, got {value!r}.')
  if num_mix + num_query_mix < 1:
    raise ValueError('num_mix + num_query_mix must be >= 1: nothing to synthesise.')
  idx = hard_indices
  if idx is None:
    _, idx = mining.top_k_negatives(query, candidates, num_hard, keep=keep,
                                    block_size=block_size)  # (B, H), -1: missing
  elif tuple(idx.shape) != (query.shape[0], num_hard):
    raise ValueError(f'hard_indices must be [B, num_hard] = {(query.shape[0], num_hard)}; got '
                     f'{tuple(idx.shape)}.')
  q = jax.lax.stop_gradient(common.l2_normalize(query))
  c = jax.lax.stop_gradient(common.l2_normalize(candidates))
  dtype = jnp.result_type(q, c)  # float32, or float64 for float64 inputs
  q, c = q.astype(dtype), c.astype(dtype)
  b, s = q.shape[0], num_mix + num_query_mix
  hard = c[jnp.maximum(idx, 0)]  # (B, H, D); the valid entries come first
  count = jnp.sum(idx >= 0, axis=1)  # (B,)
  mix = functools.partial(_mix_row, num_mix=num_mix, num_query_mix=num_query_mix)
  raw = jax.vmap(mix)(jax.random.split(rng, b), q, hard, count)  # (B, S, D)
  valid = jnp.broadcast_to((count > 0)[:, None], (b, s))
  negatives = jnp.where(valid[..., None], common.l2_normalize(raw), 0.0)
  return jax.lax.stop_gradient(negatives), valid
