"""InfoNCE and its symmetric relative, CLIP's loss (DCL's query/key form is in `dcl.py`).

Both score a query against a set of candidate keys with cosine similarities s_ij (each
input is L2-normalised inside, see `common.normalize`) divided by a temperature tau. Row i
of `key` is the positive of row i of `query`; the other rows of `key` are its negatives N(i).
They are written on logical global arrays: under `jax.jit` with the batch sharded along a mesh
axis, every device's keys are negatives for every other device's queries. bfloat16 embeddings
are multiplied in bfloat16 with float32 accumulation; everything after the matmuls is float32
and the gradients come back in bfloat16 (`common.py`).
"""

import jax
import jax.numpy as jnp

from contrastive.losses import blockwise
from contrastive.losses import common


def check_candidates(query, extra_negatives, negative_mask):
  """Raises ValueError unless extra_negatives is [M, D] and an array negative_mask [B, B + M]."""
  b, d = query.shape
  m = 0
  if extra_negatives is not None:
    if extra_negatives.ndim != 2 or extra_negatives.shape[1] != d:
      raise ValueError(f'extra_negatives must be [M, D] with D = {d} as in query; '
                       f'got extra_negatives: {tuple(extra_negatives.shape)}, query: {(b, d)}.')
    m = extra_negatives.shape[0]
  if negative_mask is not None and not callable(negative_mask):
    if tuple(negative_mask.shape) != (b, b + m) or negative_mask.dtype != jnp.bool_:
      raise ValueError(f'negative_mask must be bool [B, B + M] = {(b, b + m)}; got '
                       f'{negative_mask.dtype} {tuple(negative_mask.shape)}.')


def check_query_negatives(query, query_negatives, query_negative_mask):
  """Raises ValueError unless query_negatives is [B, S, D] and its mask bool [B, S]."""
  if query_negatives is None:
    if query_negative_mask is not None:
      raise ValueError('query_negative_mask needs query_negatives.')
    return
  b, d = query.shape
  if query_negatives.ndim != 3 or query_negatives.shape[::2] != (b, d):
    raise ValueError(f'query_negatives must be [B, S, D] with B, D = {(b, d)} as in query; got '
                     f'{tuple(query_negatives.shape)}.')
  shape = query_negatives.shape[:2]
  if query_negative_mask is not None and (tuple(query_negative_mask.shape) != shape or
                                          query_negative_mask.dtype != jnp.bool_):
    raise ValueError(f'query_negative_mask must be bool [B, S] = {shape}; got '
                     f'{query_negative_mask.dtype} {tuple(query_negative_mask.shape)}.')


def _own_negatives(q, query_negatives, query_negative_mask):
  """(sim [B, S] of each query with its own negatives, keep [B, S])."""
  sim = common.einsum('bd,bsd->bs', q, common.normalize(query_negatives))  # float32
  keep = (jnp.ones(sim.shape, bool) if query_negative_mask is None else query_negative_mask)
  return sim, keep


