"""Evaluation of the two-tower recipes (CLIP / SigLIP / LiT): top-k retrieval over key blocks,
recall@k with group ids, zero-shot classification with prompt ensembling, and the alignment /
uniformity of the embeddings.

No N x M similarity matrix is built. `topk_retrieval` streams blocks of `block_size` keys
through `lax.scan` (as the losses' tiles do, `losses/tiles.py`) and keeps a running top-k per
query: each block's scores S = q k^T [N, block] give their own top-min(k, block), merged with
the carried top-k by `lax.top_k` on the concatenation [N, k + min(k, block)]. Live memory is
O(N (k + block_size)) (4096 x 4096 keys, D = 32, block 256: 4.5 MB of XLA temporaries against
the 64 MB of the full float32 matrix; tests/test_retrieval.py).

With `mesh` the queries are split along the mesh's `data` axis under `jax.shard_map`: each
device ranks its query rows against all keys (replicated), so results equal one device's.

Ties: equal scores rank the LOWER key index first (`lax.top_k`'s documented rule; the carried
entries precede the block's in the concatenation and have lower indices, so the merge keeps
it). -0.0 is canonicalised to +0.0 first (`lax.top_k` would rank -0.0 below +0.0), so the
rule is exactly a stable sort on (-score, key index), as `np.argsort(-scores, kind='stable')`.
NaN scores are not supported.

Inputs are L2-normalised embeddings (cosine = dot product); float64 stays float64, lower
precisions are computed in float32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from contrastive.losses import common
from contrastive.losses import tiles
from contrastive.parallel import DATA


def _check_embeddings(queries, keys, names=('queries', 'keys')):
  if np.ndim(queries) != 2 or np.ndim(keys) != 2 or np.shape(queries)[1] != np.shape(keys)[1]:
    raise ValueError(f'{names[0]} and {names[1]} must be [N, D] and [M, D] with the same D; got '
                     f'{names[0]}: {np.shape(queries)}, {names[1]}: {np.shape(keys)}.')


def blockwise_topk(q, keys, k, block_size, drop=None):
  """Running top-k of q [n, D] against keys [M, D] over blocks of block_size keys (jittable).

  Args:
    q: [n, D] queries; keys: [M, D]; same float dtype.
    k: keys kept per query, >= 1 (may exceed the keys a query has left after `drop`).
    block_size: keys per `lax.scan` step (M is padded to a multiple with -inf scores).
    drop: optional cols [block] int32 (global key indices; >= M on padding) -> bool
      [n, block], True where a key must not be returned for that query (scored -inf).

  Returns:
    (scores [n, k] descending, indices [n, k] int32); ties: lower index first. Where a query
    has fewer than k kept keys, the missing entries are score -inf and index M: the running
    top-k starts as k such entries, and on equal scores the carried entries come first.
  """
  m, d = keys.shape
  nb = -(-m // block_size)
  kb = tiles.pad_to(keys, nb * block_size).reshape(nb, block_size, d)
  starts = jnp.arange(nb, dtype=jnp.int32) * block_size
  bk = min(k, block_size)

  def step(carry, block):
    top_s, top_i = carry
    kblock, start = block
    s = q @ kblock.T  # (n, D) . (D, block) -> (n, block)
    s = jnp.where(s == 0, jnp.zeros_like(s), s)  # -0.0 -> +0.0: top_k orders -0.0 below +0.0
    col = start + jnp.arange(block_size, dtype=jnp.int32)
    s = jnp.where(col[None, :] < m, s, -jnp.inf)  # padded keys
    if drop is not None:
      s = jnp.where(drop(col), -jnp.inf, s)  # (n, block)
    s, i = lax.top_k(s, bk)  # (n, bk); ties: lower index first
    s = jnp.concatenate([top_s, s], axis=1)  # carried first: lower indices
    i = jnp.concatenate([top_i, start + i], axis=1)
    top_s, j = lax.top_k(s, k)  # (n, k + bk) -> (n, k)
    return (top_s, jnp.take_along_axis(i, j, axis=1)), None

  init = (jnp.full((q.shape[0], k), -jnp.inf, q.dtype), jnp.full((q.shape[0], k), m, jnp.int32))
  (top_s, top_i), _ = lax.scan(step, init, (kb, starts))
  return top_s, top_i


@functools.partial(jax.jit, static_argnames=('k', 'block_size', 'mesh'))
def _topk(queries, keys, k, block_size, mesh):
  dtype = jnp.promote_types(jnp.result_type(queries, keys), jnp.float32)
  q, keys = queries.astype(dtype), keys.astype(dtype)
  fn = functools.partial(blockwise_topk, k=k, block_size=block_size)
  if mesh is None:
    return fn(q, keys)
  n, devices = q.shape[0], mesh.shape[DATA]
  q = tiles.pad_to(q, tiles.round_up(n, devices))  # padded rows are ranked, then dropped
  # No collectives: each device ranks its rows against the replicated keys (the fresh
  # constants of the scan's carry need no varying-axis typing then).
  fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(DATA), P()), out_specs=(P(DATA), P(DATA)),
                     check_vma=False)
  top_s, top_i = fn(q, keys)
  return top_s[:n], top_i[:n]


def topk_retrieval(queries, keys, *, k, block_size, mesh=None):
  """The k keys of largest cosine similarity s_ij = q_i . k_j for every query, blockwise.

  Args:
    queries: [N, D] L2-normalised query embeddings.
    keys: [M, D] L2-normalised key embeddings.
    k: how many keys per query, 1 <= k <= M.
    block_size: keys per `lax.scan` step (M is padded to a multiple with -inf scores).
    mesh: optional Mesh; queries are split along its `data` axis (N need not divide).

  Returns:
    (scores [N, k] in the inputs' float dtype (at least float32), descending;
     indices [N, k] int32 into keys). Equal scores: lower key index first (module docstring).

  Example:
    >>> q = jnp.array([[1., 0.], [0., 1.]])
    >>> keys = jnp.array([[0., 1.], [1., 0.], [0.6, 0.8]])
    >>> topk_retrieval(q, keys, k=2, block_size=2)[1]
    Array([[1, 2],
           [0, 2]], dtype=int32)
  """
  _check_embeddings(queries, keys)
  m = np.shape(keys)[0]
  if not 1 <= k <= m:
    raise ValueError(f'k must be in [1, M = {m}] (keys: {np.shape(keys)}); got k = {k}.')
  if block_size < 1:
    raise ValueError(f'block_size must be >= 1; got {block_size}.')
  return _topk(jnp.asarray(queries), jnp.asarray(keys), k, block_size, mesh)


def recall_at_k(queries, keys, query_group, key_group, ks=(1, 5, 10), *, block_size, mesh=None):
  """Recall@k: the fraction of queries whose top-k keys include one of the query's group.

    R@k = 1/N sum_i [exists j in topk_i : key_group_j = query_group_i]

  Group ids make duplicates count (Radford et al. 2021 score text->image retrieval this way
  over COCO's 5 captions per image): give every key the id of its distinct image or text, and
  every query the id of what it should retrieve, so an identical text or the same image under
  another index is a correct hit.

  Args:
    queries: [N, D], keys: [M, D], L2-normalised.
    query_group: [N] int; key_group: [M] int.
    ks: the k's reported, each in [1, M].
    block_size, mesh: as in `topk_retrieval`.

  Returns:
    {'r@1': float, 'r@5': float, ...}, one entry per k in ks.
  """
  _check_embeddings(queries, keys)
  n, m = np.shape(queries)[0], np.shape(keys)[0]
  if np.shape(query_group) != (n,) or np.shape(key_group) != (m,):
    raise ValueError(f'query_group and key_group must be [N] = {(n,)} and [M] = {(m,)}; got '
                     f'{np.shape(query_group)} and {np.shape(key_group)}.')
  if not ks or any(not 1 <= k <= m for k in ks):
    raise ValueError(f'every k in ks must be in [1, M = {m}]; got ks = {tuple(ks)}.')
  _, idx = topk_retrieval(queries, keys, k=max(ks), block_size=block_size, mesh=mesh)
  rank = np.asarray(_first_hit(idx, jnp.asarray(query_group), jnp.asarray(key_group)))
  return {f'r@{k}': float(np.mean(rank <= k)) for k in ks}


@jax.jit
def _first_hit(idx, query_group, key_group):
  """[N] 1-based rank of the first key of the query's group in idx [N, k]; k + 1 if none."""
  hit = key_group[idx] == query_group[:, None]  # (N, k)
  rank = jnp.arange(1, idx.shape[1] + 1)
  return jnp.min(jnp.where(hit, rank, idx.shape[1] + 1), axis=1)


def bidirectional_recall(za, zb, group_a, group_b, ks=(1, 5, 10), *, block_size, mesh=None):
  """Recall@k both ways: a's rows retrieving b's (a2b) and b's retrieving a's (b2a).

  Args:
    za: [N, D] and zb: [M, D] L2-normalised (e.g. image and text embeddings).
    group_a: [N] int and group_b: [M] int, as in `recall_at_k` (equal ids match).
    ks, block_size, mesh: as in `recall_at_k`.

  Returns:
    {'a2b/r@1': float, ..., 'b2a/r@1': float, ...}.
  """
  out = {}
  for name, (q, keys, qg, kg) in (('a2b', (za, zb, group_a, group_b)),
                                  ('b2a', (zb, za, group_b, group_a))):
    recall = recall_at_k(q, keys, qg, kg, ks, block_size=block_size, mesh=mesh)
    out.update({f'{name}/{key}': value for key, value in recall.items()})
  return out


# ---- Zero-shot classification (Radford et al. 2021, CLIP, section 3.1) ---------------------


def class_embeddings(encode_text_fn, class_names, templates, tokenize_fn):
  """Prompt-ensembled class embeddings: per class, the mean of its L2-normalised template
  embeddings, normalised again.

    w_c = normalize(1/T sum_t normalize(f(template_t.format(class_c))))

  Args:
    encode_text_fn: tokens [T, L] -> [T, D] text embeddings (normalised or not).
    class_names: C strings.
    templates: T strings, each with one '{}' where the class name goes.
    tokenize_fn: list of T strings -> tokens [T, L] for encode_text_fn.

  Returns:
    [C, D] L2-normalised class embeddings (float32, or float64 if the encoder's are).

  References:
    Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
    Supervision", section 3.1.4 (prompt engineering and ensembling).
  """
  class_names, templates = list(class_names), list(templates)
  if not class_names or not templates:
    raise ValueError(f'need at least one class name and one template; got {len(class_names)} '
                     f'class names and {len(templates)} templates.')
  bad = [t for t in templates if t.count('{}') != 1]
  if bad:
    raise ValueError(f"every template must contain '{{}}' exactly once; got {bad}.")
  out = []
  for name in class_names:  # one encoder call per class, [T, L] each, as CLIP does
    z = common.l2_normalize(encode_text_fn(tokenize_fn([t.format(name) for t in templates])))
    if z.shape[0] != len(templates):
      raise ValueError(f'encode_text_fn gave {z.shape} for {len(templates)} templates; '
                       'expected [T, D].')
    out.append(jnp.mean(z, axis=0))
  return common.l2_normalize(jnp.stack(out))  # (C, D)


def zero_shot_accuracy(image_emb, class_emb, labels, *, class_of=None, block_size=1024,
                       mesh=None):
  """Top-1 and class-balanced top-1 accuracy of nearest-class-embedding predictions.

    pred_i = class_of[argmax_m image_i . w_m]  (ties: the lower row m, as `topk_retrieval`)
    top1 = 1/N sum_i [pred_i = y_i]
    balanced_top1 = 1/|C'| sum_{c in C'} (1/N_c) sum_{i: y_i = c} [pred_i = c],
                    C' the classes present in labels (mean per-class recall)

  With `class_of`, a class may own several rows (e.g. its subclasses' prompts): its score is
  the largest of its rows'.

  Args:
    image_emb: [N, D] L2-normalised image embeddings.
    class_emb: [M, D] L2-normalised class embeddings (`class_embeddings`), one row per class
      (M = C) or, with class_of, several.
    labels: [N] int in [0, C).
    class_of: [M] int in [0, C), the class of each row of class_emb (default: row m is class m).
    block_size, mesh: as in `topk_retrieval` (rows per scan step; split of the images).

  Returns:
    {'top1': float, 'balanced_top1': float}.
  """
  n, m = np.shape(image_emb)[0], np.shape(class_emb)[0]
  class_of = np.arange(m) if class_of is None else np.asarray(class_of)
  if class_of.shape != (m,) or not np.issubdtype(class_of.dtype, np.integer) or (
      m and class_of.min() < 0):
    raise ValueError(f'class_of must be int [M] = {(m,)}, >= 0; got {class_of.dtype} '
                     f'{class_of.shape}.')
  c = int(class_of.max()) + 1 if m else 0
  labels = np.asarray(labels)
  if n < 1 or labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be int [N] = {(n,)}, N >= 1; got {labels.dtype} '
                     f'{labels.shape}.')
  if labels.min() < 0 or labels.max() >= c:
    raise ValueError(f'labels must be in [0, C = {c}); got [{labels.min()}, {labels.max()}].')
  _, pred = topk_retrieval(image_emb, class_emb, k=1, block_size=min(block_size, m), mesh=mesh)
  correct = class_of[np.asarray(pred[:, 0])] == labels  # (N,) bool; exact integer counts below
  count = np.bincount(labels, minlength=c)  # (C,) examples per class
  hits = np.bincount(labels, weights=correct, minlength=c)
  present = count > 0
  return {'top1': float(np.mean(correct)),
          'balanced_top1': float(np.mean(hits[present] / count[present]))}


