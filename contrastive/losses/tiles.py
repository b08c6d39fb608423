"""Tiles of a similarity matrix streamed through `lax.scan`: the engine of the blockwise losses.

Query rows ([R, D]) and candidate columns ([N, D], L2-normalised) are cut into blocks; a doubly
nested `lax.scan` visits every row-block x column-block tile once, computes its similarities
S = q k^T and folds them into running per-row and per-column statistics. At any time the live
memory is a few tiles plus O((R + N) D), never an R x N matrix.

Positions name rows and columns globally: row r is query r of the global batch of B; column c
is key c (c < B) or extra negative c - B (B <= c < B + M); the positive of row r is column r.
Padding (a remainder when a size is not a multiple of the block, or extra negatives padded to a
multiple of the device count) has position -1 and is masked out of every sum, maximum and
gradient: it costs compute, never changes a result.

The softmax channels: channel c of a row holds the online log-sum-exp (running max m, running
sum l of exp(x - m)) of x = mult_c * scale * s over the row's kept negatives, plus the positive
if `positive_c`. The running max is the exact maximum of the selected similarities seen so far
(times mult_c * scale >= 0), so nothing overflows and the largest term is 1.

Precision: q and k may be bfloat16; S = q k^T is accumulated in float32 (`common.matmul`), and
every statistic, total and gradient accumulator is float32. The backward matmuls take each
tile's dS rounded to k's dtype (a no-op for float32 and float64).
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from contrastive.losses import common

NEG_INF = -jnp.inf


class Plan(NamedTuple):
  """What the tiles accumulate; static (hashed by jit, a custom_vjp non-diff argument).

  Attributes:
    num_rows: B, rows of the global batch (= keys; row r's positive is column r).
    num_extra: M, extra negatives (columns B..B+M-1, never a positive).
    block: tile side; smaller sides (a device's few rows) are used as they are.
    row_mult, row_positive: the row channels (empty for the sigmoid loss).
    col_mult, col_positive: the column channels (CLIP's second direction; empty otherwise).
    keep: None or keep(row_ids [b], col_ids [c], sim [b, c]) -> bool [b, c], False drops a
      negative (never the positive).
    fused: compute the gradient in the forward pass (`fused.py`) where the layout allows.
  """
  num_rows: int
  num_extra: int
  block: int
  row_mult: tuple = ()
  row_positive: tuple = ()
  col_mult: tuple = ()
  col_positive: tuple = ()
  keep: Callable | None = None
  fused: bool = False  # one row channel, row-uniform cotangent: see fused.py


# ---- Layout: padding and positions ----------------------------------------------------------


def round_up(n, block):
  return -(-n // block) * block


def pad_to(x, length, value=0):
  """Pads the leading axis of x to `length` with `value`."""
  return jnp.pad(x, [(0, length - x.shape[0])] + [(0, 0)] * (x.ndim - 1), constant_values=value)


def extras_per_device(plan, num_devices):
  return -(-plan.num_extra // num_devices)


def row_block(plan, num_devices):
  return min(plan.block, plan.num_rows // num_devices)


def col_block(plan, num_devices):
  return min(plan.block, plan.num_rows // num_devices + extras_per_device(plan, num_devices))


def chunk_length(plan, num_devices):
  """Columns of one device's chunk: its keys, its extra negatives, padding to the block."""
  b = plan.num_rows // num_devices
  return round_up(b + extras_per_device(plan, num_devices), col_block(plan, num_devices))


def row_layout(plan, num_devices, device, q, row_ids, block=None):
  """One device's rows padded to `block` (default its row block): (q [R, D], positions [R],
  ids [R])."""
  b = q.shape[0]
  length = round_up(b, block or row_block(plan, num_devices))
  r = jnp.arange(length)
  return pad_to(q, length), jnp.where(r < b, device * b + r, -1), pad_to(row_ids, length)


def chunk_layout(plan, num_devices, k, extra, key_ids, extra_ids):
  """One device's candidates [keys; extras] padded to chunk_length: (k [L, D], ids [L])."""
  if extra is not None:
    k, key_ids = jnp.concatenate([k, extra]), jnp.concatenate([key_ids, extra_ids])
  length = chunk_length(plan, num_devices)
  return pad_to(k, length), pad_to(key_ids, length)


def chunk_positions(plan, num_devices, source):
  """[L] global positions of the chunk that device `source` (maybe traced) holds; -1 = padding."""
  b, m = plan.num_rows // num_devices, extras_per_device(plan, num_devices)
  r = jnp.arange(chunk_length(plan, num_devices))
  extra = plan.num_rows + source * m + (r - b)
  extra_ok = (r >= b) & (r < b + m) & (extra < plan.num_rows + plan.num_extra)
  return jnp.where(r < b, source * b + r, jnp.where(extra_ok, extra, -1))


def tile_masks(plan, rpos, rid, cpos, cid, sim):
  """(positive, kept negative) bool [b, c] masks of one tile; padding is neither."""
  valid = (rpos >= 0)[:, None] & (cpos >= 0)[None, :]
  pos = valid & (rpos[:, None] == cpos[None, :])
  neg = valid & ~pos
  if plan.keep is not None:
    neg = neg & plan.keep(rid, cid, sim)
  return pos, neg


# ---- The sweep over tiles -------------------------------------------------------------------


def sweep(tile_fn, rb, cb, rows, row_state, cols, col_state, carry):
  """Calls tile_fn on every (rb rows) x (cb columns) tile, rows outer, columns inner.

  Args:
    tile_fn: (row_in, row_state, col_in, col_state, carry) -> (row_state, col_state, carry),
      every per-row (per-column) pytree sliced to the tile's rb rows (cb columns).
    rb, cb: static block sizes dividing the leading axes of rows and cols.
    rows, cols: pytrees of read-only [R, ...] and [N, ...] inputs.
    row_state, col_state: pytrees of [R, ...] and [N, ...] running statistics.
    carry: pytree of totals (scalars).

  Returns:
    (row_state, col_state, carry) after every tile.
  """
  def split(tree, size):
    return jax.tree.map(lambda x: x.reshape((-1, size) + x.shape[1:]), tree)

  def merge(tree):
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), tree)

  cols_split = split(cols, cb)

  def row_step(outer, row):
    col_states, carry = outer
    row_in, row_state = row

    def col_step(inner, col):
      row_state, carry = inner
      col_in, col_state = col
      row_state, col_state, carry = tile_fn(row_in, row_state, col_in, col_state, carry)
      return (row_state, carry), col_state

    (row_state, carry), col_states = lax.scan(col_step, (row_state, carry),
                                              (cols_split, col_states))
    return (col_states, carry), row_state

  (col_states, carry), row_states = lax.scan(row_step, (split(col_state, cb), carry),
                                             (split(rows, rb), split(row_state, rb)))
  return merge(row_states), merge(col_states), carry


# ---- Softmax channels: forward (online log-sum-exp) and backward (recomputed tiles) ----------


def _fold(mults, positives, scale, sim, pos, neg, m, l, neg_max, pos_sim, axis):
  """Folds a tile into each channel's running (max m, sum l) along `axis` (1 rows, 0 cols)."""
  ms, ls = [], []
  for c, (mult, with_pos) in enumerate(zip(mults, positives)):  # channels, static (1 or 2)
    sel = (neg | pos) if with_pos else neg
    top = jnp.maximum(neg_max, pos_sim) if with_pos else neg_max  # >= every selected s
    a = mult * scale
    m_new = jnp.maximum(m[:, c], jnp.where(top == NEG_INF, NEG_INF, a * top))
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # nothing seen yet: l stays 0
    terms = jnp.where(sel, jnp.exp(a * sim - jnp.expand_dims(m_safe, axis)), 0.0)
    ls.append(l[:, c] * jnp.exp(m[:, c] - m_safe) + jnp.sum(terms, axis=axis))
    ms.append(m_new)
  return jnp.stack(ms, axis=1), jnp.stack(ls, axis=1)


def softmax_init(plan, num_rows, num_cols, dtype):
  """Empty running statistics in `dtype` (the similarities': float32, float64 for float64
  inputs): rows (m, l [R, C], neg max [R]), cols likewise or ()."""
  def side(n, channels):
    return (jnp.full((n, channels), NEG_INF, dtype), jnp.zeros((n, channels), dtype),
            jnp.full((n,), NEG_INF, dtype))
  cols = side(num_cols, len(plan.col_mult)) if plan.col_mult else ()
  return side(num_rows, len(plan.row_mult)), cols


def softmax_forward(plan, scale, rb, cb, rows, row_state, cols, col_state, sums):
  """Folds every tile of rows x cols into the running statistics.

  Args:
    plan: the Plan; scale: the traced logit scale 1/tau.
    rb, cb: row and column block sizes.
    rows: (q [R, D], positions [R], ids [R], positive sims [R], -inf on padding).
    row_state, col_state: from `softmax_init` (or an earlier call).
    cols: (k [N, D], positions [N], ids [N], positive sims [N] of the column's own row).
    sums: (sum of kept-negative similarities, their count), float32 scalars.
  """
  def tile(row_in, row_state, col_in, col_state, sums):
    q, rpos, rid, rsim = row_in
    k, cpos, cid, csim = col_in
    sim = common.matmul(q, k.T)  # (rb, D) . (D, cb) -> (rb, cb), float32 accumulated
    pos, neg = tile_masks(plan, rpos, rid, cpos, cid, sim)
    neg_sim = jnp.where(neg, sim, NEG_INF)
    m, l, row_max = row_state
    tile_max = jnp.max(neg_sim, axis=1)
    m, l = _fold(plan.row_mult, plan.row_positive, scale, sim, pos, neg, m, l, tile_max, rsim, 1)
    row_state = (m, l, jnp.maximum(row_max, tile_max))
    if plan.col_mult:
      m, l, col_max = col_state
      tile_max = jnp.max(neg_sim, axis=0)
      m, l = _fold(plan.col_mult, plan.col_positive, scale, sim, pos, neg, m, l, tile_max, csim, 0)
      col_state = (m, l, jnp.maximum(col_max, tile_max))
    total, count = sums
    sums = (total + jnp.sum(jnp.where(neg, sim, 0.0)), count + jnp.sum(neg, dtype=jnp.float32))
    return row_state, col_state, sums

  return sweep(tile, rb, cb, rows, row_state, cols, col_state, sums)


def logsumexp(m, l):
  """log l + m from the running statistics; -inf where nothing was selected."""
  return jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), NEG_INF)


