"""The momentum (EMA) encoder: its update and the momentum schedule (MoCo, BYOL, MoCo v3)."""

import optax

MOMENTUM_SCHEDULES = ('constant', 'cosine')


def momentum_schedule(base, total_steps, schedule='constant'):
  """m(t): the EMA momentum at step t.

  constant: m(t) = base (MoCo v1/v2: 0.999).
  cosine:   m(t) = 1 - (1 - base) (cos(pi t / T) + 1) / 2, rising from base to 1 at the last
            step T (BYOL, Grill et al. 2020, section 3.2; MoCo v3, Chen et al. 2021).

  Args:
    base: m(0) in [0, 1).
    total_steps: T.
    schedule: one of MOMENTUM_SCHEDULES.

  Returns:
    An optax-style schedule fn(step) -> momentum.
  """
  if not 0 <= base < 1:
    raise ValueError(f'The EMA momentum must be in [0, 1), got {base}.')
  if schedule == 'constant':
    return optax.constant_schedule(base)
  if schedule == 'cosine':
    gap = optax.cosine_decay_schedule(1.0 - base, max(int(total_steps), 1))
    return lambda step: 1.0 - gap(step)
  raise ValueError(f'Momentum schedule {schedule!r} is unknown; choose one of '
                   f'{MOMENTUM_SCHEDULES}.')


def ema_update(target, online, momentum):
  """target <- momentum * target + (1 - momentum) * online, leaf by leaf (any pytree).

  MoCo eq. 2: theta_k <- m theta_k + (1 - m) theta_q.
  """
  return optax.incremental_update(online, target, 1.0 - momentum)
