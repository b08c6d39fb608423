"""Corpus hard-negative mining (ANCE / STAR): each query's most similar corpus candidates that
are neither its positive nor a false negative, by exact tiled top-k.

For query i with embedding q_i and candidates c_j (both L2-normalised, so s_ij = q_i . c_j is
the cosine similarity), the kept candidates are

  K(i) = {j : j not in positive_i  and  candidate_ids_j != query_ids_i}

and the hard negatives are the num_hard j in K(i) of highest s_ij, in decreasing order. Equal
ids mark false negatives: the same synset, the same emoji, an identical text under another
index. positive_i is one candidate, or several (every text of the query's group, when one text
belongs to several groups: then no single group id per candidate can exclude it from all of
them). This is the selection ANCE refreshes from an asynchronously rebuilt ANN index and STAR /
ADORE take from the whole corpus (here exact rather than approximate).

No N x M matrix is built: `retrieval.blockwise_topk` streams blocks of `block_size` candidates
through `lax.scan`, scores excluded candidates -inf and keeps a running top-k per query, so
live memory is O(N (num_hard + block_size)).

Ties: equal scores rank the LOWER candidate index first (-0.0 counts as +0.0), exactly a
stable sort on (-score, index), as `np.argsort(-scores, kind='stable')` over K(i).
Padding: a query with fewer than num_hard kept candidates gets its |K(i)| negatives first, then
index -1 with score -inf. NaN scores are not supported.

With `mesh`, the queries are split along its batch axes (`parallel.batch_mesh`: `data`, or
`data` x `fsdp` as one axis) under `jax.shard_map`, the candidates replicated: each device
ranks its rows against the whole corpus, so results equal one device's.

With query_modality / candidate_modality, K(i) also requires candidate_modality_j ==
query_modality_i (MM-Embed, Lin et al. 2024: modality-aware hard negatives).

References:
  Lin et al. 2024, "MM-Embed: Universal Multimodal Retrieval with Multimodal LLMs".
  Xiong et al. 2021, "Approximate Nearest Neighbor Negative Contrastive Learning for Dense
  Text Retrieval" (ANCE), ICLR.
  Zhan et al. 2021, "Optimizing Dense Retrieval Model Training with Hard Negatives"
  (STAR / ADORE), SIGIR.
"""

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from contrastive import parallel
from contrastive import retrieval
from contrastive.parallel import DATA


def _is_int(x):
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_int_vector(name, x, length, what):
  if x is None:
    return
  dtype = x.dtype if hasattr(x, 'dtype') else np.asarray(x).dtype
  if np.shape(x) != (length,) or not np.issubdtype(dtype, np.integer):
    raise ValueError(f'{name} must be int [{what}] = {(length,)}; got {dtype} {np.shape(x)}.')


def _check(queries, candidates, num_hard, positive, query_ids, candidate_ids, block_size, mesh,
           query_modality=None, candidate_modality=None):
  """One-line ValueErrors for bad arguments, before anything is traced or compiled."""
  # pylint: disable-next=protected-access
  retrieval._check_embeddings(queries, candidates, ('queries', 'candidates'))
  n, m = np.shape(queries)[0], np.shape(candidates)[0]
  if not _is_int(num_hard) or not 1 <= num_hard <= m - 1:
    raise ValueError(f'num_hard must be an int in [1, M - 1 = {m - 1}] (candidates: '
                     f'{np.shape(candidates)}); got {num_hard!r}.')
  if not _is_int(block_size) or block_size < 1:
    raise ValueError(f'block_size must be an int >= 1; got {block_size!r}.')
  pos_shape = np.shape(positive)
  pos_dtype = positive.dtype if hasattr(positive, 'dtype') else np.asarray(positive).dtype
  if pos_shape[:1] != (n,) or len(pos_shape) > 2 or not np.issubdtype(pos_dtype, np.integer):
    raise ValueError(f'positive must be int [N] or [N, E] with N = {n}; got {pos_dtype} '
                     f'{pos_shape}.')
  if (query_ids is None) != (candidate_ids is None):
    raise ValueError('query_ids and candidate_ids must be given together (or both None); got '
                     f'query_ids: {np.shape(query_ids) if query_ids is not None else None}, '
                     f'candidate_ids: '
                     f'{np.shape(candidate_ids) if candidate_ids is not None else None}.')
  _check_int_vector('query_ids', query_ids, n, 'N')
  _check_int_vector('candidate_ids', candidate_ids, m, 'M')
  if (query_modality is None) != (candidate_modality is None):
    raise ValueError('query_modality and candidate_modality must be given together (or both '
                     'None).')
  _check_int_vector('query_modality', query_modality, n, 'N')
  _check_int_vector('candidate_modality', candidate_modality, m, 'M')
  if not isinstance(positive, jax.core.Tracer):  # values are checked where they are known
    pos = np.asarray(positive)
    if n and (pos.min() < -1 or pos.max() >= m):
      raise ValueError(f'positive must be in [-1, M = {m}) (-1: none); got '
                       f'[{pos.min()}, {pos.max()}].')
  if mesh is not None:
    if DATA not in mesh.axis_names:
      raise ValueError(f'mesh must have a {DATA!r} axis; got axes {mesh.axis_names}.')
    devices = parallel.batch_mesh(mesh).shape[DATA]
    if n % devices:
      raise ValueError(f'N = {n} queries must divide evenly over the mesh\'s {devices} '
                       'batch devices.')