# ---- Alignment and uniformity (Wang & Isola 2020) ----------------------------------------


def alignment(za, zb, alpha=2):
  """Alignment loss of positive pairs: E_i ||za_i - zb_i||^alpha (lower: better aligned).

  Args:
    za, zb: [N, D] L2-normalised embeddings, row i of each a positive pair.
    alpha: the distance exponent > 0 (the paper uses 2).

  Returns:
    float.

  References:
    Wang & Isola 2020, "Understanding Contrastive Representation Learning through Alignment
    and Uniformity on the Hypersphere", eq. 4 (L_align).
  """
  common.check_pair(jnp.asarray(za), jnp.asarray(zb), 'za', 'zb')
  za, zb = common.at_least_float32(za), common.at_least_float32(zb)
  sq = jnp.sum((za - zb) ** 2, axis=1)  # (N,) squared distances
  return float(jnp.mean(sq ** (alpha / 2)))


@functools.partial(jax.jit, static_argnames=('block_size',))
def _log_mean_gaussian(z, t, block_size):
  """log mean_{i != j} exp(-t ||z_i - z_j||^2) over blocks of block_size columns."""
  n, d = z.shape
  nb = -(-n // block_size)
  zb = tiles.pad_to(z, nb * block_size).reshape(nb, block_size, d)
  starts = jnp.arange(nb) * block_size
  sq = jnp.sum(z * z, axis=1)
  rows = jnp.arange(n)

  def step(carry, block):  # online log-sum-exp: running max m, sum l of exp(x - m)
    m, l = carry
    zblock, start = block
    col = start + jnp.arange(block_size)
    d2 = sq[:, None] + jnp.sum(zblock * zblock, axis=1)[None, :] - 2 * z @ zblock.T  # (n, block)
    x = -t * jnp.maximum(d2, 0.0)
    keep = (col[None, :] < n) & (rows[:, None] != col[None, :])
    x = jnp.where(keep, x, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(x))
    l = l * jnp.exp(m - m_new) + jnp.sum(jnp.where(keep, jnp.exp(x - m_new), 0.0))
    return (m_new, l), None

  init = (jnp.array(-jnp.inf, z.dtype), jnp.array(0.0, z.dtype))
  (m, l), _ = lax.scan(step, init, (zb, starts))
  return m + jnp.log(l) - jnp.log(n * (n - 1.0))


def uniformity(z, t=2, *, block_size=1024):
  """Uniformity loss: log E_{i != j} exp(-t ||z_i - z_j||^2) (lower: more uniform).

  Computed over blocks of block_size columns with an online log-sum-exp: memory
  O(N block_size), never N x N; every ordered pair i != j counts (duplicates included).

  Args:
    z: [N, D] L2-normalised embeddings, N >= 2.
    t: the Gaussian potential's scale > 0 (the paper uses 2).
    block_size: columns per `lax.scan` step.

  Returns:
    float.

  References:
    Wang & Isola 2020, "Understanding Contrastive Representation Learning through Alignment
    and Uniformity on the Hypersphere", eq. 5 (L_uniform).
  """
  if np.ndim(z) != 2 or np.shape(z)[0] < 2:
    raise ValueError(f'z must be [N, D] with N >= 2; got {np.shape(z)}.')
  z = common.at_least_float32(z)
  return float(_log_mean_gaussian(z, jnp.asarray(t, z.dtype), min(block_size, z.shape[0])))
