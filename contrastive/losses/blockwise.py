"""Blockwise (tiled) statistics for the contrastive losses: no B x B matrix is ever built.

The losses' `block_size=` path calls `softmax_stats` (InfoNCE, CLIP, debiased and
hard-negative InfoNCE) or `sigmoid_stats` (SigLIP). Both stream block_size x block_size tiles
of the similarity matrix through `lax.scan` (`tiles.py`):

  softmax  per row (and, for CLIP, per column) an online log-sum-exp: running max m and sum
           l <- l e^{m_old - m} + sum_j e^{x_ij - m}, one or two channels x = mult * s / tau;
           a `jax.custom_vjp` recomputes each tile in the backward pass from the final
           log-sum-exps (4 matmul passes over the tiles in all, as in FlashAttention); with
           `fused_gradient` (InfoNCE) strips of rows compute loss and gradient in one
           sweep, 3 passes (`fused.py`).
  sigmoid  no normaliser: the forward pass of the gradient computes the loss and the
           gradients tile by tile (3 matmul passes, nothing recomputed).

With `mesh` the same runs inside `jax.shard_map` over the mesh's `data` axis: each device
keeps its rows and the key chunks travel around a `ppermute` ring or are all-gathered
(`ring.py`); B must be divisible by the axis size.

Masks live in the tiles: `negative_mask` is a function keep(row_ids [b], col_ids [c],
sim [b, c]) -> bool [b, c] (False: the candidate is not a negative of the row; the positive is
always kept), called on each tile with the ids of its rows and columns: the global positions
(rows 0..B-1, keys 0..B-1, extra negatives B..B+M-1) unless `mask_ids` gives others, e.g. class
labels with `distinct_ids` to drop same-label false negatives. Ids may carry trailing axes
(row_ids [B, ...], col_ids [B + M, ...]): they are sliced, padded and passed around the ring
along their leading axis only, e.g. `distinct_group_texts`'s (group id, texts) rows.

Precision: q, k and extra come in the compute dtype (`common.normalize`). bfloat16 tiles are
multiplied in bfloat16 with float32 accumulation, and the ring passes bfloat16 key chunks (half
the bytes); the similarities, running max and sum, log-sum-exps, totals and every gradient
accumulator are float32 (float64 for float64 inputs). The backward (and fused) passes round each
tile's dS to the compute dtype for its two matmuls, as FlashAttention does with P; the gradients
leave the custom_vjp cast to their primal's dtype: bfloat16 for bfloat16 embeddings.

Remainder: when B (or B/n per device, or the keys plus extra negatives) is not a multiple of
block_size, the last block is zero-padded; the padding is masked out of every sum, maximum and
gradient, so results are the dense ones and only compute is spent on it.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from contrastive.losses import common
from contrastive.losses import fused
from contrastive.losses import ring
from contrastive.losses import tiles

DATA = 'data'  # the mesh axis the batch is split over (as contrastive.parallel.DATA)
COLLECTIVES = ('ring', 'all_gather')
# Measured in benchmarks/loss_scaling.py on 8 CPU devices: see README "Blockwise losses".
DEFAULT_COLLECTIVE = 'ring'


class SoftmaxStats(NamedTuple):
  """Streamed statistics of the softmax losses; B rows, C row and Cc column channels."""
  row_lse: jax.Array  # [B, C] log sum_j exp(mult_c s_ij / tau) over the row's selection
  col_lse: jax.Array  # [B, Cc] the same over column j's rows (CLIP's second direction)
  row_neg_max: jax.Array  # [B] largest similarity among the row's kept negatives (-inf: none)
  col_neg_max: jax.Array  # [B] the same per key column (-inf without column channels)
  neg_sum: jax.Array  # sum of the similarities of all kept (row, negative) pairs
  neg_count: jax.Array  # their number (float32)
  pos_sim: jax.Array  # [B] s_ii = q_i . k_i; its cotangent joins the positive's dS in the tiles


NO_NEGATIVE = np.iinfo(np.int32).min  # a column id that is no row's negative


def distinct_ids(row_ids, col_ids, sim):
  """keep(row_ids, col_ids, sim): a pair is a negative only if its ids differ.

  With class labels as `mask_ids`, candidates of the query's class are not negatives
  (supervised false-negative elimination).
  """
  del sim
  return row_ids[:, None] != col_ids[None, :]


def distinct_valid_ids(row_ids, col_ids, sim):
  """`distinct_ids`, and a column whose id is NO_NEGATIVE (an extra negative marked invalid)
  is no row's negative."""
  return distinct_ids(row_ids, col_ids, sim) & (col_ids[None, :] != NO_NEGATIVE)