def info_nce(query, key, *, temperature, extra_negatives=None, negative_mask=None, mask_ids=None,
             query_negatives=None, query_negative_mask=None, block_size=None, mesh=None,
             collective=blockwise.DEFAULT_COLLECTIVE):
  """InfoNCE: each query must pick its own key out of the other keys and the extra negatives.

  With s_ij the cosine similarity of query i and candidate j (the B keys, then the M extra
  negatives) and N(i) the candidates other than i that `negative_mask` keeps:

      l_i = -s_ii/tau + log sum_{j in {i} u N(i)} exp(s_ij / tau),     loss = mean_i l_i.

  Query i's own negatives (`query_negatives[i]`, e.g. MoCHi's synthetic hard negatives) join
  N(i). The positive j = i is always in the denominator, whatever the mask says. With B = 1 and no
  extra negatives (or every negative masked out) the sum holds only the positive: l_i = 0 and
  the accuracy is 1.

  Args:
    query: [B, D] embeddings.
    key: [B, D] embeddings; row i is the positive of query i, the other rows its negatives.
    temperature: tau > 0, a Python float or a traced scalar.
    extra_negatives: optional [M, D] embeddings appended to every query's negatives (a memory
      queue as in MoCo, or mined hard negatives).
    negative_mask: optional [B, B + M] bool; False removes candidate j from query i's
      denominator (e.g. a false negative with the same label). Column i of row i is ignored.
      Or a function keep(row_ids [b], col_ids [c], sim [b, c]) -> bool [b, c] with the same
      meaning, evaluated tile by tile on the blockwise path (see `blockwise.py`).
    mask_ids: optional ([B] row ids, [B + M] candidate ids) handed to a function
      negative_mask instead of the positions, e.g. class labels with `blockwise.distinct_ids`.
    query_negatives: optional [B, S, D]: S negatives for each query alone (MoCHi's mixtures of its hardest negatives); on the blockwise path they are
      combined with the streamed log-sum-exp row by row.
    query_negative_mask: optional [B, S] bool; False drops query i's own negative s.
    block_size: None (dense) or the tile side of the blockwise path: same loss, gradients and
      metrics (ties between the positive and a negative count as misses there), memory
      O(B D + block_size^2) instead of O(B (B + M)). Without query_negatives, on one device or
      with collective='all_gather', the gradient is computed in the forward sweep (3 matmul
      passes, not 4) over strips of max(128, block_size^2 / (B + M)) rows (`fused.py`).
    mesh: with block_size, a Mesh whose `data` axis splits the batch: the blockwise path runs
      per device under shard_map; None: one device.
    collective: 'ring' (ppermute) or 'all_gather', how key chunks reach the other devices.

  Returns:
    (loss, metrics): loss a float32 scalar; metrics with `accuracy` (fraction of queries whose
    positive has the largest similarity among the kept candidates), `pos_sim` (mean s_ii),
    `neg_sim` (mean s_ij over kept negatives) and `logsumexp` (mean log-denominator).

  References:
    van den Oord, Li & Vinyals 2018, "Representation Learning with Contrastive Predictive
    Coding" (arXiv:1807.03748), eq. 4; He et al. 2020, MoCo (queue of extra negatives).

  >>> q, k = jax.random.normal(jax.random.key(0), (2, 8, 16))
  >>> loss, metrics = info_nce(q, k, temperature=0.1)
  """
  common.check_pair(query, key, 'query', 'key')
  common.check_temperature(temperature)
  check_candidates(query, extra_negatives, negative_mask)
  check_query_negatives(query, query_negatives, query_negative_mask)
  blockwise.check_args(block_size, mesh, collective, negative_mask)
  b = query.shape[0]
  q = common.normalize(query)  # (B, D) in the compute dtype (bfloat16 kept)
  k = common.normalize(key)
  extra = None if extra_negatives is None else common.normalize(extra_negatives)
  own = None if query_negatives is None else _own_negatives(q, query_negatives,
                                                            query_negative_mask)
  if block_size is not None:
    stats = blockwise.softmax_stats(q, k, scale=1.0 / temperature, extra=extra,
                                    negative_mask=negative_mask, mask_ids=mask_ids,
                                    block_size=block_size, mesh=mesh, collective=collective,
                                    fused_gradient=own is None)  # the loss is a mean of lse
    pos_sim = stats.pos_sim  # (B,) float32 s_ii, differentiated with the tiles
    lse, row_neg_max = stats.row_lse[:, 0], stats.row_neg_max
    neg_sum, neg_count = stats.neg_sum, stats.neg_count
    if own is not None:  # fold each row's own negatives into its streamed statistics
      own_sim, own_keep = own
      lse = jnp.logaddexp(lse, common.masked_logsumexp(own_sim / temperature, own_keep))
      row_neg_max = jnp.maximum(row_neg_max, jnp.max(jnp.where(own_keep, own_sim, -jnp.inf), 1))
      neg_sum = neg_sum + jnp.sum(jnp.where(own_keep, own_sim, 0.0))
      neg_count = neg_count + jnp.sum(own_keep)
    metrics = blockwise.similarity_metrics(pos_sim, row_neg_max, neg_sum, neg_count)
    metrics['logsumexp'] = jnp.mean(lse)
    return jnp.mean(lse - pos_sim / temperature), metrics
  if extra is not None:
    k = jnp.concatenate([k, extra])  # (B + M, D)
  sim = common.matmul(q, k.T)  # (B, D) . (D, B + M) -> (B, B + M), float32 accumulated
  negative_mask = blockwise.dense_mask(negative_mask, mask_ids, sim)
  pos_mask = jnp.eye(b, k.shape[0], dtype=bool)
  keep = jnp.ones_like(pos_mask) if negative_mask is None else negative_mask | pos_mask
  if own is not None:  # (B, B + M) -> (B, B + M + S)
    sim = jnp.concatenate([sim, own[0]], axis=1)
    keep = jnp.concatenate([keep, own[1]], axis=1)
    pos_mask = jnp.pad(pos_mask, ((0, 0), (0, own[0].shape[1])))
  logits = sim / temperature
  lse = common.masked_logsumexp(logits, keep)
  loss = jnp.mean(lse - jnp.diagonal(logits))
  metrics = common.similarity_metrics(sim, pos_mask, keep & ~pos_mask, exclude=~keep)
  metrics['logsumexp'] = jnp.mean(lse)
  return loss, metrics


