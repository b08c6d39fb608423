"""The two-tower config checks that run before any data is read or anything compiled, each a
`ConfigError` naming the field (`validate`)."""

import math
import os

from contrastive import config_lib
from contrastive import two_tower_eval
from contrastive.batching import from_config as batching
from contrastive.config_lib import ConfigError
from contrastive.data import mixture
from contrastive.data import pair_batches
from contrastive.data import shard_index
from contrastive.data import webdataset
from contrastive.eval_tasks import sources
from contrastive.models import two_tower as two_tower_lib
from contrastive.negatives import corpus_index
from contrastive.negatives import static_bank
from contrastive.recipes import two_tower_augment
from contrastive.recipes import two_tower_init
from contrastive.recipes.two_tower_init import LOCKS
from contrastive.recipes.two_tower_model import model_config

LOSS_OF_PARAMS = {'clip': 'clip_loss', 'siglip': 'sigmoid_loss', 'amcl': 'amcl'}
MIXED_TOWERS = ('config.model.share / config.lit.locked_tower: the text tower (tower b) also embeds '
                'the mixture\'s text queries, so it cannot be shared with the image tower or '
                'locked.')


AMCL_ARGS = {'beta': 0.1, 'kappa': 0.5}  # the loss's fixed arguments, the authors' values


def loss_kwargs(config):
  """The loss's fixed keyword arguments from config.loss (amcl: beta >= 0, kappa > 0)."""
  if config.loss.name != 'amcl':
    return {}
  args = {k: config.loss.get(k, v) for k, v in AMCL_ARGS.items()}
  if not (isinstance(args['beta'], (int, float)) and args['beta'] >= 0 and
          isinstance(args['kappa'], (int, float)) and args['kappa'] > 0):
    raise ConfigError(f"config.loss: amcl needs beta >= 0 and kappa > 0; got beta="
                      f"{args['beta']!r}, kappa={args['kappa']!r}.")
  return args


def mixup_alpha(config):
  """config.geodesic_mixup.alpha: m^3-Mix's Beta(alpha, alpha) mixing ratio (0: off)."""
  return float((config.get('geodesic_mixup') or {}).get('alpha', 0.0))


def hard_negatives(config):
  """config.hard_negatives as a `corpus_index.HardNegatives` (a config without it: off);
  ConfigError for an unknown field."""
  return corpus_index.HardNegatives(
      **config_lib.section(config, 'hard_negatives', corpus_index.DEFAULTS))


def num_negclip(config):
  """config.negclip.num_negatives: NegCLIP's P perturbations per text b as extra negatives
  (0: off; a config without the field: off)."""
  return int((config.get('negclip') or {}).get('num_negatives', 0))


def lit_lock(config):
  """config.lit.locked_tower: '' (none) or the tower LiT locks, a key of LOCKS (`lock`, its
  name in configs and workdirs before: `--config.lit.lock` is a ConfigDict method, which
  the flag parser cannot set)."""
  lit = config.get('lit') or {}
  return lit.get('locked_tower', lit.get('lock', ''))


def check_mixed_towers(config):
  """A mixture of image and text queries embeds its text queries with tower b: raises
  ConfigError if that tower is shared or locked."""
  if config.model.get('share') or 'tower_b' in LOCKS[lit_lock(config)]:
    raise ConfigError(MIXED_TOWERS)


def resolve_pair_towers(config):
  """A JSON-lines dataset's towers follow its file (configs/siglip_pairs.py): for text-text
  records (text_a/text_b) a config with an image tower gets two text towers instead, tower a a
  copy of config.model.text with its own weights (config.model.image and dataset.image_size
  removed); an image-text file needs an image tower (ConfigError). Changes `config` in place,
  before it is checked and saved in the workdir (whose config.json then has the towers that
  ran)."""
  dataset = config.get('dataset') or {}
  if dataset.get('name') != 'jsonl_pairs':
    return
  kind = pair_batches.jsonl_records_of(dataset).kind
  if kind == 'text_text' and config.model.get('image') is not None:
    with config.unlocked():
      config.model.a = config.model.text.to_dict()
      del config.model['image']
      if 'image_size' in config.dataset:
        del config.dataset['image_size']
  elif kind == 'image_text' and config.model.get('image') is None:
    raise ConfigError(f'config.dataset.jsonl_path={dataset.jsonl_path!r} holds image-text pairs '
                      'but config.model has no image tower (model.image): use '
                      'configs/siglip_pairs.py.')