def distinct_group_texts(row_ids, col_ids, sim):
  """keep(row_ids [b, 1 + E], col_ids [c, 2], sim) for texts shared by several groups.

  A row is (its group id g_i, the E texts of its group, -1 padded); a column is (its group id
  g_j or NO_NEGATIVE, its text t_j, -2 for a text of no corpus). Column j is a negative of row
  i only if g_j != g_i, g_j != NO_NEGATIVE and t_j is none of the row's group's texts: a text
  shared by several groups (an emoji name such as "face", "light skin tone") is no negative of
  any of them, which one group id per text cannot say.
  """
  own_text = jnp.any(row_ids[:, None, 1:] == col_ids[None, :, 1:2], axis=-1)  # [b, c]
  return distinct_valid_ids(row_ids[:, 0], col_ids[:, 0], sim) & ~own_text


def check_args(block_size, mesh, collective, negative_mask):
  """Raises ValueError for arguments the blockwise path cannot take."""
  if block_size is None:
    if mesh is not None:
      raise ValueError('mesh is only used by the blockwise path: set block_size as well.')
    return
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or (
      block_size < 1):
    raise ValueError(f'block_size must be None or a positive int, got {block_size!r}.')
  if collective not in COLLECTIVES:
    raise ValueError(f'collective must be one of {COLLECTIVES}, got {collective!r}.')
  if mesh is not None and DATA not in mesh.shape:
    raise ValueError(f'mesh must have a {DATA!r} axis; got axes {tuple(mesh.shape)}.')
  if negative_mask is not None and not callable(negative_mask):
    raise ValueError('With block_size, negative_mask must be a function keep(row_ids, col_ids, '
                     f'sim) evaluated per tile, not a dense array of shape '
                     f'{tuple(np.shape(negative_mask))}.')


def dense_mask(negative_mask, mask_ids, sim):
  """A callable negative_mask evaluated on the whole [B, B + M] sim (the dense path)."""
  if not callable(negative_mask):
    return negative_mask
  row_ids, col_ids = _ids(mask_ids, sim.shape[0], sim.shape[1])
  return negative_mask(row_ids, col_ids, sim)


def similarity_metrics(pos_sim, row_neg_max, neg_sum, neg_count):
  """`common.similarity_metrics` from streamed statistics (a positive tied with the best
  negative counts as a miss)."""
  return {'accuracy': jnp.mean((pos_sim > row_neg_max).astype(pos_sim.dtype)),
          'pos_sim': jnp.mean(pos_sim), 'neg_sim': neg_sum / jnp.maximum(neg_count, 1.0)}


def _ids(mask_ids, b, n):
  if mask_ids is None:
    return jnp.arange(b, dtype=jnp.int32), jnp.arange(n, dtype=jnp.int32)
  row_ids, col_ids = mask_ids
  if np.shape(row_ids)[:1] != (b,) or np.shape(col_ids)[:1] != (n,):
    raise ValueError(f'mask_ids must be ([B, ...], [B + M, ...]) with B = {b}, B + M = {n}; '
                     f'got ({np.shape(row_ids)}, {np.shape(col_ids)}).')
  return jnp.asarray(row_ids), jnp.asarray(col_ids)


def _prepare(q, k, extra, mask_ids, mesh, collective):
  """Ids split into keys and extras, extras padded to the device count; the Comm."""
  b, m = q.shape[0], 0 if extra is None else extra.shape[0]
  row_ids, col_ids = _ids(mask_ids, b, b + m)
  key_ids, extra_ids = col_ids[:b], (col_ids[b:] if m else None)
  n = 1 if mesh is None else mesh.shape[DATA]
  if b % n:
    raise ValueError(f'The batch B = {b} must be divisible by the {n} devices of the mesh\'s '
                     f'{DATA!r} axis.')
  if m % n:  # padded extras get positions >= B + M: masked out (see tiles.chunk_positions)
    extra_ids = tiles.pad_to(extra_ids, m + n - m % n)
  comm = ring.Comm(None if mesh is None else DATA, n, collective)
  return (row_ids, key_ids, extra_ids), comm