def clip_loss(za, zb, *, temperature, negative_mask=None, mask_ids=None, block_size=None,
              mesh=None, collective=blockwise.DEFAULT_COLLECTIVE):
  """CLIP's symmetric InfoNCE: a's rows retrieve b's and b's rows retrieve a's.

      loss = 1/2 (info_nce(za, zb) + info_nce(zb, za))
           = 1/(2B) sum_i [-2 s_ii/tau + log sum_j exp(s_ij/tau) + log sum_j exp(s_ji/tau)],

  i.e. the row- and the column-wise cross-entropy of one (B, B) logit matrix, diagonal labels.

  `temperature` may be a traced scalar: CLIP learns it as a model parameter, e.g.
  `temperature = jnp.exp(-params['logit_scale'])`, and gradients flow into it. With B = 1
  the loss is 0. A negative_mask removes pair (i, j) from both sums (row i's and column j's).

  Args:
    za: [B, D] embeddings of one modality or view.
    zb: [B, D] embeddings of the other; row i pairs with za's row i.
    temperature: tau > 0, a Python float or a traced scalar.
    negative_mask, mask_ids: as in `info_nce`, with [B, B] masks and ([B], [B]) ids.
    block_size, mesh, collective: the blockwise path, as in `info_nce`; the column
      log-sum-exps are streamed in the same pass as the rows'.

  Returns:
    (loss, metrics): loss a float32 scalar; metrics with `accuracy` (top-1 retrieval accuracy
    averaged over both directions), `pos_sim`, `neg_sim` and `logsumexp` (mean over both
    directions of the log-denominator).

  References:
    Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
    Supervision" (CLIP), Figure 3.

  >>> za, zb = jax.random.normal(jax.random.key(0), (2, 8, 16))
  >>> loss, metrics = clip_loss(za, zb, temperature=0.07)
  """
  common.check_pair(za, zb, 'za', 'zb')
  common.check_temperature(temperature)
  check_candidates(za, None, negative_mask)
  blockwise.check_args(block_size, mesh, collective, negative_mask)
  b = za.shape[0]
  a, c = common.normalize(za), common.normalize(zb)
  if block_size is not None:
    return _clip_blockwise(a, c, temperature, negative_mask=negative_mask, mask_ids=mask_ids,
                           block_size=block_size, mesh=mesh, collective=collective)
  sim = common.matmul(a, c.T)  # (B, D) . (D, B) -> (B, B), float32 accumulated
  logits = sim / temperature
  pos_logit = jnp.diagonal(logits)
  eye = jnp.eye(b, dtype=bool)
  negative_mask = blockwise.dense_mask(negative_mask, mask_ids, sim)
  if negative_mask is None:
    lse_ab = jax.nn.logsumexp(logits, axis=1)  # za_i against every zb_j
    lse_ba = jax.nn.logsumexp(logits, axis=0)  # zb_j against every za_i
    metrics_ab = common.similarity_metrics(sim, eye, ~eye)
    metrics_ba = common.similarity_metrics(sim.T, eye, ~eye)
  else:
    keep = negative_mask | eye
    lse_ab = common.masked_logsumexp(logits, keep, axis=1)
    lse_ba = common.masked_logsumexp(logits, keep, axis=0)
    metrics_ab = common.similarity_metrics(sim, eye, keep & ~eye, exclude=~keep)
    metrics_ba = common.similarity_metrics(sim.T, eye, (keep & ~eye).T, exclude=~keep.T)
  loss = 0.5 * (jnp.mean(lse_ab - pos_logit) + jnp.mean(lse_ba - pos_logit))
  metrics = jax.tree.map(lambda x, y: 0.5 * (x + y), metrics_ab, metrics_ba)
  metrics['logsumexp'] = 0.5 * (jnp.mean(lse_ab) + jnp.mean(lse_ba))
  return loss, metrics


def _clip_blockwise(a, c, temperature, **kwargs):
  """clip_loss from one streamed pass over the tiles: row and column log-sum-exps."""
  stats = blockwise.softmax_stats(a, c, scale=1.0 / temperature, col_mult=(1.0,),
                                  col_positive=(True,), **kwargs)
  pos_sim = stats.pos_sim  # (B,) float32 s_ii, differentiated with the tiles
  lse_ab, lse_ba = stats.row_lse[:, 0], stats.col_lse[:, 0]
  pos_logit = pos_sim / temperature
  loss = 0.5 * (jnp.mean(lse_ab - pos_logit) + jnp.mean(lse_ba - pos_logit))
  metrics = blockwise.similarity_metrics(pos_sim, stats.row_neg_max, stats.neg_sum,
                                         stats.neg_count)
  accuracy_ba = jnp.mean((pos_sim > stats.col_neg_max).astype(pos_sim.dtype))
  metrics['accuracy'] = 0.5 * (metrics['accuracy'] + accuracy_ba)
  metrics['logsumexp'] = 0.5 * (jnp.mean(lse_ab) + jnp.mean(lse_ba))
  return loss, metrics

