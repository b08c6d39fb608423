"""GradCache (contrastive/grad_cache.py): micro-batched embedding with the global loss gives the
full-batch step; with BatchNorm, exactly the per-micro-batch-statistics objective.

All in float64 (tests/float64.py): the micro-batched paths sum the same gradient terms in
another order, ~1e-14 apart, compared at rtol 1e-9.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from contrastive import grad_cache
from contrastive import objectives
from contrastive import optim
from contrastive import parallel
from contrastive import step as step_lib
from contrastive.losses import nt_xent
from contrastive.models import build_model
from contrastive.recipes import image_views
from tests import float64
from tests import test_two_tower as two_tower_tests
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)


def _two_tower_run(n, micro_batch_size, block_size):
  """`two_tower_tests._run` with GradCache: 2 SigLIP steps on n devices."""
  return two_tower_tests._run(n, loss_params='siglip', block_size=block_size, steps=2,  # pylint: disable=protected-access
                              micro_batch_size=micro_batch_size)


@pytest.fixture(scope='module')
def full_batch():
  return two_tower_tests._run(1, loss_params='siglip', steps=2)  # pylint: disable=protected-access


@pytest.mark.parametrize('n, micro, block_size', [pytest.param(1, 8, None, marks=pytest.mark.slow),
                                                  (8, 16, 4)])
def test_two_tower_equals_full_batch(full_batch, n, micro, block_size):
  """ViT + text towers (no BatchNorm), SigLIP with its learned temperature and bias: 4 or 2
  micro-batches, dense on 1 device or the blockwise ring on 8, equal the full-batch step."""
  _, ref_losses, ref_metrics, ref_state = full_batch
  _, losses, metrics, state = _two_tower_run(n, micro, block_size)
  float64.assert_close(np.array(losses), np.array(ref_losses))
  for m, r in zip(metrics, ref_metrics):
    float64.assert_close(m['l2_grads'], r['l2_grads'])
  # atol as test_two_tower's: Adam amplifies the round-off of exactly-zero gradients.
  float64.assert_close(state.params, ref_state.params, atol=1e-9)
  float64.assert_close(state.opt_state, ref_state.opt_state, atol=1e-9)


def _resnet():
  cfg = ml_collections.ConfigDict(dict(
      model=dict(preset='', stage_sizes=(1,), width=4, block='basic', stem_strides=1,
                 head_hidden_dims=(16,), head_out_dim=8),
      # Crops and flips (per row: fold_in(rng, row number)); no colour ops, to compile fast.
      augment=dict(crop_scale=(0.2, 1.0), flip=True, jitter_prob=0.0, brightness=0.4,
                   contrast=0.4, saturation=0.4, hue=0.1, gray_prob=0.0, blur_prob=0.0)))
  model = build_model(cfg.model)
  tx, _ = optim.build_optimizer(ml_collections.ConfigDict(dict(
      name='sgd', lr=0.1, scale_lr_by_batch=False, warmup_steps=0, weight_decay=0.0,
      momentum=0.9, batch_size=16)), total_steps=4)
  mesh = parallel.make_mesh([('data', -1)], devices=jax.devices()[:1])
  state = step_lib.create_train_state(model, tx, (16, 16, 1), jax.random.key(0), mesh,
                                      dtype=jnp.float64)
  objective = objectives.image_views(model=model, aug_cfg=cfg.augment,
                                     loss_fn=lambda a, b: nt_xent(a, b, temperature=0.2))
  batch = {'image': (np.random.default_rng(0).random((16, 16, 16, 1)) * 255).astype(np.uint8)}
  return objective, state, batch


def test_batchnorm_is_per_micro_batch():
  """With BatchNorm, GradCache's objective is the global loss over embeddings each normalised
  by its own micro-batch's statistics: equal to that objective written out (two halves through
  the model separately), value and gradient; and measurably not the full-batch objective."""
  objective, state, batch = _resnet()
  rng = jax.random.key(3)
  (loss, (_, stats, _)), grads = jax.jit(grad_cache.value_and_grad(
      objective, micro_batch_size=8))(state.params, state, batch, rng)

  def per_half(params):
    e1, _, s1 = objective.embed(params, state, objectives.with_index(
        {'image': batch['image'][:8]}, 0, 8), rng)
    e2, _, s2 = objective.embed(params, state.replace(batch_stats=s1), objectives.with_index(
        {'image': batch['image'][8:]}, 8, 8), rng)
    emb = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), e1, e2)
    return objective.loss(params, state, (emb, None), batch, rng)[0], s2

  (ref_loss, ref_stats), ref_grads = jax.jit(jax.value_and_grad(per_half, has_aux=True))(
      state.params)
  float64.assert_close(loss, ref_loss)
  float64.assert_close(grads, ref_grads)
  float64.assert_close(stats, ref_stats)  # the running averages: one update per micro-batch
  full_loss = jax.jit(lambda *args: objective(*args))(state.params, state, batch, rng)[0]
  assert abs(float(full_loss) - float(loss)) > 1e-3  # the full batch's statistics differ


@pytest.mark.slow  # make test-all
def test_one_micro_batch_is_the_full_batch():
  objective, state, batch = _resnet()
  rng = jax.random.key(3)
  (loss, (_, stats, _)), grads = jax.jit(grad_cache.value_and_grad(
      objective, micro_batch_size=16))(state.params, state, batch, rng)
  (ref_loss, (_, ref_stats, _)), ref_grads = jax.jit(jax.value_and_grad(
      objective, has_aux=True))(state.params, state, batch, rng)
  float64.assert_close((loss, grads, stats), (ref_loss, ref_grads, ref_stats))


def test_micro_batch_errors():
  with pytest.raises(ValueError, match='multiple of the 8 devices'):
    grad_cache.check_micro_batch(12, 64, 8)
  with pytest.raises(ValueError, match='divide batch_size=64'):
    grad_cache.check_micro_batch(24, 64, 8)
  grad_cache.check_micro_batch(16, 64, 8)


def _moco_vit_run(micro_batch_size, steps=2):
  """MoCo v2 (momentum encoder, queue of 4 batches) with a ViT encoder and LayerNorm heads
  (no BatchNorm anywhere), float64, through `image_views.step` -> (losses, state)."""
  from configs import moco_v2_fmnist  # pylint: disable=g-import-not-at-top
  config = moco_v2_fmnist.get_config('runlocal')
  config.batch_size, config.queue_size, config.dtype = 16, 64, 'float64'
  config.model.encoder = dict(name='vit', patch=4, width=16, depth=1, heads=2, mlp_dim=32,
                              pool='gap')
  config.model.head_norm = 'layer'
  config.grad_cache = dict(micro_batch_size=micro_batch_size)
  mesh = parallel.make_mesh([('data', -1)], devices=jax.devices()[:2])
  _, state, step = image_views.step(image_views.settings(config), mesh, (8, 8, 1), 10, jax.random.key(0))
  assert not state.batch_stats and state.queue is not None
  rng = np.random.default_rng(0)
  losses = []
  for i in range(steps):
    batch = {'image': (rng.random((16, 8, 8, 1)) * 255).astype(np.uint8),
             'id': np.arange(16 * i, 16 * (i + 1), dtype=np.int32)}
    state, metrics = step(state, jax.device_put(batch, parallel.data_sharding(mesh)),
                          jax.random.key(i))
    losses.append(float(metrics['loss']))
  return losses, jax.device_get(state)


@pytest.mark.slow  # make test-all; CI keeps the suite under 10 min (GradCache = full batch with
# the ring loss on 8 devices, and with BatchNorm, run in CI)
def test_queue_and_momentum_encoder_equal_full_batch():
  """A BatchNorm-free MoCo step with the queue: 4 micro-batches (2 rows per device each) give
  the full-batch losses, parameters, momentum encoder and queue after 2 steps."""
  ref_losses, ref = _moco_vit_run(0)
  losses, state = _moco_vit_run(4)
  float64.assert_close(np.array(losses), np.array(ref_losses))
  float64.assert_close(state.params, ref.params, atol=1e-9)  # atol: as test_two_tower's
  float64.assert_close(state.ema_params, ref.ema_params, atol=1e-9)
  float64.assert_close(state.queue.keys, ref.queue.keys)
