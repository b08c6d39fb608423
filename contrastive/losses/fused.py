"""The fused softmax path: log-sum-exps and gradients in one sweep, 3 matmul passes instead of 4.

The tiled softmax (`tiles.py`) streams each row's log-sum-exp forward (1 matmul per tile) and
recomputes every tile backward (3 more): the softmax P_ij = exp(x_ij - lse_i) needs the final
lse_i, which is only known once the row has seen every column. Here the rows go in strips of
`strip_rows` rows against all N candidates at once: the strip's similarities S = q_r K^T
[rows, N] stay while its log-sum-exps are computed exactly, and its gradient parts follow at
once, for a unit cotangent:

    dq_r = (a P) K,      dk += (a P)^T q_r,      a = mult / tau,

so the loss and its gradient cost the 3 matmuls of the dense path. The backward pass only
scales them by the cotangent g of row_lse. That is exact when g is the same number for every
row, as for any function of mean_i lse_i (InfoNCE's loss, however weighted or summed with other
losses); a per-row cotangent (e.g. log-sum-exps combined row by row with other terms) would
need the recomputation, so it yields NaN gradients here: loudly wrong, never silently. Callers
opt in (`blockwise.softmax_stats(fused_gradient=True)`, used by `info_nce` without
query_negatives).

It takes one row channel and no column channels (CLIP's second direction needs the column
log-sum-exps of every tile before any gradient, so it keeps the 4-pass recomputation), on one
device or with the candidates all-gathered (the ring hands each device one chunk at a time, so
no device sees a strip's N columns together).

Memory: a strip is rows x N floats, rows = max(128, block^2 / N), at most block (and the
device's rows): block^2 as for a tile, or 128 rows once N > block^2 / 128, because thinner
strips starve the matmuls (B = 32,768 on the 2-core CPU: 25.5 s at 32 rows, 19.2 s at 64,
17.6 s at 128 and 256). At B = 32,768 that is 16 MiB per strip.
"""

import jax.numpy as jnp
from jax import lax

from contrastive.losses import common
from contrastive.losses import ring
from contrastive.losses import tiles

MIN_ROWS = 128


def applies(plan, comm):
  """Whether the fused path runs for this plan and exchange of candidates."""
  one_channel = len(plan.row_mult) == 1 and not plan.col_mult
  all_columns = comm.axis is None or comm.size == 1 or comm.kind == 'all_gather'
  return plan.fused and one_channel and all_columns


