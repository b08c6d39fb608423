"""The InfoNCE objective with its negatives chosen by the configured samplers.

One direction, query q against key k (k's row i is q's positive), reads as a pipeline:

  candidates  the B keys, then the memory queue's K keys (extra negatives), then negatives
              interpolated from them (feature transformation);
  masks       same instance (queue entries of the query's own image, empty slots), similarity
              threshold, GISTEmbed's guide, MCL's clusters: keep-functions evaluated per tile;
  mining      keep only each query's top-k hardest surviving candidates (optionally skipping
              the top-r as suspected false negatives);
  MoCHi       per-query synthetic negatives mixed from its hardest candidates;
  DyCE        BECLR's pseudo-positives: the key's nearest items in its cluster of the DyCE
              memory (`dyce.py`), extra positives of the query;
  loss        `info_nce` (dense or blockwise) over what is left (+ `dyce.positive_shift`).

Every stage is a pure function of `contrastive.samplers`; this module only wires them from
config (`config.samplers`, see configs/simclr_fmnist.py).
"""

import jax
import jax.numpy as jnp

from contrastive.losses import info_nce
from contrastive.losses import l2_normalize
from contrastive.samplers import dyce
from contrastive.samplers import feature_transform
from contrastive.samplers import masks
from contrastive.samplers import mining
from contrastive.samplers import mochi
from contrastive.samplers.queue import EMPTY

MIXED_ID = 2**30  # ids of interpolated negatives: never an example id, never EMPTY
HISTOGRAM_COLUMNS = 256  # negatives per query scored for the pos/neg histograms


def candidate_keeps(ids, cand_ids, guide_query, guide_cands, cfg, clusters):
  """The configured keep-functions over candidates [keys; extras] of one direction."""
  keeps = [masks.instance_keep(ids, cand_ids)]
  if cfg.threshold < 1.0:
    keeps.append(masks.threshold_keep(cfg.threshold))
  if cfg.gist:
    keeps.append(masks.gist_keep(guide_query, guide_cands, margin=cfg.gist_margin))
  if clusters is not None:  # MCL: unknown ids (mixed negatives, empty slots) get cluster -1
    def cluster_of(i):
      known = (i >= 0) & (i < clusters.shape[0])
      return jnp.where(known, clusters[jnp.clip(i, 0, clusters.shape[0] - 1)], -1)
    keeps.append(masks.cluster_keep(cluster_of(ids), cluster_of(cand_ids)))
  return masks.all_of(*keeps)


