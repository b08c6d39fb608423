"""The image-views recipe family: SimCLR, MoCo v2/v3 and the negative samplers.

Two augmented views of each image through one encoder (`objectives.image_views`), the shared
`step.update`. Config fields (configs/simclr_fmnist.py, configs/moco_v2_fmnist.py):

  dataset    name ('fashion_mnist_idx' or a tfds name), data_dir, idx_dir
  model      the encoder (ResNet preset or stages, pool; or `encoder`: a ViT tower config) and
             its projection head; remat
  loss       a pair loss of the registry (contrastive/losses/registry.py): name, temperature,
             block_size, collective
  augment    SimCLR's augmentations (contrastive/data/augment.py)
  method     'simclr' (keys: the other view's online embeddings) or 'moco' (keys: the
             momentum encoder's), with momentum.base / momentum.schedule
  queue_size MoCo's memory of past keys (a multiple of the batch)
  samplers   the negative samplers (contrastive/samplers/objective.py); gist_guide: a frozen
             guide from another workdir
  mcl        MCL's stages (contrastive/mcl.py: `clusters` restrict each query's negatives)
  eval       kNN and linear probe on the encoder's features (contrastive/evaluate.py)
"""

import dataclasses
import functools
import os
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from contrastive import checkpoint
from contrastive import config_lib
from contrastive import evaluate
from contrastive import fewshot
from contrastive import objectives
from contrastive import optim
from contrastive import parallel
from contrastive import step as step_lib
from contrastive.data import pipeline
from contrastive.losses import check_loss_config
from contrastive.losses import pair_loss_from_config
from contrastive.models import build_model
from contrastive.models import PRESETS
from contrastive.models import two_tower
from contrastive.models.resnet import BLOCKS
from contrastive.models.resnet import POOLS
from contrastive.recipes import base
from contrastive.samplers import dyce as dyce_lib
from contrastive.samplers import guide
from contrastive.samplers import momentum as momentum_lib
from contrastive.samplers.momentum import MOMENTUM_SCHEDULES
from contrastive.samplers.queue import check_queue_size

ConfigError = config_lib.ConfigError
METHODS = ('simclr', 'moco')


@dataclasses.dataclass(frozen=True)
class Settings:
  """The facts of an image-views config, resolved once (`settings`)."""
  config: ml_collections.ConfigDict
  method: str  # 'simclr' | 'moco'
  momentum_base: float  # 0: no momentum encoder
  momentum_schedule: str
  queue_size: int
  guide_workdir: str  # GIST's frozen guide ('' : none)
  uses_samplers: bool  # anything beyond plain SimCLR: the step's `objectives.Method`
  common: base.Common  # dtypes, remat, GradCache, the non-finite guard


def uses_samplers(config):
  """True unless the config is plain SimCLR: no momentum encoder, queue or sampler."""
  return bool(config.get('method', 'simclr') != 'simclr' or config.get('queue_size') or
              config.get('momentum', {}).get('base', 0.0) or active_samplers(config))


def active_samplers(config):
  """True if a negative sampler of config.samplers is on."""
  s = config.get('samplers')
  return bool(s is not None and (s.threshold < 1.0 or s.gist or s.mining_k or s.mochi.num_hard or
                                 s.pos_alpha > 0 or s.neg_mix > 0 or s.histograms or
                                 dyce_size(config)))


def dyce_size(config):
  """config.samplers.dyce.size: BECLR's memory slots (0: off)."""
  return ((config.get('samplers') or {}).get('dyce') or {}).get('size', 0)


def settings(config):
  momentum = config.get('momentum', {})
  return Settings(
      config=config, method=config.get('method', 'simclr'),
      momentum_base=momentum.get('base', 0.0),
      momentum_schedule=momentum.get('schedule', 'constant'),
      queue_size=config.get('queue_size', 0), guide_workdir=guide_workdir(config),
      uses_samplers=uses_samplers(config), common=base.common(config))


