"""Config checks that run before anything is compiled, each failing with a one-line fix."""

import ml_collections

from contrastive import faults
from contrastive import optim
from contrastive import parallel
from contrastive.data import pipeline
from contrastive.losses import check_loss_config
from contrastive.models import PRESETS
from contrastive.models.resnet import BLOCKS


class ConfigError(ValueError):
  """A config field is invalid; the message names the field and the fix."""


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int, num_processes: int):
  """Raises ConfigError naming the first invalid field, or MissingDatasetError for absent data."""
  try:
    shape = parallel.mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  data_size = shape[parallel.DATA]
  b = config.batch_size
  if b <= 0 or b % data_size:
    raise ConfigError(
        f'config.batch_size={b} is not divisible by the {data_size} devices of the mesh\'s data '
        f'axis; set --config.batch_size to a multiple of {data_size}.')
  if b % num_processes:
    raise ConfigError(f'config.batch_size={b} is not divisible by the {num_processes} processes; '
                      f'set --config.batch_size to a multiple of {num_processes}.')
  if config.eval.batch_size % data_size:
    raise ConfigError(f'config.eval.batch_size={config.eval.batch_size} is not divisible by the '
                      f'{data_size} devices of the data axis; use a multiple of {data_size}.')
  if config.optimizer.name not in optim.OPTIMIZERS:
    raise ConfigError(f'config.optimizer.name={config.optimizer.name!r} is unknown; choose one of '
                      f'{optim.OPTIMIZERS}.')
  if not config.optimizer.lr > 0:
    raise ConfigError(f'config.optimizer.lr={config.optimizer.lr} must be > 0.')
  try:
    check_loss_config(config.loss)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  preset = config.model.get('preset')
  if preset and preset not in PRESETS:
    raise ConfigError(f'config.model.preset={preset!r} is unknown; choose one of {sorted(PRESETS)} '
                      'or None with explicit stage_sizes/width/block.')
  if config.model.get('block') and config.model.block not in BLOCKS:
    raise ConfigError(f'config.model.block={config.model.block!r} is unknown; choose one of '
                      f'{sorted(BLOCKS)}.')
  if config.checkpoint_every <= 0:
    raise ConfigError(f'config.checkpoint_every={config.checkpoint_every} must be > 0.')
  keep = config.get('checkpoint_keep')
  if keep is not None and keep < 1:
    raise ConfigError(f'config.checkpoint_keep={keep} must be >= 1 (or None to keep all): the '
                      'last good checkpoint is never deleted.')
  nonfinite = config.get('nonfinite', 'error')
  if nonfinite not in faults.NONFINITE_MODES:
    raise ConfigError(f'config.nonfinite={nonfinite!r} is unknown; choose one of '
                      f'{faults.NONFINITE_MODES}.')
  pipeline.check_dataset(config.dataset)
