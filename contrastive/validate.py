"""Config checks that run before anything is compiled, each failing with a one-line fix."""

import ml_collections

from contrastive import faults
from contrastive import optim
from contrastive import parallel
from contrastive.data import pipeline
from contrastive.losses import check_loss_config
from contrastive.models import PRESETS
from contrastive.models.resnet import BLOCKS
from contrastive.samplers.momentum import MOMENTUM_SCHEDULES
from contrastive.samplers.queue import check_queue_size


DTYPES = ('float32', 'float64')


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
  if config.get('dtype', 'float32') not in DTYPES:
    raise ConfigError(f'config.dtype={config.get("dtype")!r} is unknown; choose one of {DTYPES}.')
  nonfinite = config.get('nonfinite', 'error')
  if nonfinite not in faults.NONFINITE_MODES:
    raise ConfigError(f'config.nonfinite={nonfinite!r} is unknown; choose one of '
                      f'{faults.NONFINITE_MODES}.')
  validate_method(config)
  pipeline.check_dataset(config.dataset)


METHODS = ('simclr', 'moco')


def uses_samplers(config):
  """True unless the config is plain SimCLR: no momentum encoder, queue or sampler."""
  s = config.get('samplers')
  active = s is not None and (s.threshold < 1.0 or s.gist or s.mining_k or s.mochi.num_hard or
                              s.pos_alpha > 0 or s.neg_mix > 0 or s.histograms)
  return bool(config.get('method', 'simclr') != 'simclr' or config.get('queue_size') or
              momentum_base(config) or active)


def momentum_base(config):
  return config.get('momentum', {}).get('base', 0.0)


def validate_method(config):
  """Checks the momentum encoder, queue, samplers and MCL fields (absent: plain SimCLR)."""
  method = config.get('method', 'simclr')
  if method not in METHODS:
    raise ConfigError(f'config.method={method!r} is unknown; choose one of {METHODS}.')
  momentum = config.get('momentum', {})
  base = momentum.get('base', 0.0)
  if not 0 <= base < 1:
    raise ConfigError(f'config.momentum.base={base} must be in [0, 1) (MoCo: 0.99-0.999).')
  if momentum.get('schedule', 'constant') not in MOMENTUM_SCHEDULES:
    raise ConfigError(f'config.momentum.schedule={momentum.schedule!r} is unknown; choose one '
                      f'of {MOMENTUM_SCHEDULES}.')
  if method == 'moco' and not base:
    raise ConfigError('config.method=\'moco\' takes its keys from a momentum encoder: set '
                      'config.momentum.base > 0 (e.g. 0.99).')
  queue_size = config.get('queue_size', 0)
  if queue_size:
    try:
      check_queue_size(queue_size, config.batch_size)
    except ValueError as e:
      raise ConfigError(f'config.queue_size: {e}') from None
  samplers = config.get('samplers')
  if samplers is None:
    return
  if samplers.gist and not base:
    raise ConfigError('config.samplers.gist needs a guide: the momentum encoder; set '
                      'config.momentum.base > 0 (e.g. 0.99).')
  for field in ('mining_k', 'mining_skip_top', 'neg_mix'):
    if samplers[field] < 0:
      raise ConfigError(f'config.samplers.{field}={samplers[field]} must be >= 0.')
  mochi = samplers.mochi
  if mochi.num_hard and (mochi.num_hard < 2 or mochi.num_mix + mochi.num_query_mix < 1):
    raise ConfigError(f'config.samplers.mochi: num_hard={mochi.num_hard} must be >= 2 and '
                      'num_mix + num_query_mix >= 1 (or num_hard=0: off).')
  if (uses_samplers(config) or config.get('mcl', {}).get('stages', 1) > 1) and (
      config.loss.name != 'info_nce'):
    raise ConfigError(f'config.loss.name={config.loss.name!r}: the momentum encoder, queue, '
                      'samplers and MCL act on InfoNCE; set config.loss.name=\'info_nce\'.')
  stages = config.get('mcl', {}).get('stages', 1)
  if (uses_samplers(config) or stages > 1) and config.loss.get('collective') is not None:
    raise ConfigError('config.loss.collective: the MoCo / sampler / MCL step runs its blockwise '
                      'loss as one tiled scan partitioned by XLA, with no collective to choose; '
                      'unset it.')
  if stages > 1 and config.mcl.num_clusters < 2:
    raise ConfigError(f'config.mcl.num_clusters={config.mcl.num_clusters} must be >= 2.')