def _embeddings(q, k, extra):
  """q, k, extra in one dtype (their promotion: mixed bfloat16 / float32 inputs -> float32)."""
  dtype = jnp.result_type(*(x for x in (q, k, extra) if x is not None))
  return q.astype(dtype), k.astype(dtype), None if extra is None else extra.astype(dtype)


def _like(cotangents, primals):
  """Each cotangent (float32 accumulated) cast to its primal's dtype; None kept."""
  return tuple(None if c is None else c.astype(p.dtype) for c, p in zip(cotangents, primals))


def _on_mesh(mesh, fn, num_args, out_specs):
  """fn itself, or fn under shard_map: num_args[0] replicated scalars, then num_args[1] arrays
  split along DATA."""
  if mesh is None:
    return fn
  in_specs = (P(),) * (num_args[0]) + (P(DATA),) * num_args[1]
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


# ---- Softmax channels ------------------------------------------------------------------------


def softmax_stats(q, k, *, scale, extra=None, row_mult=(1.0,), row_positive=(True,), col_mult=(),
                  col_positive=(), negative_mask=None, mask_ids=None, block_size, mesh=None,
                  collective=DEFAULT_COLLECTIVE, fused_gradient=False):
  """Streamed log-sum-exps of x = mult * scale * s over each row's (and column's) candidates.

  Args:
    q: [B, D] L2-normalised queries; k: [B, D] L2-normalised keys (key i: query i's positive).
    scale: 1/tau > 0, a traced scalar (differentiated).
    extra: optional [M, D] normalised extra negatives (columns only; no column channels then).
    row_mult, row_positive: per row channel, the static multiplier mult >= 0 and whether the
      positive is in the sum (True: InfoNCE's denominator; False: negatives only).
    col_mult, col_positive: the same for column channels (over the B keys).
    negative_mask, mask_ids: see the module docstring.
    block_size: tile side; mesh, collective: see the module docstring.
    fused_gradient: the caller differentiates row_lse only through one cotangent value shared
      by all rows (any function of mean_i row_lse_i): the forward pass then computes the
      gradients too, 3 matmul passes instead of 4 (`fused.py`; one row channel, no column
      channels, one device or collective='all_gather'; ignored otherwise). A per-row cotangent
      gives NaN gradients.

  Returns:
    SoftmaxStats; differentiable in row_lse, col_lse and pos_sim w.r.t. scale, q, k and extra.
    Take s_ii from pos_sim (not from q and k): for bfloat16 inputs its cotangent must meet the
    softmax's in float32, before the tiles' dS is rounded (`tiles.softmax_backward`).
  """
  if extra is not None and col_mult:
    raise ValueError('Column channels (CLIP) do not take extra negatives.')
  if min(row_mult + col_mult, default=0.0) < 0:
    raise ValueError(f'Channel multipliers must be >= 0, got {row_mult + col_mult}.')
  check_args(block_size, mesh, collective, negative_mask)
  q, k, extra = _embeddings(q, k, extra)
  ids, comm = _prepare(q, k, extra, mask_ids, mesh, collective)
  plan = tiles.Plan(q.shape[0], 0 if extra is None else extra.shape[0], int(block_size),
                    tuple(map(float, row_mult)), tuple(row_positive), tuple(map(float, col_mult)),
                    tuple(col_positive), negative_mask, bool(fused_gradient))
  if extra is not None:
    extra = tiles.pad_to(extra, ids[2].shape[0])
  scale = jnp.asarray(scale, common.accumulation_dtype(q.dtype))  # float32 for bfloat16 q
  return _softmax(plan, comm, mesh, scale, q, k, extra, *ids)


_STATS_SPECS = (P(DATA), P(DATA), P(DATA), P(DATA), P(), P(), P(DATA))  # SoftmaxStats fields


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _softmax(plan, comm, mesh, scale, q, k, extra, row_ids, key_ids, extra_ids):
  return _softmax_fwd(plan, comm, mesh, scale, q, k, extra, row_ids, key_ids, extra_ids)[0]


