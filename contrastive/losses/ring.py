"""Per-device bodies of the blockwise losses: where each device's key chunks come from.

Every device keeps its own query rows. The candidates (keys, then extra negatives) arrive in
chunks, one per device, in one of two ways (`Comm.kind`):

  ring        n steps; at each, the device folds the chunk it holds into its rows' statistics
              while `lax.ppermute` hands the chunk to the next device. State that belongs to the
              chunk's columns (CLIP's column log-sum-exp, the keys' gradient) travels with it and
              is home after the n-th hop. Per device: 2 chunks [B/n + M/n, D] in flight.
  all_gather  `lax.all_gather` all chunks at once ([B + M, D] per device), fold them in one
              sweep, and combine the column state with pmax/psum_scatter (forward) or
              psum_scatter (the keys' gradient).

The tiles inside a step are `tiles.sweep`, so no device holds a (B/n) x (B/n) block either.
With `Comm.axis = None` (one device, no mesh) there is one chunk and no collective. These run
inside `jax.shard_map` (see `blockwise.py`); they are not differentiated, `blockwise.py` wraps
them in `jax.custom_vjp`s. The chunks travel in the embeddings' dtype (bfloat16: half the
bytes of float32); the state travelling with them (column statistics, the keys' gradient) is
float32 (`acc`), as every accumulator.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from contrastive.losses import common
from contrastive.losses import tiles


class Comm(NamedTuple):
  """How the chunks are exchanged: mesh axis (None: one device), its size, 'ring'/'all_gather'."""
  axis: str | None
  size: int
  kind: str


def device_index(comm):
  return 0 if comm.axis is None else lax.axis_index(comm.axis)


def _shift(comm, tree):
  """Sends each device's `tree` to the next device of the ring (identity on one device)."""
  if comm.axis is None or comm.size == 1 or not jax.tree.leaves(tree):
    return tree
  perm = [(i, (i + 1) % comm.size) for i in range(comm.size)]  # static pairs, not a loop
  return lax.ppermute(tree, comm.axis, perm)


def varying(comm, tree):
  """Marks fresh constants as per-device values: shard_map's loops need carries typed alike."""
  if comm.axis is None:
    return tree
  return jax.tree.map(lambda x: x if comm.axis in jax.typeof(x).mat.varying else lax.pcast(
      x, comm.axis, to='varying'), tree)


def gather(comm, tree):
  return lax.all_gather(tree, comm.axis, tiled=True)


def all_positions(plan, comm):
  """Positions of the gathered chunks of every device, in device order."""
  return jax.vmap(lambda s: tiles.chunk_positions(plan, comm.size, s))(
      jnp.arange(comm.size)).reshape(-1)


def _gathering(comm):
  return comm.kind == 'all_gather' and comm.axis is not None


def _ring_loop(comm, step, carry):
  """carry = step(source, carry) for source = this device, the previous one, ... (n steps)."""
  device = device_index(comm)
  if comm.size == 1:  # one chunk: no loop (and no loop-carried copies of it)
    return step(device, carry)
  return lax.fori_loop(0, comm.size, lambda t, c: step((device - t) % comm.size, c), carry)


def psum(comm, tree):
  return tree if comm.axis is None else lax.psum(tree, comm.axis)


def layouts(plan, comm, q, k, extra, row_ids, key_ids, extra_ids):
  n, b = comm.size, q.shape[0]
  rows = tiles.row_layout(plan, n, device_index(comm), q, row_ids)
  chunk = tiles.chunk_layout(plan, n, k, extra, key_ids, extra_ids)
  return rows, chunk, tiles.row_block(plan, n), tiles.col_block(plan, n), b


# ---- Softmax channels ------------------------------------------------------------------------


