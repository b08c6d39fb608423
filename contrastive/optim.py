"""Optimizers and learning-rate schedules from optax, chosen by config."""

import jax
import optax

OPTIMIZERS = ('lars', 'adamw', 'sgd')


def learning_rate_schedule(cfg, total_steps):
  """Linear warmup to the peak rate, then cosine decay to 0 (SimCLR, Chen et al. 2020).

  The peak is cfg.lr * global_batch_size / 256 (the linear scaling rule) when
  cfg.scale_lr_by_batch is set, else cfg.lr.
  """
  peak = cfg.lr * (cfg.batch_size / 256 if cfg.scale_lr_by_batch else 1.0)
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=0.0)


def decay_mask(params):
  """True for kernels (ndim > 1); False for biases and BatchNorm scales/offsets."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def build_optimizer(cfg, total_steps):
  """An optax GradientTransformation for config cfg (fields: name, lr, weight_decay, momentum, ...).

  lars: optax.lars (You et al. 2017), the SimCLR choice; weight decay and trust-ratio
  adaptation both skip biases and norm parameters, as in SimCLR.
  adamw: optax.adamw (Loshchilov & Hutter 2019) with decoupled decay on kernels only.
  sgd: momentum SGD with (coupled) weight decay on kernels only.

  Returns:
    (optimizer, schedule) where schedule(step) is the learning rate.
  """
  schedule = learning_rate_schedule(cfg, total_steps)
  if cfg.name == 'lars':
    tx = optax.lars(schedule, weight_decay=cfg.weight_decay, weight_decay_mask=decay_mask,
                    trust_ratio_mask=decay_mask, momentum=cfg.momentum)
  elif cfg.name == 'adamw':
    tx = optax.adamw(schedule, b1=cfg.get('b1', 0.9), b2=cfg.get('b2', 0.999),
                     weight_decay=cfg.weight_decay, mask=decay_mask)
  elif cfg.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
                     optax.sgd(schedule, momentum=cfg.momentum))
  else:
    raise ValueError(f'config.optimizer.name={cfg.name!r} is unknown; choose one of {OPTIMIZERS}.')
  if cfg.get('grad_clip_norm'):
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx, schedule