def one_direction(rng, q, k, guide_q, guide_k, ids, queue, *, cfg, temperature, epoch,
                  block_size=None, mesh=None, clusters=None, memory=None):
  """InfoNCE of queries q [B, D] against keys k [B, D] with the sampled negatives.

  Args:
    rng: key for the samplers' draws.
    q: [B, D] queries (with gradient). k: [B, D] keys (the momentum encoder's, or the other
      view's online embeddings for SimCLR).
    guide_q, guide_k: [B, D] the guide's embeddings of q's and k's views (GISTEmbed), or None.
    ids: [B] int example ids of the batch. queue: a `Queue` or None.
    cfg: config.samplers. epoch: float, for MoCHi's start epoch. clusters: [N] int cluster of
      each example id (MCL) or None. memory: BECLR's `dyce.DyCE` (cfg.dyce.topk
      pseudo-positives per query, found from its key) or None.

  Returns:
    (loss, metrics) of `info_nce` (with `pseudo_positives`, the mean valid count, and the
    multi-positive loss of `dyce.positive_shift` with a memory).
  """
  rng_pos, rng_mix, rng_mochi = jax.random.split(rng, 3)
  extra, extra_ids = (None, None) if queue is None else (queue.keys, queue.ids)
  if cfg.pos_alpha > 0:
    q, k = feature_transform.extrapolate_positives(rng_pos, q, k, cfg.pos_alpha)
  if cfg.neg_mix > 0:
    source = k if extra is None else extra
    mixed = feature_transform.interpolate_negatives(rng_mix, source, cfg.neg_mix,
                                                    cfg.neg_mix_alpha)
    ready = jnp.all(extra_ids != EMPTY) if extra is not None else True  # no mixes of empties
    mixed_ids = jnp.where(ready, MIXED_ID + jnp.arange(cfg.neg_mix, dtype=jnp.int32), EMPTY)
    extra = mixed if extra is None else jnp.concatenate([extra, mixed])
    extra_ids = mixed_ids if extra_ids is None else jnp.concatenate([extra_ids, mixed_ids])
  cands = k if extra is None else jnp.concatenate([k, extra])
  cand_ids = ids if extra is None else jnp.concatenate([ids, extra_ids])
  guide_cands = None
  if cfg.gist:  # queue entries are momentum keys already: their own guide embeddings
    guide_cands = guide_k if extra is None else jnp.concatenate([guide_k, extra])
  keep = candidate_keeps(ids, cand_ids, guide_q, guide_cands, cfg, clusters)
  hard = None  # MoCHi's hard sets, when mining has ranked enough negatives already
  if cfg.mining_k:
    _, idx = mining.top_k_negatives(q, cands, cfg.mining_k, skip_top=cfg.mining_skip_top,
                                    keep=keep, block_size=block_size)
    keep = masks.all_of(keep, mining.indices_keep(idx, num_candidates=cands.shape[0]))
    hard = idx[:, :cfg.mochi.num_hard] if cfg.mochi.num_hard <= cfg.mining_k else None
  own, own_mask = None, None
  if cfg.mochi.num_hard:
    own, own_mask = mochi.mochi_negatives(
        rng_mochi, q, cands, num_hard=cfg.mochi.num_hard, num_mix=cfg.mochi.num_mix,
        num_query_mix=cfg.mochi.num_query_mix, keep=keep, block_size=block_size,
        hard_indices=hard)
    own_mask = own_mask & (epoch >= cfg.mochi.start_epoch)
  if memory is not None:  # pseudo-positives join the denominator here, the numerator below
    pseudo, valid = dyce.neighbours(memory, k, cfg.dyce.topk)
    valid = valid & (epoch >= cfg.dyce.start_epoch)
    pseudo = pseudo.astype(q.dtype)
    own = pseudo if own is None else jnp.concatenate([own, pseudo], axis=1)
    own_mask = valid if own_mask is None else jnp.concatenate([own_mask, valid], axis=1)
  loss, metrics = info_nce(q, k, temperature=temperature, extra_negatives=extra,
                           negative_mask=keep, query_negatives=own, query_negative_mask=own_mask,
                           block_size=block_size, mesh=mesh)
  if memory is not None:
    loss = loss + dyce.positive_shift(q, k, pseudo, valid, temperature)
    metrics = dict(metrics, pseudo_positives=jnp.mean(jnp.sum(valid, 1).astype(jnp.float32)))
  return loss, metrics


def score_histograms(q, k):
  """Pos/neg cosine-score histograms of one direction (Zhu et al. 2021's visualisation).

  The negatives are each query against the first HISTOGRAM_COLUMNS other keys, so the cost
  stays O(B) at any batch size.
  """
  qn, kn = l2_normalize(q), l2_normalize(k)
  cols = min(HISTOGRAM_COLUMNS, k.shape[0])
  sim = qn @ kn[:cols].T  # (B, D) . (D, cols) -> (B, cols)
  negative = jnp.arange(q.shape[0])[:, None] != jnp.arange(cols)[None, :]
  neg = jnp.where(negative, sim, 3.0)  # outside [-1, 1]: in no bin
  return feature_transform.score_histograms(jnp.sum(qn * kn, 1), neg)


def sampled_loss(rng, views, ids, queue, *, cfg, temperature, symmetric, epoch, block_size=None,
                 mesh=None, clusters=None, memory=None):
  """The objective over both views: 1/2 (L(q1, k2) + L(q2, k1)), or L(q1, k2) alone.

  Args:
    views: dict of [B, D] arrays q1, q2 (queries), k1, k2 (keys) and g1, g2 (guide
      embeddings, or None).
    Others: as in `one_direction`.

  Returns:
    (loss, metrics), metrics averaged over the directions; with cfg.histograms also
    `hist_pos`, `hist_neg` ([bins] counts) of the first direction.
  """
  pairs = [('q1', 'k2', 'g1', 'g2'), ('q2', 'k1', 'g2', 'g1')][:2 if symmetric else 1]
  results = []
  for rng_dir, (q, k, gq, gk) in zip(jax.random.split(rng, len(pairs)), pairs):
    results.append(one_direction(rng_dir, views[q], views[k], views[gq], views[gk], ids, queue,
                                 cfg=cfg, temperature=temperature, epoch=epoch,
                                 block_size=block_size, mesh=mesh, clusters=clusters,
                                 memory=memory))
  loss = sum(r[0] for r in results) / len(results)
  metrics = jax.tree.map(lambda *xs: sum(xs) / len(xs), *[r[1] for r in results])
  if cfg.histograms:
    hist = score_histograms(views['q1'], views['k2'])
    metrics.update(hist_pos=hist['pos'], hist_neg=hist['neg'])
  return loss, metrics
