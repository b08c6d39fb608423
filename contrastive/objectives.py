"""The recipe families' objectives: what `step.update` differentiates.

An objective is fn(params, state, batch, rng) -> (loss, (metrics, batch_stats, keys)):
`batch_stats` are the model's new BatchNorm statistics (the state's own if it has none) and
`keys` the embeddings a memory queue stores (None without a queue). A recipe family is one
objective and one config; the update around it (optimizer, momentum encoder, queue, the
non-finite guard) is shared.

Each family's objective is an `Objective`: `embed` (per-example rows -> embeddings) then
`loss` (the global embeddings -> loss), so GradCache (contrastive/grad_cache.py) can embed the
batch micro-batch by micro-batch and still take the loss over the global batch.

- `image_views`: two augmented views of each image through one encoder: SimCLR (a pair loss
  over the global batch) or, with a `Method`, a momentum encoder, queue and negative
  samplers (MoCo v2/v3, contrastive/samplers).
- `two_tower`: side a (images or texts) and side b (texts) through two towers, CLIP's softmax
  or SigLIP's sigmoid loss with the model's learned temperature (and bias).
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from contrastive.data import augment
from contrastive.losses import blockwise
from contrastive.losses import clip_loss
from contrastive.losses import sigmoid_loss
from contrastive.losses import amcl as amcl_lib
from contrastive.negatives import geodesic_mixup
from contrastive.negatives import static_bank
from contrastive.samplers import objective as sampler_objective

TWO_TOWER_LOSSES = {'clip_loss': clip_loss, 'sigmoid_loss': sigmoid_loss,
                    'amcl': amcl_lib.amcl}


class Objective(NamedTuple):
  """A family's loss as embed-then-loss; calling it runs both on the whole batch.

  Attributes:
    embed: fn(params, state, rows, rng) -> (emb, const, batch_stats). `rows` are the batch's
      per-example arrays for some of its rows, with 'index' [m] their numbers in the global
      batch (augmentations depend on them, so any split of the batch sees the same views);
      `emb` is the pytree of [m, ...] embeddings the loss differentiates, `const` those it does
      not (a momentum encoder's; or None), `batch_stats` the model's updated statistics.
    loss: fn(params, state, (emb, const), batch, rng) -> (loss, (metrics, keys)) with the
      global batch's embeddings ([B, ...] leaves; `params` for what the loss itself learns,
      such as a temperature).
  """
  embed: Callable
  loss: Callable

  def __call__(self, params, state, batch, rng):
    """The full-batch objective: (loss, (metrics, batch_stats, keys))."""
    size = jax.tree.leaves(batch)[0].shape[0]
    emb, const, batch_stats = self.embed(params, state, with_index(batch, 0, size), rng)
    loss, (metrics, keys) = self.loss(params, state, (emb, const), batch, rng)
    return loss, (metrics, batch_stats, keys)

class Method(NamedTuple):
  """What the image-views objective does beyond plain SimCLR (`image_views(method=None)`);
  static. Built from a config by `recipes.image_views.method`.

  Attributes:
    name: 'simclr' (keys: the other view's online embeddings) or 'moco' (keys: the momentum
      encoder's, without gradient).
    samplers: config.samplers (see contrastive/samplers/objective.py).
    temperature: InfoNCE's tau.
    symmetric: both directions (q1 vs k2 and q2 vs k1) or q1 vs k2 only (MoCo v2).
    momentum: None, or the EMA momentum schedule fn(step) (needed by 'moco' and GIST's guide).
    steps_per_epoch: for MoCHi's start epoch.
    block_size: the loss's blockwise path (None: dense). It runs as one tiled scan on the
      global arrays, partitioned by XLA; the samplers' masks close over global per-row data
      (ids, guide embeddings), which the explicit shard_map ring of the plain losses does not
      take in.
    clusters: [N] int cluster of each example id (MCL's second stage), or None.
    amcl: AMCL's fixed arguments {'beta', 'kappa'}, or None: with them the model's heads
      each run the method's loss with their own learned temperature (`_sampled_heads`).
  """
  name: str
  samplers: Any
  temperature: float
  symmetric: bool = True
  momentum: Callable | None = None
  steps_per_epoch: float = 1.0
  block_size: int | None = None
  clusters: Any = None
  amcl: Any = None



def with_index(batch, start, size):
  """The batch's arrays with 'index': the rows' numbers start ... start + size - 1."""
  return dict(batch, index=jnp.arange(start, start + size, dtype=jnp.int32))


def _embed(model, params, batch_stats, views, b, predict=True):
  """Both views through the model in one batch -> ([B, D] view 1, [B, D] view 2, BN stats)."""
  (_, z), updates = model.apply({'params': params, 'batch_stats': batch_stats}, views,
                                train=True, mutable=['batch_stats'], predict=predict)
  z = z.reshape(b, 2, -1)
  return z[:, 0], z[:, 1], updates['batch_stats']


def image_views(*, model, loss_fn, aug_cfg, method=None):
  """SimCLR (method=None: loss_fn(z1, z2)) or a `Method` (MoCo, samplers).

  batch: {'image': [B, H, W, C] uint8, 'id': [B] int (with a method)}. Each image gives two
  views (augmentations per example: fold_in(rng, example index)), interleaved [2B, ...] so
  each device keeps its own rows and BatchNorm normalises over all 2B views of the batch the
  model sees (with GradCache: of each micro-batch).
  """
  def embed(params, state, rows, rng):
    aug_rng = jax.random.split(rng)[0] if method else rng
    with jax.named_scope('augment'):  # the scopes name the ops in profiles (step_profile.py)
      v1, v2 = augment.two_views(aug_rng, rows['image'], aug_cfg, indices=rows['index'])
    b = v1.shape[0]
    views = jnp.stack([v1, v2], axis=1).reshape(2 * b, *v1.shape[1:])
    q1, q2, batch_stats = _embed(model, params, state.batch_stats, views, b)
    const = None
    if method is not None and state.ema_params is not None:  # MoCo's key encoder: BatchNorm
      g1, g2, _ = _embed(model, state.ema_params, state.ema_batch_stats, views, b,  # in train
                         predict=False)  # mode
      const = jax.lax.stop_gradient((g1, g2))
    return (q1, q2), const, batch_stats

  def loss(params, state, embeddings, batch, rng):
    (q1, q2), const = embeddings
    with jax.named_scope('loss'):
      learned = model.apply({'params': params}, method='loss_params')  # AMCL's temperatures
      if method is None:
        value, metrics = loss_fn(q1, q2, **learned)
        return value, (metrics, None)
      if method.amcl is not None:
        return _sampled_heads(state, batch, q1, q2, const, jax.random.split(rng)[1],
                              learned['temperatures'], method=method)
      return _sampled(state, batch, q1, q2, const, jax.random.split(rng)[1], method=method)

  return Objective(embed, loss)


def _sampled(state, batch, q1, q2, const, rng, *, method):
  """Loss with keys from the momentum encoder (MoCo) or the online one (SimCLR), the queue's
  extra negatives and the configured samplers -> (loss, (metrics, keys to enqueue))."""
  g1, g2 = const if const is not None else (None, None)
  k1, k2 = (g1, g2) if method.name == 'moco' else (q1, q2)
  epoch = state.step / method.steps_per_epoch
  loss, metrics = sampler_objective.sampled_loss(
      rng, dict(q1=q1, q2=q2, k1=k1, k2=k2, g1=g1, g2=g2), batch['id'], state.queue,
      cfg=method.samplers, temperature=method.temperature, symmetric=method.symmetric,
      epoch=epoch, block_size=method.block_size, clusters=method.clusters,
      memory=getattr(state, 'dyce', None))
  return loss, (metrics, k2)


def _sampled_heads(state, batch, q1, q2, const, rng, temperatures, *, method):
  """AMCL with a momentum encoder and queue (MoCo): the embeddings [B, H * D] as H heads,
  each scored by `_sampled`'s loss on its own slice of the queries, keys and queue entries
  with its own temperature, combined as AMCL's objective (`amcl.combine`) -> (loss, (metrics,
  keys [B, H * D] to enqueue))."""
  g1, g2 = const if const is not None else (None, None)
  k1, k2 = (g1, g2) if method.name == 'moco' else (q1, q2)
  views = dict(q1=q1, q2=q2, k1=k1, k2=k2, g1=g1, g2=g2)
  heads = temperatures.shape[0]
  width = q1.shape[-1] // heads
  terms, metrics = [], []
  for h, key in enumerate(jax.random.split(rng, heads)):  # a few heads, not rows or devices
    cut = lambda x, h=h: None if x is None else x[..., h * width:(h + 1) * width]
    queue = None if state.queue is None else state.queue.replace(keys=cut(state.queue.keys))
    loss, m = sampler_objective.sampled_loss(
        key, {n: cut(v) for n, v in views.items()}, batch['id'], queue, cfg=method.samplers,
        temperature=temperatures[h], symmetric=method.symmetric,
        epoch=state.step / method.steps_per_epoch, block_size=method.block_size)
    terms.append(loss)
    metrics.append(m)
  loss, out = amcl_lib.combine(terms, metrics, temperatures, **method.amcl)
  return loss, (out, k2)


EXTRA_TEXTS = ('b_neg', 'b_hard')  # NegCLIP's perturbations, corpus-mined hard negatives


def text_negatives(z, batch):
  """The loss's extra negatives, mask ids and mask from z = (za, zb, extra): {'b_neg':
  [B, P, D], 'b_hard': [B, K, D]} (either, both or none). All B P (+ B K) rows are extra text
  negatives of every row of the batch (`extra_negatives`; as NegCLIP adds its perturbations to
  the batch and STAR / DPR share mined negatives across it). Their mask ids:

  - a NegCLIP perturbation (Yuksekgonul et al. 2023): -1 - its position, equal to no row's
    group id (>= 0), so it is a negative of its own row (its point: the same words in another
    order);
  - a mined negative (contrastive/negatives/corpus_index.py): its text's group id
    ('b_hard_id'), so it is kept from any row of its group; with 'b_group_texts' (every
    row's group's texts, which `CorpusIndex.attach` adds) the ids are (group, text) pairs
    and `blockwise.distinct_group_texts` keeps every text of a row's group from being its
    negative, in the batch or mined, also when the text belongs to several groups;
  - an invalid entry (`<name>_valid` False: a text of < 2 distinct words, or no mined
    negative yet; its tokens are the row's own text, embedded but unused) takes the id
    `blockwise.NO_NEGATIVE`, so it is a negative of no row at all.

  Returns:
    {'mask_ids': ([B], [B + M]) or ([B, 1 + E], [B + M, 2]), 'negative_mask': the keep
    function for them, and 'extra_negatives': [M, D] when there are extra texts}.
  """
  ids = batch['id']
  extra = z[2] if len(z) > 2 else {}
  shared = 'b_group_texts' in batch  # (group, text) ids: texts shared by groups
  col = lambda group, text: jnp.stack([group, text], axis=1) if shared else group
  rows, neg_ids, offset = [], [], 0
  for name in EXTRA_TEXTS:  # at most two kinds: not a loop over rows or devices
    if name not in extra:
      continue
    b, n, d = extra[name].shape
    own = (batch[name + '_id'].reshape(-1) if name + '_id' in batch else
           -1 - (offset + jnp.arange(b * n, dtype=ids.dtype)))
    group = jnp.where(batch[name + '_valid'].reshape(-1), own,
                      jnp.asarray(blockwise.NO_NEGATIVE, ids.dtype))
    text = (batch[name + '_text'].reshape(-1) if name + '_text' in batch else
            jnp.full(b * n, -2, ids.dtype))  # a perturbation: a text of no corpus
    neg_ids.append(col(group, text))
    rows.append(extra[name].reshape(b * n, d))
    offset += b * n
  if shared:
    row_ids = jnp.concatenate([ids[:, None], batch['b_group_texts']], axis=1)
    out = dict(mask_ids=(row_ids, jnp.concatenate([col(ids, batch['b_text'])] + neg_ids)),
               negative_mask=blockwise.distinct_group_texts)
  elif rows:
    out = dict(mask_ids=(ids, jnp.concatenate([ids] + neg_ids)),
               negative_mask=blockwise.distinct_valid_ids)
  else:  # without extras: the plain rule, the same program as a run without the option
    out = dict(mask_ids=(ids, ids), negative_mask=blockwise.distinct_ids)
  if rows:
    out['extra_negatives'] = jnp.concatenate(rows)
  return out


def geodesic_mixup_loss(loss_fn, za, zb, ids, lam, **kwargs):
  """SigLIP with m^3-Mix negatives (Oh et al. 2023, "Geodesic Multi-Modal Mixup for Robust
  Fine-Tuning", Section 4): the mixes m_j = slerp(za_j, zb_j, lam) on the sphere join as
  negatives of every image (side a) row and every text (side b) row of another group:

      loss = 1/2 [L(za, zb; extra M) + L(zb, za; extra M)]
           = L(za, zb) + 1/(2B) sum_i sum_{j: id_j != id_i} [l(za_i, m_j) + l(zb_i, m_j)],

  since SigLIP's in-batch sum is symmetric in (za, zb) (l: the pair's negative term
  -log sigmoid(-z)). Gradients flow through the mixes into both towers, as in the paper.
  Returns (loss, metrics of the first call, with `mixup_lambda`).
  """
  mixes = geodesic_mixup.slerp(za, zb, lam)  # [B, D]
  ids2 = (ids, jnp.concatenate([ids, ids]))  # m_j is no negative of group id_j's rows
  loss_a, metrics = loss_fn(za, zb, extra_negatives=mixes, mask_ids=ids2, **kwargs)
  loss_b, _ = loss_fn(zb, za, extra_negatives=mixes, mask_ids=ids2, **kwargs)
  return 0.5 * (loss_a + loss_b), dict(metrics, mixup_lambda=lam)


def _query_rows(runs, image, text):
  """[B, D]: a mixture's query embeddings in batch order from `image` (the image runs' rows,
  concatenated) and `text` (the text runs'); runs: ((start, stop, is_text), ...)."""
  out, used = [], {False: 0, True: 0}
  for start, stop, is_text in runs:  # the mixture's parts: a few static slices
    source = text if is_text else image
    out.append(source[used[is_text]:used[is_text] + stop - start])
    used[is_text] += stop - start
  return jnp.concatenate(out)


def two_tower(*, model, loss_name, locked=(), block_size=None, mesh=None, collective=None,
              mixup_alpha=0.0, query_runs=None, loss_kwargs=None):
  """CLIP / SigLIP / LiT: za = model's tower a (+ projection), zb = tower b's; the loss takes
  the model's traced temperature (and bias), so they are learned.

  batch: {'a': [B, H, W, C] uint8 images or [B, L] int32 tokens, 'b': [B, L] int32 tokens,
  'id': [B] int group ids (rows sharing one are not negatives: `blockwise.distinct_ids`),
  'truncated': [B] int (texts cut at the context length, summed into the metrics)}, and with
  NegCLIP (config.negclip) 'b_neg': [B, P, L] int32 perturbed texts, 'b_neg_valid': [B, P]
  bool, and with corpus-mined negatives (config.hard_negatives) 'b_hard': [B, K, L],
  'b_hard_valid': [B, K], 'b_hard_id': [B, K], 'b_hard_text': [B, K], 'b_text': [B],
  'b_group_texts': [B, E]: extra negatives of the loss and their masks (`text_negatives`).
  A state with a `static_bank` (config.static_negatives) adds the bank's entries as extra
  negatives (`static_bank.loss`; with it 'b_text', 'b_group_texts', and 'a_item',
  'a_group_items', 'static_b', 'static_a' as the bank's options need).
  A mixture of image and text queries (contrastive/data/mixture.py) adds 'a_text': [B, L]
  int32 and 'a_is_text': [B] bool: za_i = tower b's embedding of a_text_i where a_is_text_i,
  else tower a's of image a_i (with `query_runs` each tower embeds only its rows).

  Args:
    loss_name: 'clip_loss', 'sigmoid_loss' or 'amcl' (AMCL's heads: the model's
      head_count; their temperatures are the model's logit parameters).
    locked: parameter groups without gradient (LiT: e.g. ('tower_a', 'proj_a')); their
      optimizer update is zero as well (`recipes.two_tower_init.optimizer`).
    block_size, mesh, collective: the loss's blockwise path (`mesh`: the ring over devices).
    mixup_alpha: > 0 adds m^3-Mix geodesic negatives with lam ~ Beta(alpha, alpha) drawn per
      step (`geodesic_mixup_loss`; sigmoid_loss, without NegCLIP or mined negatives).
    query_runs: a mixture's batch layout, ((start, stop, is_text), ...) covering [0, B)
      (`mixture.query_runs`: each part's rows are contiguous): each tower then embeds only its
      own rows (static slices), not every row. None: both towers on every row, `a_is_text`
      choosing (any layout; GradCache's micro-batches).
    loss_kwargs: the loss's fixed arguments besides the learned ones (amcl: beta, kappa).
  """
  loss_fn = functools.partial(TWO_TOWER_LOSSES[loss_name], **(loss_kwargs or {}))
  blockwise_args = {} if block_size is None else dict(
      block_size=block_size, mesh=mesh, collective=collective or blockwise.DEFAULT_COLLECTIVE)
  lock = lambda params: {k: jax.lax.stop_gradient(v) if k in locked else v
                         for k, v in params.items()}

  def embed(params, state, rows, rng):
    del rng  # no augmentation or dropout by default: the towers are deterministic
    variables = {'params': lock(params)}
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
    split = 'a_text' in rows and query_runs is not None and query_runs[-1][1] == len(rows['b'])
    pick = lambda x, is_text: jnp.concatenate([x[a:b] for a, b, t in query_runs if t == is_text])
    (za, zb, _), updates = model.apply(variables, pick(rows['a'], False) if split else rows['a'],
                                       rows['b'], train=True, mutable=['batch_stats'])
    stats = updates.get('batch_stats', state.batch_stats)
    # Texts through tower b besides b: a mixture's text queries ([B, 1, L], or only the text
    # rows' with query_runs; mixture.py), NegCLIP's perturbed texts [B, P, L], mined texts
    # [B, K, L]; one call for all.
    texts = {n: rows[n] for n in EXTRA_TEXTS if n in rows}
    if 'a_text' in rows:
      texts['a_text'] = (pick(rows['a_text'], True) if split else rows['a_text'])[:, None]
    if not texts:
      return (za, zb), None, stats
    shapes = [t.shape for t in texts.values()]
    tokens = jnp.concatenate([t.reshape(-1, s[-1]) for t, s in zip(texts.values(), shapes)])
    zext = model.apply({'params': lock(params)}, tokens, train=True, method='encode_b')
    sizes = [s[0] * s[1] for s in shapes]
    parts = jnp.split(zext, np.cumsum(sizes)[:-1])
    extra = {n: p.reshape(*s[:2], -1) for n, p, s in zip(texts, parts, shapes)}
    if 'a_text' in extra:  # each row's query: its text's embedding, or its image's
      za_text = extra.pop('a_text')[:, 0].astype(za.dtype)
      za = (_query_rows(query_runs, za, za_text) if split else
            jnp.where(rows['a_is_text'][:, None], za_text, za))
    return ((za, zb, extra) if extra else (za, zb)), None, stats

  def loss(params, state, embeddings, batch, rng):
    z, _ = embeddings
    logit = model.apply({'params': lock(params)}, method='logit_params')
    bank = getattr(state, 'static_bank', None)  # SPN4CIR's static negatives (static_bank.py)
    if mixup_alpha:
      lam = jax.random.beta(rng, mixup_alpha, mixup_alpha, (), jnp.result_type(z[0], 1.0))
      value, metrics = geodesic_mixup_loss(loss_fn, *z[:2], batch['id'], lam, **logit,
                                           negative_mask=blockwise.distinct_ids,
                                           **blockwise_args)
    elif bank is not None:
      value, metrics = static_bank.loss(loss_fn, z, batch, bank, text_negatives(z, batch),
                                        logit, blockwise_args)
    else:
      value, metrics = loss_fn(*z[:2], **logit, **text_negatives(z, batch), **blockwise_args)
    metrics = dict(metrics, truncated_texts=jnp.sum(batch['truncated']))
    for name in ('temperature', 'bias'):  # AMCL's heads report theirs as temperature/h
      if name in logit:
        metrics[name] = logit[name]
    return value, (metrics, None)

  return Objective(embed, loss)