def validate(config):
  """Raises ConfigError naming the field; MissingDatasetError for absent data files."""
  try:
    check_loss_config(config.loss)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  clusters = config.loss.get('num_clusters')
  if clusters is not None and clusters > config.batch_size:
    raise ConfigError(f'config.loss.num_clusters={clusters} must be <= config.batch_size='
                      f'{config.batch_size}: at most one meta-node per key.')
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
  _check_heads(config)
  try:
    fewshot.settings(config.eval.get('fewshot'))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.get('dtype', 'float32') == 'bfloat16' and uses_samplers(config):
    raise ConfigError('config.dtype=\'bfloat16\' is not implemented with a momentum encoder, '
                      'queue or negative samplers (their mixing and masks are float32 code): '
                      'use config.dtype=\'float32\' for them.')
  pipeline.check_dataset(config.dataset)


def _check_heads(config):
  """AMCL's heads (model.head_count > 1) and its loss go together (on plain SimCLR:
  `validate_method` keeps the momentum encoder, queue and samplers on InfoNCE)."""
  count, amcl = config.model.get('head_count', 1), config.loss.name == 'amcl'
  if not isinstance(count, int) or count < 1:
    raise ConfigError(f'config.model.head_count={count!r} must be an int >= 1.')
  if amcl != (count > 1):
    raise ConfigError(f'config.loss.name={config.loss.name!r} with config.model.head_count='
                      f'{count}: the amcl loss takes H >= 2 heads and only it uses them; set '
                      'both (e.g. --config.loss.name=amcl --config.model.head_count=4) or '
                      'neither.')
  tau = config.model.get('head_temperature', 0.1)
  if amcl and not 1e-5 < tau < 2.0:
    raise ConfigError(f'config.model.head_temperature={tau} must lie in (1e-05, 2.0).')


def validate_method(config):
  """Checks the momentum encoder, queue, samplers and MCL fields (absent: plain SimCLR)."""
  method = config.get('method', 'simclr')
  if method not in METHODS:
    raise ConfigError(f'config.method={method!r} is unknown; choose one of {METHODS}.')
  momentum = config.get('momentum', {})
  base_m = momentum.get('base', 0.0)
  if not 0 <= base_m < 1:
    raise ConfigError(f'config.momentum.base={base_m} must be in [0, 1) (MoCo: 0.99-0.999).')
  if momentum.get('schedule', 'constant') not in MOMENTUM_SCHEDULES:
    raise ConfigError(f'config.momentum.schedule={momentum.schedule!r} is unknown; choose one '
                      f'of {MOMENTUM_SCHEDULES}.')
  if method == 'moco' and not base_m:
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
  _check_guide(config)
  if samplers.gist and not base_m and not guide_workdir(config):
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
  stages = config.get('mcl', {}).get('stages', 1)
  beyond_simclr = uses_samplers(config) or stages > 1
  amcl = config.loss.name == 'amcl'  # AMCL's heads: the momentum encoder and queue only
  if beyond_simclr and config.loss.name != 'info_nce' and not (
      amcl and stages == 1 and not active_samplers(config)):
    raise ConfigError(f'config.loss.name={config.loss.name!r}: the momentum encoder, queue, '
                      'samplers and MCL act on InfoNCE (AMCL\'s heads: the momentum encoder '
                      'and queue only); set config.loss.name=\'info_nce\'.')
  if beyond_simclr and config.loss.get('collective') is not None:
    raise ConfigError('config.loss.collective: the MoCo / sampler / MCL step runs its blockwise '
                      'loss as one tiled scan partitioned by XLA, with no collective to choose; '
                      'unset it.')
  _check_dyce(config)
  if stages > 1 and config.mcl.num_clusters < 2:
    raise ConfigError(f'config.mcl.num_clusters={config.mcl.num_clusters} must be >= 2.')