def _softmax_fwd(plan, comm, mesh, scale, q, k, extra, row_ids, key_ids, extra_ids):
  args = (scale, q, k, extra, row_ids, key_ids, extra_ids)
  if fused.applies(plan, comm):  # the gradients now, for a unit cotangent
    body = functools.partial(fused.forward, plan, comm)
    *stats, grads = _on_mesh(mesh, body, (1, 6), _STATS_SPECS + ((P(DATA),) * 3,))(*args)
    return SoftmaxStats(*stats), (args, grads)
  body = functools.partial(ring.softmax_forward, plan, comm)
  stats = SoftmaxStats(*_on_mesh(mesh, body, (1, 6), _STATS_SPECS)(*args))
  return stats, (args, stats.row_lse, stats.col_lse)


def _softmax_bwd(plan, comm, mesh, residuals, cotangents):
  if fused.applies(plan, comm):
    args, grads = residuals
    grads = fused.backward(plan, *args[:3], grads, cotangents.row_lse, cotangents.pos_sim)
    return _like(grads, args) + (None, None, None)
  args, row_lse, col_lse = residuals
  body = functools.partial(ring.softmax_backward, plan, comm)
  out_specs = (P(), P(DATA), P(DATA), P(DATA))
  grads = _on_mesh(mesh, body, (1, 11), out_specs)(
      *args, row_lse, col_lse, cotangents.row_lse, cotangents.col_lse, cotangents.pos_sim)
  return _like(grads, args) + (None, None, None)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


# ---- Sigmoid ---------------------------------------------------------------------------------


def sigmoid_stats(q, k, *, scale, bias, extra=None, negative_mask=None, mask_ids=None,
                  block_size, mesh=None, collective=DEFAULT_COLLECTIVE):
  """sum over positives and kept negatives of -log sigmoid(y_ij (scale s_ij + bias)), tiled.

  Args:
    q, k: [B, D] L2-normalised; extra: optional [M, D] extra negatives (label -1).
    scale, bias: traced scalars (differentiated).
    negative_mask, mask_ids, block_size, mesh, collective: see the module docstring.

  Returns:
    (loss_sum, row_neg_max [B], neg_sum, neg_count); loss_sum is differentiable w.r.t. scale,
    bias, q, k and extra.
  """
  check_args(block_size, mesh, collective, negative_mask)
  q, k, extra = _embeddings(q, k, extra)
  ids, comm = _prepare(q, k, extra, mask_ids, mesh, collective)
  plan = tiles.Plan(q.shape[0], 0 if extra is None else extra.shape[0], int(block_size),
                    keep=negative_mask)
  if extra is not None:
    extra = tiles.pad_to(extra, ids[2].shape[0])
  acc = common.accumulation_dtype(q.dtype)  # float32 for bfloat16 q: tau, b not rounded
  scale, bias = jnp.asarray(scale, acc), jnp.asarray(bias, acc)
  return _sigmoid(plan, comm, mesh, scale, bias, q, k, extra, *ids)


_SIGMOID_SPECS = (P(), P(DATA), P(), P())


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _sigmoid(plan, comm, mesh, scale, bias, q, k, extra, row_ids, key_ids, extra_ids):
  body = functools.partial(ring.sigmoid_forward, plan, comm, False)
  return _on_mesh(mesh, body, (2, 6), _SIGMOID_SPECS)(scale, bias, q, k, extra, row_ids, key_ids,
                                                      extra_ids)


def _sigmoid_fwd(plan, comm, mesh, scale, bias, q, k, extra, row_ids, key_ids, extra_ids):
  body = functools.partial(ring.sigmoid_forward, plan, comm, True)
  out_specs = _SIGMOID_SPECS + ((P(), P(), P(DATA), P(DATA), P(DATA)),)
  *out, grads = _on_mesh(mesh, body, (2, 6), out_specs)(scale, bias, q, k, extra, row_ids,
                                                        key_ids, extra_ids)
  return tuple(out), (grads, (scale, bias, q, k, extra))


def _sigmoid_bwd(plan, comm, mesh, residuals, cotangents):
  grads, primals = residuals
  g = cotangents[0]  # only loss_sum is differentiable
  scaled = tuple(None if x is None else g * x for x in grads)
  return _like(scaled, primals) + (None, None, None)


_sigmoid.defvjp(_sigmoid_fwd, _sigmoid_bwd)
