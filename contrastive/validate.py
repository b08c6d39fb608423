"""Config checks that run before anything is compiled, each failing with a one-line fix: the
fields every recipe shares here, then the recipe's own (`recipes.get(config).validate`)."""

import ml_collections

from contrastive import faults
from contrastive import grad_cache
from contrastive import optim
from contrastive import parallel
from contrastive import precision
from contrastive import recipes
from contrastive.config_lib import ConfigError
from contrastive.losses import check_compute_dtype
from contrastive.models.compute import REMAT_POLICIES
from contrastive.recipes import base

DTYPES = precision.DTYPES


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
  shared = base.common(config)
  micro = shared.micro_batch_size
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
  if shared.nonfinite not in faults.NONFINITE_MODES:
    raise ConfigError(f'config.nonfinite={shared.nonfinite!r} is unknown; choose one of '
                      f'{faults.NONFINITE_MODES}.')
  validate_numbers(config)
  recipes.get(config).validate(config)
  validate_precision(config, shared)


def validate_precision(config, shared):
  """config.dtype='bfloat16' with a loss path that takes bfloat16 embeddings, and
  config.model.remat a known policy."""
  remat = shared.remat
  if remat and remat not in REMAT_POLICIES:
    raise ConfigError(f'config.model.remat={remat!r} is unknown; choose one of '
                      f'{sorted(REMAT_POLICIES)} or \'\' (none).')
  if shared.dtype != 'bfloat16':
    return
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
    # The two-tower family's (contrastive/recipes/two_tower.py).
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