def _check_dyce(config):
  """BECLR's memory: sizes (`dyce.check_args`), positive epsilon, momentum in [0, 1)."""
  if not dyce_size(config):
    return
  d = config.samplers.dyce
  try:
    dyce_lib.check_args(d.size, d.num_clusters, d.topk, config.batch_size)
  except ValueError as e:
    raise ConfigError(f'config.samplers.dyce: {e}') from None
  if not d.epsilon > 0 or not 0 <= d.momentum < 1 or d.sinkhorn_iterations < 1:
    raise ConfigError(f'config.samplers.dyce: epsilon={d.epsilon} must be > 0, momentum='
                      f'{d.momentum} in [0, 1) and sinkhorn_iterations='
                      f'{d.sinkhorn_iterations} >= 1.')
  if d.kmeans_iters < 0 or d.start_epoch < 0:
    raise ConfigError(f'config.samplers.dyce: kmeans_iters={d.kmeans_iters} and start_epoch='
                      f'{d.start_epoch} must be >= 0.')


def memory_update(config):
  """fn(dyce, keys, rng) -> dyce with config.samplers.dyce's settings, or None (off)."""
  if not dyce_size(config):
    return None
  d = config.samplers.dyce
  return functools.partial(dyce_lib.update, momentum=d.momentum, epsilon=d.epsilon,
                           sinkhorn_iterations=d.sinkhorn_iterations,
                           kmeans_iters=d.kmeans_iters)


def guide_workdir(config):
  """config.samplers.gist_guide: a workdir whose latest checkpoint is GIST's frozen guide
  ('' : none; contrastive/samplers/guide.py)."""
  return (config.get('samplers') or {}).get('gist_guide', '') or ''


def _check_guide(config):
  """Raises ConfigError (one line) for a guide without GIST, beside a momentum encoder, or a
  workdir without checkpoints; before anything is compiled."""
  path = guide_workdir(config)
  if not path:
    return
  if not config.samplers.gist:
    raise ConfigError(f'config.samplers.gist_guide={path!r} is the guide of GIST: set '
                      'config.samplers.gist=True.')
  if config.get('momentum', {}).get('base', 0.0) or config.get('method', 'simclr') != 'simclr':
    raise ConfigError('config.samplers.gist_guide replaces the momentum encoder as GIST\'s guide: '
                      'use method=simclr with config.momentum.base=0.')
  if config.get('queue_size', 0):
    raise ConfigError('config.samplers.gist_guide with config.queue_size: the queue keeps no '
                      'guide embeddings of its entries; use queue_size=0.')
  if not checkpoint.saved_steps(os.path.join(path, 'checkpoints')):
    raise ConfigError(f'config.samplers.gist_guide={path!r} has no checkpoint under '
                      f'{os.path.join(path, "checkpoints")}.')


def method(s, *, steps, steps_per_epoch, clusters=None):
  """The objective's `objectives.Method`, or None for plain SimCLR with config.loss."""
  if not s.uses_samplers and clusters is None:
    return None
  config, momentum = s.config, None
  if s.momentum_base:
    momentum = momentum_lib.momentum_schedule(s.momentum_base, steps, s.momentum_schedule)
  elif s.guide_workdir:  # GIST's guide from a checkpoint: frozen
    momentum = guide.frozen
  amcl = ({k: config.loss[k] for k in ('beta', 'kappa')} if config.loss.name == 'amcl'
          else None)
  return objectives.Method(name=s.method, samplers=config.samplers,
                           temperature=config.loss.get('temperature'), amcl=amcl,
                           symmetric=config.get('symmetric', True), momentum=momentum,
                           steps_per_epoch=steps_per_epoch,
                           block_size=config.loss.get('block_size'),
                           clusters=None if clusters is None else jnp.asarray(clusters, jnp.int32))


