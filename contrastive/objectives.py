"""The recipe families' objectives: what `step.update` differentiates.

An objective is fn(params, state, batch, rng) -> (loss, (metrics, batch_stats, keys)):
`batch_stats` are the model's new BatchNorm statistics (the state's own if it has none) and
`keys` the embeddings a memory queue stores (None without a queue). A recipe family is one
objective and one config; the update around it (optimizer, momentum encoder, queue, the
non-finite guard) is shared.

- `image_views`: two augmented views of each image through one encoder: SimCLR (a pair loss
  over the global batch) or, with a `step.Method`, a momentum encoder, queue and negative
  samplers (MoCo v2/v3, contrastive/samplers).
- `two_tower`: side a (images or texts) and side b (texts) through two towers, CLIP's softmax
  or SigLIP's sigmoid loss with the model's learned temperature (and bias).
"""

import jax
import jax.numpy as jnp

from contrastive.data import augment
from contrastive.losses import blockwise
from contrastive.losses import clip_loss
from contrastive.losses import sigmoid_loss
from contrastive.samplers import objective as sampler_objective

TWO_TOWER_LOSSES = {'clip_loss': clip_loss, 'sigmoid_loss': sigmoid_loss}


def _embed(model, params, batch_stats, views, b, predict=True):
  """Both views through the model in one batch -> ([B, D] view 1, [B, D] view 2, BN stats)."""
  (_, z), updates = model.apply({'params': params, 'batch_stats': batch_stats}, views,
                                train=True, mutable=['batch_stats'], predict=predict)
  z = z.reshape(b, 2, -1)
  return z[:, 0], z[:, 1], updates['batch_stats']


def image_views(*, model, loss_fn, aug_cfg, method=None):
  """SimCLR (method=None: loss_fn(z1, z2)) or a `step.Method` (MoCo, samplers).

  batch: {'image': [B, H, W, C] uint8, 'id': [B] int (with a method)}. Each image gives two
  views (augmentations per example: fold_in(rng, example index)), interleaved [2B, ...] so
  each device keeps its own rows and BatchNorm normalises over all 2B views of the global batch.
  """
  def objective(params, state, batch, rng):
    aug_rng, sampler_rng = jax.random.split(rng)
    v1, v2 = augment.two_views(aug_rng if method else rng, batch['image'], aug_cfg)
    b = v1.shape[0]
    views = jnp.stack([v1, v2], axis=1).reshape(2 * b, *v1.shape[1:])
    if method is None:
      z1, z2, batch_stats = _embed(model, params, state.batch_stats, views, b)
      loss, metrics = loss_fn(z1, z2)
      return loss, (metrics, batch_stats, None)
    return _sampled(params, state, batch, views, b, sampler_rng, model=model, method=method)
  return objective


def _sampled(params, state, batch, views, b, rng, *, model, method):
  """Loss with keys from the momentum encoder (MoCo) or the online one (SimCLR), the queue's
  extra negatives and the configured samplers."""
  q1, q2, batch_stats = _embed(model, params, state.batch_stats, views, b)
  g1 = g2 = None
  if state.ema_params is not None:  # BatchNorm in train mode, as MoCo's key encoder
    g1, g2, _ = _embed(model, state.ema_params, state.ema_batch_stats, views, b, predict=False)
    g1, g2 = jax.lax.stop_gradient(g1), jax.lax.stop_gradient(g2)
  k1, k2 = (g1, g2) if method.name == 'moco' else (q1, q2)
  epoch = state.step / method.steps_per_epoch
  loss, metrics = sampler_objective.sampled_loss(
      rng, dict(q1=q1, q2=q2, k1=k1, k2=k2, g1=g1, g2=g2), batch['id'], state.queue,
      cfg=method.samplers, temperature=method.temperature, symmetric=method.symmetric,
      epoch=epoch, block_size=method.block_size, mesh=method.mesh, clusters=method.clusters)
  return loss, (metrics, batch_stats, k2)


def two_tower(*, model, loss_name, locked=(), block_size=None, mesh=None, collective=None):
  """CLIP / SigLIP / LiT: za = model's tower a (+ projection), zb = tower b's; the loss takes
  the model's traced temperature (and bias), so they are learned.

  batch: {'a': [B, H, W, C] uint8 images or [B, L] int32 tokens, 'b': [B, L] int32 tokens,
  'id': [B] int group ids (rows sharing one are not negatives: `blockwise.distinct_ids`),
  'truncated': [B] int (texts cut at the context length, summed into the metrics)}.

  Args:
    loss_name: 'clip_loss' or 'sigmoid_loss'.
    locked: parameter groups without gradient (LiT: e.g. ('tower_a', 'proj_a')); their
      optimizer update is zero as well (`two_tower_recipe.optimizer`).
    block_size, mesh, collective: the loss's blockwise path (`mesh`: the ring over devices).
  """
  loss_fn = TWO_TOWER_LOSSES[loss_name]
  blockwise_args = {} if block_size is None else dict(
      block_size=block_size, mesh=mesh, collective=collective or blockwise.DEFAULT_COLLECTIVE)

  def objective(params, state, batch, rng):
    del rng  # no augmentation or dropout by default: the towers are deterministic
    params = {k: jax.lax.stop_gradient(v) if k in locked else v for k, v in params.items()}
    variables = {'params': params}
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
    (za, zb, logit), updates = model.apply(variables, batch['a'], batch['b'], train=True,
                                           mutable=['batch_stats'])
    loss, metrics = loss_fn(za, zb, **logit, negative_mask=blockwise.distinct_ids,
                            mask_ids=(batch['id'], batch['id']), **blockwise_args)
    metrics = dict(metrics, temperature=logit['temperature'],
                   truncated_texts=jnp.sum(batch['truncated']))
    if 'bias' in logit:
      metrics['bias'] = logit['bias']
    return loss, (metrics, updates.get('batch_stats', state.batch_stats), None)
  return objective