def strip_rows(plan, num_rows, num_cols):
  """Rows per strip: block^2 / N similarities, at least MIN_ROWS, at most block and the rows."""
  return max(1, min(plan.block, num_rows, max(MIN_ROWS, plan.block ** 2 // num_cols)))


def _sweep(plan, comm, scale, q, rpos, rid, k, cpos, cid, rows):
  """Every strip of `rows` rows against all candidates, in one `lax.scan`.

  Args:
    q, rpos, rid: [R, D], [R], [R] rows (R a multiple of `rows`), padding at position -1.
    k, cpos, cid: [N, D], [N], [N] every candidate (keys, extras, padding at -1).

  Returns:
    ((dk [N, D], (neg sum, neg count)), (row_lse [R / rows, rows], row_neg_max [R / rows, rows],
    dq [R / rows, rows, D])), the gradients for a unit cotangent.
  """
  a = plan.row_mult[0] * scale
  with_positive = plan.row_positive[0]
  shift = shifted(plan, k.dtype)
  num_strips, d = q.shape[0] // rows, q.shape[1]

  def strip(carry, row_in):
    dk, (total, count) = carry
    q_r, rpos_r, rid_r = row_in
    sim = common.matmul(q_r, k.T)  # (rows, D) . (D, N) -> (rows, N), float32 accumulated
    pos, neg = tiles.tile_masks(plan, rpos_r, rid_r, cpos, cid, sim)
    x = jnp.where((pos | neg) if with_positive else neg, a * sim, tiles.NEG_INF)
    m = jnp.max(x, axis=1, keepdims=True)
    e = jnp.exp(x - jnp.where(m == tiles.NEG_INF, 0.0, m))  # 0 off the selection
    l = jnp.sum(e, axis=1, keepdims=True)
    ds = e * (a / jnp.where(l > 0, l, 1.0))  # a P: d lse / d S for a unit cotangent
    if shift:  # a (P_ii - 1) at the positive: small, so rounding it costs little (`backward`)
      ds = ds - jnp.where(pos, a, 0.0)
    ds = ds.astype(k.dtype)  # bfloat16 strips: the matmuls in bfloat16, float32 accumulated
    dq_r = common.matmul(ds, k)  # (rows, N) . (N, D) -> (rows, D)
    dk = dk + common.matmul(ds.T, q_r)  # (N, rows) . (rows, D) -> (N, D)
    neg_max = jnp.max(jnp.where(neg, sim, tiles.NEG_INF), axis=1)
    sums = (total + jnp.sum(jnp.where(neg, sim, 0.0)), count + jnp.sum(neg, dtype=jnp.float32))
    return (dk, sums), (tiles.logsumexp(m[:, 0], l[:, 0]), neg_max, dq_r)

  split = (q.reshape(num_strips, rows, d), rpos.reshape(num_strips, rows),
           rid.reshape(num_strips, rows))
  acc = common.accumulation_dtype(k.dtype)  # float32 gradients and totals for bfloat16 k
  carry = (jnp.zeros(k.shape, acc), (jnp.zeros((), acc), jnp.zeros((), acc)))
  return lax.scan(strip, ring.varying(comm, carry), split)


def shifted(plan, dtype):
  """Whether the unit gradients hold a (P_ii - 1) rather than a P_ii at the positive: for
  bfloat16 embeddings, whose dS is rounded (see `backward`)."""
  return plan.row_positive[0] and jnp.dtype(dtype) != common.accumulation_dtype(dtype)


def forward(plan, comm, scale, q, k, extra, row_ids, key_ids, extra_ids):
  """This device's statistics (as `ring.softmax_forward`) and unit gradients.

  Args:
    q, k: [b, D] this device's normalised rows and keys; extra: [m, D] or None.
    row_ids, key_ids: [b] ints, extra_ids: [m] (for `plan.keep`).

  Returns:
    (row_lse [b, 1], col_lse [b, 0], row_neg_max [b], col_neg_max [b] (-inf), neg_sum,
    neg_count, pos_sim [b], (dq [b, D], dk [b, D], d extra [m, D] or None)): the gradients
    of sum_i row_lse_i (minus a s_ii if `shifted`) w.r.t. q, k and extra, float32 for
    bfloat16 q, k (cast by the caller).
  """
  n, b = comm.size, q.shape[0]
  kc, cid = tiles.chunk_layout(plan, n, k, extra, key_ids, extra_ids)
  if comm.axis is None:
    cpos = tiles.chunk_positions(plan, n, 0)
  else:
    kc, cid = ring.gather(comm, (kc, cid))
    cpos = ring.all_positions(plan, comm)
  rows = strip_rows(plan, b, kc.shape[0])
  qr, rpos, rid = tiles.row_layout(plan, n, ring.device_index(comm), q, row_ids, block=rows)
  (dk, sums), (lse, neg_max, dq) = _sweep(plan, comm, scale, qr, rpos, rid, kc, cpos, cid, rows)
  if comm.axis is not None:
    dk = lax.psum_scatter(dk, comm.axis, tiled=True)  # each device's chunk of the key gradient
  sums = ring.psum(comm, sums)
  d_extra = None if extra is None else dk[b:b + extra.shape[0]]
  grads = (dq.reshape(-1, q.shape[1])[:b], dk[:b], d_extra)
  acc = common.accumulation_dtype(k.dtype)
  return (lse.reshape(-1, 1)[:b], jnp.zeros((b, 0), acc), neg_max.reshape(-1)[:b],
          jnp.full((b,), tiles.NEG_INF, acc), sums[0], sums[1], common.rowwise_dot(q, k), grads)


def backward(plan, scale, q, k, grads, g_row, g_pos):
  """(d scale, dq, dk, d extra) of sum_i (g_i row_lse_i + g_pos_i s_ii) from the unit gradients.

  The positive similarity's term g_pos_i s_ii is added row by row (dq_i += c_i k_i, dk_i +=
  c_i q_i), with c = g_pos, or g_pos + a g when the unit gradients were `shifted`: InfoNCE's
  g_pos = -a g then gives c = 0, the cancellation done in float32 before anything is rounded.

  Args:
    plan: the Plan; scale: 1/tau; q, k: [B, D] the normalised rows and keys; grads: `forward`'s
      unit gradients (float32).
    g_row: [B, 1] the cotangent of row_lse: must hold one value, else the gradients are NaN.
    g_pos: [B] the cotangent of pos_sim.
  """
  g = g_row[0, 0]
  g = jnp.where(jnp.all(g_row == g), g, jnp.nan)
  dq, dk, d_extra = (None if x is None else g * x for x in grads)
  # d lse_i / d scale = mult sum_j P_ij s_ij = q_i . dq_i / (g scale) (+ mult s_ii if shifted).
  total = jnp.sum(q * dq)
  c = g_pos
  if shifted(plan, k.dtype):
    a = plan.row_mult[0] * scale
    total = total + a * g * jnp.sum(common.rowwise_dot(q, k))
    c = g_pos + a * g
  return total / scale, dq + c[:, None] * k, dk + c[:, None] * q, d_extra
