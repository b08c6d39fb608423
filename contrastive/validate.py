"""Config checks that run before anything is compiled, each failing with a one-line fix."""

import ml_collections

from contrastive import faults
from contrastive import grad_cache
from contrastive import optim
from contrastive import parallel
from contrastive import precision
from contrastive import two_tower_recipe
from contrastive.data import pipeline
from contrastive.losses import check_compute_dtype
from contrastive.losses import check_loss_config
from contrastive.models import PRESETS
from contrastive.models.compute import REMAT_POLICIES
from contrastive.models import two_tower
from contrastive.models.resnet import BLOCKS
from contrastive.models.resnet import POOLS
from contrastive.samplers import guide
from contrastive.samplers.momentum import MOMENTUM_SCHEDULES
from contrastive.samplers.queue import check_queue_size


DTYPES = precision.DTYPES
# Recipe families: 'image_views' (SimCLR, MoCo; contrastive/step.py) and 'two_tower' (CLIP,
# SigLIP, LiT; contrastive/two_tower_recipe.py).
FAMILIES = ('image_views', 'two_tower')


class ConfigError(ValueError):
  """A config field is invalid; the message names the field and the fix."""


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int, num_processes: int):
  """Raises ConfigError naming the first invalid field, or MissingDatasetError for absent data."""
  try:
    shape = parallel.mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  data_size = parallel.batch_size_divisor(shape)
  b = config.batch_size
  if b <= 0 or b % data_size:
    raise ConfigError(
        f'config.batch_size={b} is not divisible by the {data_size} devices the mesh splits the '
        f'batch over ({shape}); set --config.batch_size to a multiple of {data_size}.')
  if b % num_processes:
    raise ConfigError(f'config.batch_size={b} is not divisible by the {num_processes} processes; '
                      f'set --config.batch_size to a multiple of {num_processes}.')
  if config.eval.batch_size % data_size:
    raise ConfigError(f'config.eval.batch_size={config.eval.batch_size} is not divisible by the '
                      f'{data_size} devices of the batch axes; use a multiple of {data_size}.')
  micro = grad_cache.micro_batch_size(config)
  if micro:
    try:
      grad_cache.check_micro_batch(micro, b, data_size)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  if config.optimizer.name not in optim.OPTIMIZERS:
    raise ConfigError(f'config.optimizer.name={config.optimizer.name!r} is unknown; choose one of '
                      f'{optim.OPTIMIZERS}.')
  if not config.optimizer.lr > 0:
    raise ConfigError(f'config.optimizer.lr={config.optimizer.lr} must be > 0.')
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
  validate_numbers(config)
  family = config.get('family', 'image_views')
  if family not in FAMILIES:
    raise ConfigError(f'config.family={family!r} is unknown; choose one of {FAMILIES}.')
  if family == 'two_tower':
    try:
      two_tower_recipe.validate(config)
    except two_tower_recipe.TwoTowerConfigError as e:
      raise ConfigError(str(e)) from None
    validate_precision(config)
    return
  try:
    check_loss_config(config.loss)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.model.get('encoder'):
    try:
      two_tower.build_tower(config.model.encoder)
    except (ValueError, TypeError) as e:
      raise ConfigError(f'config.model.encoder: {e}') from None
  preset = config.model.get('preset')
  if preset and preset not in PRESETS:
    raise ConfigError(f'config.model.preset={preset!r} is unknown; choose one of {sorted(PRESETS)} '
                      'or None with explicit stage_sizes/width/block.')
  if config.model.get('block') and config.model.block not in BLOCKS:
    raise ConfigError(f'config.model.block={config.model.block!r} is unknown; choose one of '
                      f'{sorted(BLOCKS)}.')
  if config.model.get('pool', 'avg') not in POOLS:
    raise ConfigError(f'config.model.pool={config.model.pool!r} is unknown; choose one of '
                      f'{list(POOLS)}.')
  validate_method(config)
  validate_precision(config)
  pipeline.check_dataset(config.dataset)


def validate_precision(config):
  """config.dtype='bfloat16' with a loss path that takes bfloat16 embeddings, and
  config.model.remat a known policy."""
  remat = precision.remat(config)
  if remat and remat not in REMAT_POLICIES:
    raise ConfigError(f'config.model.remat={remat!r} is unknown; choose one of '
                      f'{sorted(REMAT_POLICIES)} or \'\' (none).')
  if config.get('dtype', 'float32') != 'bfloat16':
    return
  if uses_samplers(config):
    raise ConfigError('config.dtype=\'bfloat16\' is not implemented with a momentum encoder, '
                      'queue or negative samplers (their mixing and masks are float32 code): '
                      'use config.dtype=\'float32\' for them.')
  try:
    check_compute_dtype(config.loss.name, 'bfloat16', block_size=config.loss.get('block_size'))
  except ValueError as e:
    raise ConfigError(f'config.dtype=\'bfloat16\': {e}') from None