def softmax_forward(plan, comm, scale, q, k, extra, row_ids, key_ids, extra_ids):
  """This device's streamed statistics.

  Args:
    q, k: [b, D] this device's normalised rows and keys; extra: [m, D] or None.
    row_ids, key_ids: [b] ints, extra_ids: [m] (for `plan.keep`).

  Returns:
    (row_lse [b, C], col_lse [b, Cc] (the keys' columns), row_neg_max [b], col_neg_max [b] (or
    [b] -inf without col channels), neg_sum, neg_count (global totals), pos_sim [b] (s_ii)).
  """
  (qr, rpos, rid), (kc, cid), rb, cb, b = layouts(plan, comm, q, k, extra, row_ids, key_ids,
                                                   extra_ids)
  acc = common.accumulation_dtype(q.dtype)  # float32 statistics for bfloat16 q, k
  pos_sim = common.rowwise_dot(q, k)  # s_ii: bounds the positive's term, and is column i's too
  rsim = tiles.pad_to(pos_sim, qr.shape[0], tiles.NEG_INF)
  csim = tiles.pad_to(pos_sim, kc.shape[0], tiles.NEG_INF)
  rows = (qr, rpos, rid, rsim)
  if _gathering(comm):  # every chunk at once; column state combined over devices after
    kc, cid, csim = gather(comm, (kc, cid, csim))
  row_state, col_state = tiles.softmax_init(plan, qr.shape[0], kc.shape[0], acc)
  row_state, col_state, sums = varying(comm, (row_state, col_state, (jnp.zeros((), acc),) * 2))
  if _gathering(comm):
    cols = (kc, all_positions(plan, comm), cid, csim)
    row_state, col_state, sums = tiles.softmax_forward(plan, scale, rb, cb, rows, row_state,
                                                       cols, col_state, sums)
    if plan.col_mult:
      col_state = _combine_columns(comm, col_state)
  else:
    def step(source, carry):
      row_state, sums, chunk, col_state = carry
      kc, cid, csim = chunk
      cols = (kc, tiles.chunk_positions(plan, comm.size, source), cid, csim)
      incoming = _shift(comm, chunk)  # independent of the sweep: XLA may overlap the two
      row_state, col_state, sums = tiles.softmax_forward(plan, scale, rb, cb, rows, row_state,
                                                         cols, col_state, sums)
      return row_state, sums, incoming, _shift(comm, col_state)

    row_state, sums, _, col_state = _ring_loop(comm, step,
                                               (row_state, sums, (kc, cid, csim), col_state))
  (m, l, row_max), sums = row_state, psum(comm, sums)
  if plan.col_mult:
    cm, cl, col_max = col_state
    col_lse, col_max = tiles.logsumexp(cm, cl)[:b], col_max[:b]
  else:
    col_lse, col_max = jnp.zeros((b, 0), acc), jnp.full((b,), tiles.NEG_INF, acc)
  return tiles.logsumexp(m, l)[:b], col_lse, row_max[:b], col_max, sums[0], sums[1], pos_sim


def _combine_columns(comm, col_state):
  """Per-device partial column (max, sum, neg max) over all chunks -> this chunk's totals."""
  m, l, col_max = col_state
  length = m.shape[0] // comm.size
  start = device_index(comm) * length
  m_all = lax.pmax(m, comm.axis)
  safe = jnp.where(m_all == tiles.NEG_INF, 0.0, m_all)
  l = lax.psum_scatter(l * jnp.exp(m - safe), comm.axis, tiled=True)
  col_max = lax.dynamic_slice_in_dim(lax.pmax(col_max, comm.axis), start, length)
  return lax.dynamic_slice_in_dim(m_all, start, length), l, col_max