def _weights(mults, positives, scale, sim, pos, neg, lse, g, axis):
  """d(sum_c g_c lse_c)/dS of one tile: sum_c g_c mult_c scale softmax_c."""
  ds = 0.0
  for c, (mult, with_pos) in enumerate(zip(mults, positives)):  # channels, static
    sel = (neg | pos) if with_pos else neg
    a = mult * scale
    p = jnp.where(sel, jnp.exp(a * sim - jnp.expand_dims(lse[:, c], axis)), 0.0)
    ds = ds + jnp.expand_dims(a * g[:, c], axis) * p
  return ds


def softmax_backward(plan, scale, rb, cb, rows, dq, cols, dk):
  """Adds the gradient of sum(g_row * row_lse) + sum(g_col * col_lse) w.r.t. q and k.

  Each tile is recomputed from q and k; with P_c the channel's softmax (from its final lse),
  dS = sum_c g_c mult_c scale P_c, then dq += dS k and dk += dS^T q. With g_pos, the
  cotangent of the positive similarities s_ii joins dS at (i, i) before dS is rounded to
  k's dtype: for InfoNCE g_pos = -g / tau and dS_ii = g (P_ii - 1) / tau, small when the
  positive dominates, instead of g P_ii / tau rounded to bfloat16 (an error u P_ii / tau
  that the separate -g / tau would expose as (1 - P_ii) -> 0: catastrophic cancellation).

  Args:
    rows: (q [R, D], positions, ids, row_lse [R, C], g_row [R, C], g_pos [R] or None).
    dq: [R, D] accumulator; dk: [N, D] accumulator (float32, or float64 for float64 q, k).
    cols: (k [N, D], positions, ids) plus (col_lse [N, Cc], g_col [N, Cc]) if col channels.
  """
  def tile(row_in, dq, col_in, dk, carry):
    q, rpos, rid, rlse, rg, g_pos = row_in
    k, cpos, cid = col_in[:3]
    sim = common.matmul(q, k.T)  # (rb, D) . (D, cb) -> (rb, cb), float32 accumulated
    pos, neg = tile_masks(plan, rpos, rid, cpos, cid, sim)
    ds = _weights(plan.row_mult, plan.row_positive, scale, sim, pos, neg, rlse, rg, 1)
    if plan.col_mult:
      ds = ds + _weights(plan.col_mult, plan.col_positive, scale, sim, pos, neg, *col_in[3:], 0)
    if g_pos is not None:
      ds = ds + jnp.where(pos, g_pos[:, None], 0.0)  # d/ds_ii of the positive's own term
    ds = ds.astype(k.dtype)  # bfloat16 tiles: the matmuls in bfloat16, accumulated in float32
    dq = dq + common.matmul(ds, k)  # (rb, cb) . (cb, D) -> (rb, D)
    dk = dk + common.matmul(ds.T, q)  # (cb, rb) . (rb, D) -> (cb, D)
    return dq, dk, carry

  dq, dk, _ = sweep(tile, rb, cb, rows, dq, cols, dk, ())
  return dq, dk


