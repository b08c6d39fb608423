"""Losses selectable by name from a config: `config.loss = {'name': ..., **kwargs}`."""

import functools

from contrastive.losses.nt_xent import nt_xent

# Two-view losses for the SimCLR recipe: fn(z1 [B, D], z2 [B, D], **kwargs) -> (loss, metrics).
PAIR_LOSSES = {
    'nt_xent': nt_xent,
}


def check_loss_config(cfg):
  """Raises ValueError for an unknown loss name or a non-positive temperature."""
  if cfg.name not in PAIR_LOSSES:
    raise ValueError(f'config.loss.name={cfg.name!r} is unknown; choose one of {sorted(PAIR_LOSSES)}.')
  temperature = cfg.get('temperature')
  if temperature is not None and not temperature > 0:
    raise ValueError(f'config.loss.temperature={temperature} must be > 0 (e.g. 0.1-0.5).')


def pair_loss_from_config(cfg):
  """fn(z1, z2) -> (loss, metrics) with the config's keyword arguments bound."""
  check_loss_config(cfg)
  kwargs = {k: v for k, v in cfg.items() if k != 'name'}
  return functools.partial(PAIR_LOSSES[cfg.name], **kwargs)