def softmax_backward(plan, comm, scale, q, k, extra, row_ids, key_ids, extra_ids, row_lse,
                     col_lse, g_row, g_col, g_pos):
  """Gradient of sum(g_row * row_lse) + sum(g_col * col_lse) + sum(g_pos * s_ii), tiles
  recomputed. For bfloat16 q, k, g_pos joins each tile's dS before it is rounded (see
  `tiles.softmax_backward`); otherwise g_pos s_ii's gradient is added row by row, as autodiff
  of s_ii = q_i . k_i would.

  Returns:
    (d scale (global), dq [b, D], dk [b, D], d extra [m, D] or None), float32 accumulated.
  """
  acc = common.accumulation_dtype(q.dtype)
  fold = q.dtype != acc  # static: low precision folds g_pos into the rounded dS
  (qr, rpos, rid), (kc, cid), rb, cb, b = layouts(plan, comm, q, k, extra, row_ids, key_ids,
                                                   extra_ids)
  length = qr.shape[0]
  rows = (qr, rpos, rid, tiles.pad_to(row_lse, length, tiles.NEG_INF), tiles.pad_to(g_row, length),
          tiles.pad_to(g_pos, length) if fold else None)
  chunk = (kc, cid)
  if plan.col_mult:  # padding and extra negatives have no column statistics
    chunk += (tiles.pad_to(col_lse, kc.shape[0], tiles.NEG_INF), tiles.pad_to(g_col, kc.shape[0]))
  dq = varying(comm, jnp.zeros(qr.shape, acc))
  if _gathering(comm):
    chunk = gather(comm, chunk)
    cols = (chunk[0], all_positions(plan, comm)) + chunk[1:]
    dk = varying(comm, jnp.zeros(chunk[0].shape, acc))
    dq, dk = tiles.softmax_backward(plan, scale, rb, cb, rows, dq, cols, dk)
    dk = lax.psum_scatter(dk, comm.axis, tiled=True)
  else:
    def step(source, carry):
      dq, chunk, dk = carry
      cols = (chunk[0], tiles.chunk_positions(plan, comm.size, source)) + chunk[1:]
      incoming = _shift(comm, chunk)
      dq, dk = tiles.softmax_backward(plan, scale, rb, cb, rows, dq, cols, dk)
      return dq, incoming, _shift(comm, dk)

    dq, _, dk = _ring_loop(comm, step, (dq, chunk, varying(comm, jnp.zeros(kc.shape, acc))))
  # sum_ij dS_ij s_ij = sum_i q_i . dq_i, and every logit is scale * mult * s_ij (the g_pos
  # terms of a folded dS do not depend on the scale: taken out again).
  total = jnp.sum(qr * dq)
  if fold:
    total = total - jnp.sum(g_pos * common.rowwise_dot(q, k))
  d_scale = psum(comm, total) / scale
  d_extra = None if extra is None else dk[b:b + extra.shape[0]]
  dq, dk = dq[:b], dk[:b]
  if not fold:  # d(g_pos_i q_i . k_i): row i's key lives on row i's device
    dq, dk = dq + g_pos[:, None] * k, dk + g_pos[:, None] * q
  return d_scale, dq, dk, d_extra


# ---- Sigmoid ---------------------------------------------------------------------------------


def sigmoid_forward(plan, comm, with_grad, t, bias, q, k, extra, row_ids, key_ids, extra_ids):
  """This device's share of the sigmoid loss and, if with_grad, all its gradients.

  Returns:
    (loss_sum, row_neg_max [b], neg_sum, neg_count) (totals global), then if with_grad
    (dt, db, dq [b, D], dk [b, D], d extra [m, D] or None); all float32 for bfloat16 q, k.
  """
  acc = common.accumulation_dtype(q.dtype)
  (qr, rpos, rid), (kc, cid), rb, cb, b = layouts(plan, comm, q, k, extra, row_ids, key_ids,
                                                   extra_ids)
  rows = (qr, rpos, rid)
  if _gathering(comm):
    kc, cid = gather(comm, (kc, cid))
  row_state = (jnp.full((qr.shape[0],), tiles.NEG_INF, acc),)
  row_state += (jnp.zeros(qr.shape, acc),) if with_grad else ()
  dk = (jnp.zeros(kc.shape, acc),) if with_grad else ()
  row_state, dk, sums = varying(comm, (row_state, dk, (jnp.zeros((), acc),) * 4))
  if _gathering(comm):
    row_state, dk, sums = tiles.sigmoid_tiles(plan, t, bias, with_grad, rb, cb, rows, row_state,
                                              (kc, all_positions(plan, comm), cid), dk, sums)
    dk = tuple(lax.psum_scatter(x, comm.axis, tiled=True) for x in dk)
  else:
    def step(source, carry):
      row_state, sums, chunk, dk = carry
      cols = (chunk[0], tiles.chunk_positions(plan, comm.size, source), chunk[1])
      incoming = _shift(comm, chunk)
      row_state, dk, sums = tiles.sigmoid_tiles(plan, t, bias, with_grad, rb, cb, rows,
                                                row_state, cols, dk, sums)
      return row_state, sums, incoming, _shift(comm, dk)

    row_state, sums, _, dk = _ring_loop(comm, step, (row_state, sums, (kc, cid), dk))
  loss, total, count, db = psum(comm, sums)
  out = (loss, row_state[0][:b], total, count)
  if not with_grad:
    return out
  dq, dk = row_state[1], dk[0]
  dt = psum(comm, jnp.sum(qr * dq)) / t  # sum_ij dz_ij s_ij = sum_i q_i . dq_i / t
  d_extra = None if extra is None else dk[b:b + extra.shape[0]]
  return out + ((dt, db, dq[:b], dk[:b], d_extra),)