# ---- Sigmoid: loss and gradient in one pass -------------------------------------------------


def sigmoid_tiles(plan, t, bias, with_grad, rb, cb, rows, row_state, cols, col_state, sums):
  """Sums -log sigmoid(y_ij (t s_ij + b)) over positives and kept negatives, tile by tile.

  Without a normaliser every pair's gradient dz = sigmoid(z) - y+ is known in the same pass,
  so with_grad accumulates dq, dk and db here (3 matmuls per tile, nothing recomputed).

  Args:
    rows: (q [R, D], positions, ids); row_state: (neg max [R],) + (dq [R, D],) if with_grad.
    cols: (k [N, D], positions, ids); col_state: (dk [N, D],) if with_grad else ().
    (State and sums float32 for bfloat16 q, k.)
    sums: (loss, sum of negative similarities, their count, db).
  """
  def tile(row_in, row_state, col_in, col_state, sums):
    q, rpos, rid = row_in
    k, cpos, cid = col_in
    sim = common.matmul(q, k.T)  # (rb, D) . (D, cb) -> (rb, cb), float32 accumulated
    pos, neg = tile_masks(plan, rpos, rid, cpos, cid, sim)
    sel = pos | neg
    z = t * sim + bias
    e = jnp.exp(-jnp.abs(z))
    terms = jnp.maximum(jnp.where(pos, -z, z), 0.0) + jnp.log1p(e)  # softplus(-y z)
    loss, total, count, db = sums
    loss = loss + jnp.sum(jnp.where(sel, terms, 0.0))
    total = total + jnp.sum(jnp.where(neg, sim, 0.0))
    count = count + jnp.sum(neg, dtype=jnp.float32)
    row_max = jnp.maximum(row_state[0], jnp.max(jnp.where(neg, sim, NEG_INF), axis=1))
    if not with_grad:
      return (row_max,), col_state, (loss, total, count, db)
    dz = jnp.where(sel, jnp.where(z >= 0, 1.0, e) / (1.0 + e) - pos, 0.0)  # sigmoid(z) - y+
    ds = (t * dz).astype(k.dtype)  # the matmuls in k's dtype, accumulated in float32
    dq = row_state[1] + common.matmul(ds, k)  # (rb, cb) . (cb, D) -> (rb, D)
    dk = col_state[0] + common.matmul(ds.T, q)  # (cb, rb) . (rb, D) -> (cb, D)
    return (row_max, dq), (dk,), (loss, total, count, db + jnp.sum(dz))

  return sweep(tile, rb, cb, rows, row_state, cols, col_state, sums)