def _mine_rows(q, candidates, positive, query_ids, candidate_ids, query_modality,
               candidate_modality, *, num_hard, block_size):
  """Hard negatives of q [n, D] (one device's rows) against all candidates [M, D]."""
  m = candidates.shape[0]

  def drop(col):  # (block,) global candidate indices -> (n, block), True: excluded
    # the positives' columns (-1: none): [n, block, E] reduced over E
    out = jnp.any(col[None, :, None] == positive.reshape(positive.shape[0], 1, -1), axis=-1)
    safe = jnp.minimum(col, m - 1)  # padding (col >= M) is -inf already
    if query_ids is not None:
      out |= candidate_ids[safe][None, :] == query_ids[:, None]  # false negatives: equal ids
    if query_modality is not None:  # MM-Embed: only the query's target modality
      out |= candidate_modality[safe][None, :] != query_modality[:, None]
    return out

  scores, idx = retrieval.blockwise_topk(q, candidates, num_hard, block_size, drop=drop)
  return jnp.where(idx == m, -1, idx), scores  # missing entries: index M -> -1, score -inf


@functools.partial(jax.jit, static_argnames=('num_hard', 'block_size', 'mesh'))
def _mine(queries, candidates, positive, query_ids, candidate_ids, query_modality,
          candidate_modality, num_hard, block_size, mesh):
  dtype = jnp.promote_types(jnp.result_type(queries, candidates), jnp.float32)
  q, c = queries.astype(dtype), candidates.astype(dtype)
  fn = functools.partial(_mine_rows, num_hard=num_hard, block_size=block_size)
  if mesh is None:
    return fn(q, c, positive, query_ids, candidate_ids, query_modality, candidate_modality)
  ids_spec = None if query_ids is None else P(DATA)
  cids_spec = None if candidate_ids is None else P()
  mod_spec = None if query_modality is None else P(DATA)
  cmod_spec = None if candidate_modality is None else P()
  # No collectives: each device ranks its rows against the replicated candidates (the fresh
  # constants of the scan's carry need no varying-axis typing then).
  fn = jax.shard_map(fn, mesh=parallel.batch_mesh(mesh),
                     in_specs=(P(DATA), P(), P(DATA), ids_spec, cids_spec, mod_spec, cmod_spec),
                     out_specs=(P(DATA), P(DATA)), check_vma=False)
  return fn(q, c, positive, query_ids, candidate_ids, query_modality, candidate_modality)


def mine_hard_negatives(queries, candidates, *, num_hard, positive, query_ids=None,
                        candidate_ids=None, query_modality=None, candidate_modality=None,
                        block_size, mesh=None):
  """The num_hard hardest negatives of every query: the highest cosine s_ij = q_i . c_j over
  the candidates j that are not its positive and do not share its id (module docstring).

  Args:
    queries: [N, D] L2-normalised query embeddings (float32 or float64).
    candidates: [M, D] L2-normalised corpus embeddings (cosine = dot product).
    num_hard: negatives per query, 1 <= num_hard <= M - 1.
    positive: [N] int, the index into candidates of each query's positive, -1 for none; or
      [N, E] int: each query's E excluded candidates (-1 padding), e.g. every text of its group.
    query_ids: optional [N] int; with candidate_ids [M] int, every candidate whose id equals
      the query's is excluded (a false negative). Both or neither.
    query_modality, candidate_modality: optional [N] and [M] ints (both or neither): only the
      candidates of the query's *target* modality are kept, candidate_modality_j ==
      query_modality_i (MM-Embed's modality-aware mining: a text->image query gets image
      negatives only, when tasks of several modalities share one corpus).
    block_size: candidates per `lax.scan` step (M is padded to a multiple with -inf scores).
    mesh: optional Mesh with a `data` axis; N must divide over its batch devices.

  Returns:
    (indices [N, num_hard] int32 into candidates, scores [N, num_hard] in the inputs' float
    dtype (at least float32), descending). Ties: lower index first; fewer than num_hard kept
    candidates: the rest is index -1, score -inf.

  Example:
    >>> q = jnp.array([[1., 0.]])
    >>> c = jnp.array([[1., 0.], [0.6, 0.8], [0.8, 0.6], [0., 1.]])
    >>> mine_hard_negatives(q, c, num_hard=2, positive=jnp.array([0]), block_size=2)[0]
    Array([[2, 1]], dtype=int32)
  """
  _check(queries, candidates, num_hard, positive, query_ids, candidate_ids, block_size, mesh,
         query_modality, candidate_modality)
  as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  block_size = min(block_size, np.shape(candidates)[0])  # a larger block is all padding
  return _mine(jnp.asarray(queries), jnp.asarray(candidates), as_int(positive),
               as_int(query_ids), as_int(candidate_ids), as_int(query_modality),
               as_int(candidate_modality), num_hard, block_size, mesh)
