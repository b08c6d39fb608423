"""Keep-function factories: which candidates stay negatives of which query.

Each factory returns a function keep(row_ids [b] int32, col_ids [c] int32, sim [b, c]) -> bool
[b, c] for the `negative_mask=` argument of the losses (`blockwise.py` describes the
convention). True: candidate j stays a negative of query i; the losses keep the positive
(column i of row i) whatever the mask says. Row ids are global query positions 0..B-1, column
ids global candidate positions: 0..B-1 the in-batch keys, B..B+M-1 the extra negatives.

Per-row and per-column data (instance ids, clusters, guide embeddings) are captured as global
arrays and indexed with the ids, so one function serves the dense path, the blockwise tiles and
the per-device tiles under a mesh. On the blockwise path the tiles carry padding ids (-1 or
>= B + M); jnp indexing clamps or wraps them and the losses discard those entries.
"""

import jax
import jax.numpy as jnp

from contrastive.losses import common


def _ids_vector(x, name):
  x = jnp.asarray(x)
  if x.ndim != 1 or not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f'{name} must be a 1-D integer array; got {x.dtype} {tuple(x.shape)}.')
  return x


def instance_keep(query_ids, candidate_ids):
  """Drops candidates of the query's own instance and empty queue slots.

      keep_ij = [id(q_i) != id(c_j)] and [id(c_j) >= 0].

  A MoCo queue may still hold an earlier key of the query's own image (or the same example
  twice in one batch); that candidate is a positive, not a negative. Queue slots not yet
  filled carry id -1.

  Args:
    query_ids: [B] int example ids of the queries.
    candidate_ids: [B + M] int example ids of the candidates (keys, then extra negatives);
      < 0 marks an empty slot.

  Returns:
    keep(row_ids, col_ids, sim) -> bool [b, c].

  References:
    He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning" (MoCo).
  """
  query_ids = _ids_vector(query_ids, 'query_ids')
  candidate_ids = _ids_vector(candidate_ids, 'candidate_ids')

  def keep(row_ids, col_ids, sim):
    del sim
    q, c = query_ids[row_ids], candidate_ids[col_ids]  # (b,), (c,)
    return (q[:, None] != c[None, :]) & (c[None, :] >= 0)

  return keep


def threshold_keep(theta):
  """Drops candidates more similar to the query than theta (likely false negatives).

      keep_ij = [s_ij <= theta],   s_ij the cosine similarity the loss computes.

  Args:
    theta: similarity threshold in [-1, 1], a float or a traced scalar.

  Returns:
    keep(row_ids, col_ids, sim) -> bool [b, c].

  References:
    Huynh et al. 2022, "Boosting Contrastive Self-Supervised Learning with False Negative
    Cancellation" (WACV): false-negative elimination.
  """

  def keep(row_ids, col_ids, sim):
    del row_ids, col_ids
    return sim <= theta

  return keep


def gist_keep(guide_query, guide_candidates, margin=0.0):
  """GISTEmbed: a frozen guide model vetoes candidates it rates close to the positive.

  With g_ij the cosine similarity of the guide's query i and candidate j embeddings:

      keep_ij = [g_ij <= g_ii - margin],

  i.e. candidate j is dropped when the guide scores it above the query's own positive
  (candidate i), or within `margin` of it. The guide similarities are computed per tile from
  the captured arrays, guide_query[row_ids] . guide_candidates[col_ids]^T, never as one
  [B, B + M] matrix on the blockwise path; no gradient flows into the guide. (The paper also
  filters query-query and positive-positive pairs; here only the query-candidate ones.)

  Args:
    guide_query: [B, Dg] the guide's embeddings of the queries.
    guide_candidates: [B + M, Dg] the guide's embeddings of the candidates; row i is the
      positive of query i.
    margin: >= 0 safety margin below the guide's positive similarity (0: the paper's rule).

  Returns:
    keep(row_ids, col_ids, sim) -> bool [b, c].

  References:
    Solatorio 2024, "GISTEmbed: Guided In-sample Selection of Training Negatives for Text
    Embedding Fine-tuning" (arXiv:2402.16829).
  """
  gq = jnp.asarray(guide_query)
  gc = jnp.asarray(guide_candidates)
  if gq.ndim != 2 or gc.ndim != 2 or gq.shape[1] != gc.shape[1] or gc.shape[0] < gq.shape[0]:
    raise ValueError(f'guide_query must be [B, Dg] and guide_candidates [B + M, Dg] (M >= 0); '
                     f'got {tuple(gq.shape)} and {tuple(gc.shape)}.')
  gq = jax.lax.stop_gradient(common.l2_normalize(gq))
  gc = jax.lax.stop_gradient(common.l2_normalize(gc))

  def keep(row_ids, col_ids, sim):
    del sim
    rows = gq[row_ids]  # (b, Dg)
    guide_sim = rows @ gc[col_ids].T  # (b, Dg) . (Dg, c) -> (b, c)
    guide_pos = jnp.sum(rows * gc[row_ids], axis=1)  # (b,) guide similarity to the positive
    return guide_sim <= guide_pos[:, None] - margin

  return keep


def cluster_keep(query_clusters, candidate_clusters):
  """MCL's feature-aware negatives: only candidates of the query's own cluster stay.

      keep_ij = [cluster(q_i) == cluster(c_j)],

  with the clusters assigned (e.g. by k-means) on the previous stage's features, so that the
  next stage must learn features that separate examples its predecessor lumped together.

  Args:
    query_clusters: [B] int cluster of each query.
    candidate_clusters: [B + M] int cluster of each candidate.

  Returns:
    keep(row_ids, col_ids, sim) -> bool [b, c].

  References:
    Zhang et al. 2024, "Learning the Unlearned: Mitigating Feature Suppression in Contrastive
    Learning" (ECCV; arXiv:2402.11816), Multistage Contrastive Learning (MCL).
  """
  query_clusters = _ids_vector(query_clusters, 'query_clusters')
  candidate_clusters = _ids_vector(candidate_clusters, 'candidate_clusters')

  def keep(row_ids, col_ids, sim):
    del sim
    return query_clusters[row_ids][:, None] == candidate_clusters[col_ids][None, :]

  return keep


def all_of(*keeps):
  """The conjunction of keep-functions: a candidate stays only if every one keeps it.

      keep_ij = AND_k keep^k_ij.

  Args:
    *keeps: keep-functions; None entries are ignored.

  Returns:
    keep(row_ids, col_ids, sim) -> bool [b, c]; the function itself if only one is given,
    None if none is.
  """
  keeps = [k for k in keeps if k is not None]
  for k in keeps:
    if not callable(k):
      raise ValueError(f'all_of takes keep-functions or None; got {type(k).__name__}.')
  if not keeps:
    return None
  if len(keeps) == 1:
    return keeps[0]

  def keep(row_ids, col_ids, sim):
    out = keeps[0](row_ids, col_ids, sim)
    for k in keeps[1:]:
      out = out & k(row_ids, col_ids, sim)
    return out

  return keep