# (dotted field, test, requirement): each numeric field of the configs and what it must be.
# Fields a config does not have are skipped.
_positive = (lambda v: v > 0, 'be > 0')
_non_negative = (lambda v: v >= 0, 'be >= 0')
_at_least_1 = (lambda v: v >= 1, 'be >= 1')
_probability = (lambda v: 0 <= v <= 1, 'be in [0, 1]')
NUMERIC_FIELDS = (
    ('seed', _non_negative), ('total_steps', _non_negative), ('log_every', _at_least_1),
    ('max_consecutive_skips', _at_least_1),
    ('augment.jitter_prob', _probability), ('augment.gray_prob', _probability),
    ('augment.blur_prob', _probability), ('augment.brightness', _non_negative),
    ('augment.contrast', _non_negative), ('augment.saturation', _non_negative),
    ('augment.hue', (lambda v: 0 <= v <= 0.5, 'be in [0, 0.5]')),
    ('augment.crop_scale', (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
                            'be (min, max) with 0 < min <= max <= 1')),
    ('model.stem_strides', _at_least_1), ('model.head_out_dim', _at_least_1),
    ('model.head_hidden_dims', (lambda v: all(d >= 1 for d in v), 'hold sizes >= 1')),
    ('model.stage_sizes', (lambda v: all(d >= 1 for d in v), 'hold block counts >= 1')),
    ('optimizer.warmup_steps', _non_negative), ('optimizer.weight_decay', _non_negative),
    ('optimizer.momentum', (lambda v: 0 <= v < 1, 'be in [0, 1)')),
    ('optimizer.grad_clip_norm', _non_negative),
    ('eval.every', _non_negative), ('eval.batch_size', _positive), ('eval.knn_k', _at_least_1),
    ('eval.knn_temperature', _positive), ('eval.linear_steps', _non_negative),
    ('eval.linear_lr', _positive), ('eval.linear_l2', _non_negative),
    ('eval.max_train_examples', _non_negative), ('eval.max_test_examples', _non_negative),
    ('queue_size', _non_negative), ('mcl.stages', _at_least_1),
    ('mcl.kmeans_iters', _at_least_1),
    ('samplers.threshold', (lambda v: -1 <= v <= 1, 'be a cosine in [-1, 1] (1: off)')),
    ('samplers.pos_alpha', _non_negative), ('samplers.neg_mix_alpha', _positive),
    ('samplers.gist_margin', _non_negative), ('samplers.mochi.num_mix', _non_negative),
    ('samplers.mochi.num_query_mix', _non_negative),
    ('samplers.mochi.start_epoch', _non_negative),
    # The two-tower family's (contrastive/two_tower_recipe.py).
    ('dataset.image_size', _at_least_1), ('dataset.max_examples', _non_negative),
    ('optimizer.logit_lr_mult', _positive), ('eval.block_size', _at_least_1),
    ('eval.ks', (lambda v: len(v) > 0 and all(k >= 1 for k in v), 'hold ranks k >= 1')),
)


def _lookup(config, path):
  node = config
  for key in path.split('.'):
    if not hasattr(node, 'get') or key not in node:
      return None
    node = node[key]
  return node


def validate_numbers(config):
  """Checks every numeric field of NUMERIC_FIELDS, and that the run has a length."""
  for path, (ok, requirement) in NUMERIC_FIELDS:
    value = _lookup(config, path)
    if value is not None and not ok(value):
      raise ConfigError(f'config.{path}={value!r} must {requirement}.')
  if not config.get('total_steps') and not config.get('num_epochs', 0) > 0:
    raise ConfigError(f'config.num_epochs={config.get("num_epochs")!r} must be > 0 (or set '
                      'config.total_steps > 0): the run would have no steps.')
  if config.model.get('preset') in ('', None) and not config.model.get('width', 1) > 0:
    raise ConfigError(f'config.model.width={config.model.get("width")!r} must be > 0.')


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
  try:
    guide.check(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if samplers.gist and not base and not guide.guide_workdir(config):
    raise ConfigError('config.samplers.gist needs a guide: the momentum encoder (set '
                      'config.momentum.base > 0, e.g. 0.99) or a checkpoint '
                      '(config.samplers.gist_guide).')
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