def validate(config):
  """Raises ConfigError naming the field; MissingDatasetError for absent data (and a
  JSON-lines dataset's PairsDataError); resolves a JSON-lines dataset's towers first."""
  resolve_pair_towers(config)
  try:
    model = two_tower_lib.build_two_tower(model_config(config))
  except (ValueError, TypeError) as e:
    raise ConfigError(f'config.model: {e}') from None
  for field in ('logit_scale_init', 'logit_bias_init'):
    value = config.model.get(field)
    if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or
                              (field == 'logit_scale_init' and value <= 0)):
      raise ConfigError(f'config.model.{field}={value!r} must be a finite number'
                        + (' > 0 (the initial scale exp(t))' if field == 'logit_scale_init'
                           else '') + '; None gives the default.')
  loss = LOSS_OF_PARAMS[config.model.loss_params]
  if config.loss.name != loss:
    raise ConfigError(
        f'config.loss.name={config.loss.name!r} does not go with config.model.loss_params='
        f'{config.model.loss_params!r} (its learned parameters); use {loss!r}.')
  loss_kwargs(config)
  lock = lit_lock(config)
  if lock not in LOCKS:
    raise ConfigError(f'config.lit.locked_tower={lock!r}: choose one tower, one of {tuple(LOCKS)}'
                      ' (locking both towers would leave nothing to train).')
  if 'tower_b' in LOCKS[lock] and model.tower_b is None:
    raise ConfigError('config.lit.locked_tower: the towers are shared (model.share); lock none.')
  if config.tokenizer.context < 2 or config.tokenizer.vocab_size < 300:
    raise ConfigError(
        f'config.tokenizer: context={config.tokenizer.context} must be >= 2 and vocab_size='
        f'{config.tokenizer.vocab_size} >= 300 (256 byte pieces, specials and some words).')
  if mixture.is_mixture(config.dataset):
    mixture.check(config.dataset, batch_size=config.batch_size,
                  total_steps=config.get('total_steps'))
    if mixture.mixed_queries(config.dataset):
      check_mixed_towers(config)
  image = config.model.get('image')
  if image is not None and image.get('name') == 'vit':
    patch = image.get('patch') or two_tower_lib.vit.VIT_PRESETS[image.preset]['patch']
    size = mixture.image_size(config.dataset)
    if size is not None and size % patch:
      raise ConfigError(f'config.dataset.image_size={size} is not a '
                        f'multiple of the ViT patch size {patch}.')
  batching.check(config)
  two_tower_augment.settings(config)
  hard = hard_negatives(config)
  corpus_index.check(hard, config.loss.name)
  _check_extra_negatives(config, hard.num_hard)
  static_bank.check(static_bank.settings(config), config)
  if config.dataset.get('name') == 'webdataset':
    _check_shards(config, hard.num_hard)
  else:
    one = not mixture.is_mixture(config.dataset)  # a mixture's parts share the batch
    for _, dataset in mixture.part_configs(config.dataset):
      pair_batches.check_files(dataset, batch_size=config.batch_size if one else None,
                               eval_split=config.eval.get('split', 'test'))
  try:  # the standard benchmarks of config.eval.tasks: their data, before anything compiles
    two_tower_eval.standard_tasks(config.eval)
  except sources.EvalDataError as e:
    raise ConfigError(f'config.eval.tasks: {e}') from None
  init = config.get('model_init', {})
  if init.get('workdir') and not os.path.isdir(os.path.join(init.workdir, 'checkpoints')):
    raise ConfigError(f'config.model_init.workdir={init.workdir!r} has no checkpoints/.')
  groups = ('tower_a', 'proj_a', 'logit') + (('tower_b', 'proj_b') if model.tower_b else ())
  two_tower_init.check_init(config, groups, LOCKS[lock])


def _check_extra_negatives(config, num_hard):
  """NegCLIP's texts and m^3-Mix's mixtures join the sigmoid loss as extra negatives."""
  num_negatives = num_negclip(config)
  if num_negatives < 0 or (num_negatives and config.loss.name != 'sigmoid_loss'):
    raise ConfigError(
        f'config.negclip.num_negatives={num_negatives}: must be >= 0, and NegCLIP\'s extra '
        f'text negatives need sigmoid_loss (got {config.loss.name!r}).')
  alpha = mixup_alpha(config)
  if alpha < 0 or (alpha and (config.loss.name != 'sigmoid_loss' or num_negatives or num_hard)):
    raise ConfigError(
        f'config.geodesic_mixup.alpha={alpha}: must be >= 0 (0: off), and m^3-Mix negatives '
        'need sigmoid_loss without negclip or hard_negatives.')


def _check_shards(config, num_hard):
  """webdataset: its fields, and its shard patterns resolved to readable files (each missing
  or unreadable shard named; no pattern: only compiling, the run itself refuses it); the batch
  methods that read every row's image are refused."""
  cfg = webdataset.settings(config.dataset)
  if batching.composed(config) or num_hard or num_negclip(config):
    raise ConfigError('config.batching / hard_negatives / negclip: webdataset shards are read '
                      'in a random shuffle only (the other methods embed or parse every row).')
  webdataset.class_names(cfg)
  if not cfg['train_shards']:  # compiling only (contrastive.aot); training says it's missing
    return
  shard_index.expand(cfg['train_shards'])
  if not cfg['eval_shards']:
    raise ConfigError('config.dataset.eval_shards: give the held-out shards (a pattern, a list '
                      'or a file of paths) that retrieval is evaluated on.')
  shard_index.expand(cfg['eval_shards'])