def step(s, mesh, image_shape, steps, rng, *, steps_per_epoch=1.0, clusters=None,
         abstract=False):
  """(model, state, jitted step) of an image-views config.

  image_shape: [H, W, C] of the training images. abstract: the state as ShapeDtypeStructs
  with their shardings, nothing allocated (compiling for other devices: contrastive/aot.py).
  """
  config = s.config
  model = build_model(config.model, dtype=s.common.compute_dtype, remat=s.common.remat)
  tx, schedule = optim.build_optimizer(
      ml_collections.ConfigDict(dict(config.optimizer, batch_size=config.batch_size)), steps)
  m = method(s, steps=steps, clusters=clusters, steps_per_epoch=steps_per_epoch)
  make_state = lambda: step_lib.create_train_state(
      model, tx, image_shape, rng, mesh, ema=bool(s.momentum_base or s.guide_workdir),
      queue_size=s.queue_size, batch_size=config.batch_size, dtype=s.common.state_dtype,
      dyce=(config.samplers.dyce.size, config.samplers.dyce.num_clusters)
      if dyce_size(config) else None)
  state = step_lib.abstract_state(make_state, mesh) if abstract else make_state()
  objective = objectives.image_views(
      model=model, aug_cfg=config.augment, method=m,
      loss_fn=pair_loss_from_config(config.loss, mesh=parallel.batch_mesh(mesh)))
  step_fn = step_lib.jit_train_step(mesh, state, objective=objective, tx=tx, schedule=schedule,
                                    nonfinite=s.common.nonfinite,
                                    momentum=m.momentum if m else None,
                                    micro_batch_size=s.common.micro_batch_size,
                                    memory_update=memory_update(config))
  return model, state, step_fn


def train_source(s, workdir):
  del workdir
  return pipeline.get_source(s.config.dataset, 'train')


def parts(s, mesh, source, steps, rng, *, clusters=None):
  """`Parts` of the run; GIST's guide read from its workdir."""
  model, state, step_fn = step(s, mesh, source[0]['image'].shape, steps, rng, clusters=clusters,
                               steps_per_epoch=len(source) / s.config.batch_size)
  if s.guide_workdir:
    state = guide.load_guide(state, s.guide_workdir)
  evaluator = evaluate.Evaluator(s.config.eval, s.config.dataset, model,
                                 parallel.batch_mesh(mesh))
  return base.Parts(state=state, step_fn=step_fn, evaluator=evaluator, model=model)


def loader(s, source, run_parts):
  del run_parts
  return pipeline.train_loader(source, global_batch_size=s.config.batch_size,
                               seed=s.config.seed), None


def tables(s, source, mesh, plan, steps):
  del s, source, mesh, plan, steps
  return []


def abstract_parts(s, mesh, steps, rng):
  """(abstract state, jitted step, abstract global batch); reads one training record."""
  record = pipeline.get_source(s.config.dataset, 'train')[0]
  _, state, step_fn = step(s, mesh, record['image'].shape, steps, rng, abstract=True)
  data, b = parallel.data_sharding(mesh), s.config.batch_size
  batch = {k: jax.ShapeDtypeStruct((b, *np.shape(v)), np.asarray(v).dtype, sharding=data)
           for k, v in record.items()}
  return state, step_fn, batch


class EncoderModel:
  """A trained image-views encoder: `encode_image(images)` -> its features h (before the
  projection head, BatchNorm in inference mode, the center view as in evaluation)."""

  def __init__(self, config, variables, step):
    self.config, self.variables, self.step = config, variables, step
    self.module = build_model(config.model)
    self._embed = jax.jit(functools.partial(evaluate.encoder_features, self.module))

  def encode_image(self, images, *, batch_size=256, normalize=True):
    """uint8 images [N, H, W, C] (the training images' size) -> float32 [N, F], L2-normalised
    unless normalize=False."""
    images = np.asarray(images)
    if images.ndim != 4:
      raise ValueError(f'encode_image takes uint8 images [N, H, W, C], got {images.shape}.')
    out = [np.asarray(self._embed(self.variables, images[i:i + batch_size]), np.float32)
           for i in range(0, len(images), batch_size)]
    feats = np.concatenate(out)
    return feats / np.linalg.norm(feats, axis=1, keepdims=True) if normalize else feats


def load(config, variables, workdir, step_number):
  del workdir
  return EncoderModel(config, variables, step_number)


RECIPE = base.Recipe(name='image_views', validate=validate, settings=settings,
                     train_source=train_source, parts=parts, loader=loader, tables=tables,
                     abstract_parts=abstract_parts, load=load)
