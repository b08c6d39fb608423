"""The two-tower recipe family (CLIP, SigLIP, LiT): config checks, data, model, optimizer.

`train.train_and_evaluate` runs it when `config.family == 'two_tower'`; the step is the shared
`step.update` with `objectives.two_tower`. Config fields (configs/siglip_emoji.py):

  dataset    name ('emoji_cldr' | 'wordnet_gloss' | 'jsonl_pairs'), data_dir, image_size, ...;
             or name 'mixture' with parts, fractions and each part's fields
             (contrastive/data/mixture.py: several datasets in one run)
  tokenizer  vocab_size, context (L, tokens per text incl. EOS), model_type
  model      image/text (or a/b) tower configs, embed_dim, loss_params ('clip' | 'siglip'),
             logit_scale_init, logit_bias_init (contrastive/models/two_tower.py)
  loss       name ('clip_loss' | 'sigmoid_loss'), block_size, collective
  lit        lock: '' | 'a' | 'b' ('image' / 'text' for image-text): that tower and its
             projection get no gradient and no optimizer state (LiT, Zhai et al. 2022)
  model_init workdir: a workdir of this codebase to initialise towers from (its latest
             checkpoint), mapping: 'src:dst,...' parameter groups (e.g. 'encoder:tower_a' takes a
             SimCLR encoder as the image tower)
  optimizer  as the other recipes, plus logit_lr_mult (the temperature/bias learning rate factor)
  batching, negclip, hard_negatives, geodesic_mixup: which rows share a batch, NegCLIP's
             reordered texts, corpus-mined negatives, m^3-Mix negatives (alpha > 0)
             (contrastive/batching/from_config.py, contrastive/negatives/negclip.py,
             contrastive/negatives/corpus_index.py, objectives.geodesic_mixup_loss)
"""

import os

import jax
import ml_collections
import numpy as np
import optax
from contrastive import checkpoint
from contrastive import grad_cache
from contrastive import objectives
from contrastive import optim
from contrastive import parallel
from contrastive import precision
from contrastive import step as step_lib
from contrastive import two_tower_eval
from contrastive.batching import from_config as batching
from contrastive.data import mixture
from contrastive.data import pair_batches
from contrastive.negatives import corpus_index
from contrastive.negatives import negclip
from contrastive.models import two_tower as two_tower_lib

LOSS_OF_PARAMS = {'clip': 'clip_loss', 'siglip': 'sigmoid_loss'}
LOCKS = {'': (), 'a': ('tower_a', 'proj_a'), 'b': ('tower_b', 'proj_b'),
         'image': ('tower_a', 'proj_a'), 'text': ('tower_b', 'proj_b')}


class TwoTowerConfigError(ValueError):
  """A two-tower config field is invalid (re-raised as validate.ConfigError)."""


def model_config(config):
  """config.model with the text towers' vocab_size and context taken from config.tokenizer."""
  model = ml_collections.ConfigDict(config.model.to_dict())
  for side in ('image', 'text', 'a', 'b'):
    tower = model.get(side)
    if tower is not None and tower.get('name') == 'text':
      tower.vocab_size = config.tokenizer.vocab_size
      tower.context = config.tokenizer.context
  return model


def validate(config):
  """Raises TwoTowerConfigError naming the field; MissingDatasetError for absent data."""
  try:
    model = two_tower_lib.build_two_tower(model_config(config))
  except (ValueError, TypeError) as e:
    raise TwoTowerConfigError(f'config.model: {e}') from None
  loss = LOSS_OF_PARAMS[config.model.loss_params]
  if config.loss.name != loss:
    raise TwoTowerConfigError(
        f'config.loss.name={config.loss.name!r} does not go with config.model.loss_params='
        f'{config.model.loss_params!r} (its learned parameters); use {loss!r}.')
  lock = config.get('lit', {}).get('lock', '')
  if lock not in LOCKS:
    raise TwoTowerConfigError(f'config.lit.lock={lock!r}: choose one tower, one of {tuple(LOCKS)}'
                              ' (locking both towers would leave nothing to train).')
  if lock in ('b', 'text') and model.tower_b is None:
    raise TwoTowerConfigError('config.lit.lock: the towers are shared (model.share); lock none.')
  if config.tokenizer.context < 2 or config.tokenizer.vocab_size < 300:
    raise TwoTowerConfigError(
        f'config.tokenizer: context={config.tokenizer.context} must be >= 2 and vocab_size='
        f'{config.tokenizer.vocab_size} >= 300 (256 byte pieces, specials and some words).')
  if mixture.is_mixture(config.dataset):
    try:
      mixture.check(config)
    except ValueError as e:
      raise TwoTowerConfigError(str(e)) from None
  image = config.model.get('image')
  if image is not None and image.get('name') == 'vit':
    patch = image.get('patch') or two_tower_lib.vit.VIT_PRESETS[image.preset]['patch']
    size = mixture.image_size(config.dataset)
    if size is not None and size % patch:
      raise TwoTowerConfigError(f'config.dataset.image_size={size} is not a '
                                f'multiple of the ViT patch size {patch}.')
  try:
    batching.check(config)
  except ValueError as e:
    raise TwoTowerConfigError(str(e)) from None
  try:
    corpus_index.check(config)
  except ValueError as e:
    raise TwoTowerConfigError(str(e)) from None
  num_negatives = negclip.num_negatives(config)
  if num_negatives < 0 or (num_negatives and config.loss.name != 'sigmoid_loss'):
    raise TwoTowerConfigError(
        f'config.negclip.num_negatives={num_negatives}: must be >= 0, and NegCLIP\'s extra '
        f'text negatives need sigmoid_loss (got {config.loss.name!r}).')
  alpha = mixup_alpha(config)
  if alpha < 0 or (alpha and (config.loss.name != 'sigmoid_loss' or num_negatives or
                              corpus_index.num_hard(config))):
    raise TwoTowerConfigError(
        f'config.geodesic_mixup.alpha={alpha}: must be >= 0 (0: off), and m^3-Mix negatives '
        'need sigmoid_loss without negclip or hard_negatives.')
  for _, dataset in mixture.part_configs(config.dataset):
    pair_batches.check_files(dataset)
  init = config.get('model_init', {})
  if init.get('workdir') and not os.path.isdir(os.path.join(init.workdir, 'checkpoints')):
    raise TwoTowerConfigError(f'config.model_init.workdir={init.workdir!r} has no checkpoints/.')


def mixup_alpha(config):
  """config.geodesic_mixup.alpha: m^3-Mix's Beta(alpha, alpha) mixing ratio (0: off)."""
  return float((config.get('geodesic_mixup') or {}).get('alpha', 0.0))


def optimizer(config, params, steps):
  """(tx, schedule): the recipe's optimizer, with LiT's locked groups frozen (no state, zero
  update) and the temperature/bias at `optimizer.logit_lr_mult` times the learning rate."""
  tx, schedule = optim.build_optimizer(
      ml_collections.ConfigDict(dict(config.optimizer, batch_size=config.batch_size)), steps)
  logit_tx = optax.chain(optim.build_optimizer(
      ml_collections.ConfigDict(dict(config.optimizer, batch_size=config.batch_size)), steps)[0],
                         optax.scale(config.optimizer.get('logit_lr_mult', 1.0)))
  locked = LOCKS[config.get('lit', {}).get('lock', '')]
  labels = {k: 'locked' if k in locked else 'logit' if k == 'logit' else 'train' for k in params}
  labels = {k: jax.tree.map(lambda _, l=label: l, params[k]) for k, label in labels.items()}
  return optax.multi_transform({'train': tx, 'logit': logit_tx, 'locked': optax.set_to_zero()},
                               labels), schedule


def parse_mapping(text):
  """'encoder:tower_a,x:y' -> [('encoder', 'tower_a'), ('x', 'y')]."""
  pairs = [p.split(':') for p in text.split(',') if p.strip()]
  if any(len(p) != 2 for p in pairs):
    raise TwoTowerConfigError(f'config.model_init.mapping={text!r}: expected src:dst,... pairs.')
  return [(a.strip(), b.strip()) for a, b in pairs]


def init_from_checkpoint(params, batch_stats, cfg):
  """(params, batch_stats) with the groups of cfg.mapping copied from the latest checkpoint of
  cfg.workdir; raises TwoTowerConfigError if a group is missing or a shape differs."""
  directory = os.path.join(os.path.abspath(cfg.workdir), 'checkpoints')
  steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
  if not steps:
    raise TwoTowerConfigError(f'config.model_init.workdir: no checkpoint in {directory}.')
  saved = checkpoint.read_state(os.path.join(directory, str(steps[-1])))
  params, batch_stats = dict(params), dict(batch_stats)
  for src, dst in parse_mapping(cfg.mapping):
    for name, tree, saved_tree in (('params', params, saved['params']),
                                   ('batch_stats', batch_stats, saved.get('batch_stats') or {})):
      if dst not in tree:
        continue
      if src not in saved_tree:
        raise TwoTowerConfigError(f'config.model_init.mapping: {name} group {src!r} is not in '
                                  f'{directory}/{steps[-1]} (it has {sorted(saved_tree)}).')
      want = jax.tree.map(np.shape, tree[dst])
      got = jax.tree.map(np.shape, saved_tree[src])
      if want != got:
        raise TwoTowerConfigError(f'config.model_init.mapping {src}:{dst}: the {name} shapes of '
                                  f'the checkpoint differ from the model\'s ({got} vs {want}).')
      tree[dst] = jax.tree.map(lambda s, t: np.asarray(s, t.dtype), saved_tree[src], tree[dst])
  print(f'Initialised {parse_mapping(cfg.mapping)} from {directory}/{steps[-1]}.', flush=True)
  return params, batch_stats


def example_inputs(config, pair_spec):
  """Tiny example inputs for model.init: (a, b) of batch 2."""
  tokens = np.zeros((2, config.tokenizer.context), np.int32)
  if pair_spec.a_is_image:
    s = mixture.image_size(config.dataset)
    return np.zeros((2, s, s, 3), np.uint8), tokens
  return tokens, tokens


def train_source(config, workdir):
  """The training split as the step's rows (`pair_batches.TokenizedPairs`; a
  `mixture.MixturePairs` of them for a mixture), with the tokenizer trained on it on the
  first start (saved in the workdir)."""
  datasets = mixture.part_configs(config.dataset)
  raws = [pair_batches.get_source(cfg, 'train') for _, cfg in datasets]
  specs = [pair_batches.spec(cfg, raw) for (_, cfg), raw in zip(datasets, raws)]
  if len(raws) == 1:
    tok = pair_batches.load_or_train_tokenizer(
        workdir, raws[0], specs[0], config.tokenizer,
        dataset_dir=pair_batches.builder(config.dataset).data_dir)
  else:  # a mixture's tokenizer: trained on all its parts' texts, kept in the workdir
    tok = pair_batches.load_or_train_tokenizer(workdir, raws, specs, config.tokenizer)
  rows = [pair_batches.TokenizedPairs(raw, spec, tok, config.tokenizer.context,
                                      negclip=negclip.num_negatives(config),
                                      negclip_seed=config.seed,
                                      with_row=bool(corpus_index.num_hard(config)))
          for raw, spec in zip(raws, specs)]
  if len(rows) == 1:
    return rows[0]
  shapes = {tuple(raw[0][spec.a].shape) for raw, spec in zip(raws, specs) if spec.a_is_image}
  if len(shapes) > 1:
    raise TwoTowerConfigError(f'config.dataset: the image parts\' images differ in shape '
                              f'{sorted(shapes)}; give them one image_size.')
  source = mixture.MixturePairs([name for name, _ in datasets], rows,
                                shapes.pop() if shapes else None)
  if source.mixed and (config.model.get('share') or
                       config.get('lit', {}).get('lock', '') in ('b', 'text')):
    raise TwoTowerConfigError(mixture.MIXED_TOWERS)
  return source


def step(config, mesh, inputs, steps, rng, *, abstract=False, tables=None):
  """(model, state, jitted step) of a two-tower config; `inputs`: `example_inputs`.

  abstract: the state as ShapeDtypeStructs with their shardings, nothing allocated
  (compiling for other devices: contrastive/aot.py). tables: {state field: shape} of the
  loop's int32 tables (`state_tables`), created as -1 and replicated.
  """
  model = two_tower_lib.build_two_tower(model_config(config),
                                        dtype=precision.compute_dtype(config),
                                        remat=precision.remat(config))
  params = jax.eval_shape(lambda r: model.init(r, *inputs, train=False), rng)['params']
  tx, schedule = optimizer(config, params, steps)
  make_state = lambda: step_lib.create_train_state(
      model, tx, None, rng, mesh, inputs=inputs, dtype=precision.state_dtype(config))
  state = step_lib.abstract_state(make_state, mesh) if abstract else make_state()
  repl = parallel.replicated(mesh)
  for field, shape in (tables or {}).items():
    state = state.replace(**{field: jax.ShapeDtypeStruct(shape, np.int32, sharding=repl)
                             if abstract else jax.device_put(np.full(shape, -1, np.int32), repl)})
  block_size = config.loss.get('block_size')
  objective = objectives.two_tower(
      model=model, loss_name=config.loss.name, locked=LOCKS[config.get('lit', {}).get('lock', '')],
      block_size=block_size, mesh=parallel.batch_mesh(mesh) if block_size else None,
      collective=config.loss.get('collective'), mixup_alpha=mixup_alpha(config),
      query_runs=mixture.query_runs(config))
  step_fn = step_lib.jit_train_step(mesh, state, step_fn=step_lib.update, objective=objective,
                                    tx=tx, schedule=schedule,
                                    nonfinite=config.get('nonfinite', 'error'),
                                    micro_batch_size=grad_cache.micro_batch_size(config))
  return model, state, step_fn


def state_tables(config, num_rows):
  """{TrainState field: shape} of the tables the loop refreshes and the checkpoint keeps:
  'mined' [N, K] (config.hard_negatives) and 'composition' [N] / [N, k] (config.batching
  clusters / neighbours)."""
  tables = {}
  if corpus_index.num_hard(config):
    tables['mined'] = (num_rows, corpus_index.num_hard(config))
  cfg = batching.settings(config)
  if cfg['method'] == 'clusters':
    tables['composition'] = (num_rows,)
  elif cfg['method'] == 'neighbours':
    tables['composition'] = (num_rows, int(cfg['num_neighbours']))
  return tables


def parts(config, mesh, source, steps, rng, *, clusters=None):
  """(state, jitted step, evaluator) of a two-tower config; `source` from `train_source`."""
  if clusters is not None:
    raise ValueError('MCL cluster negatives are not implemented for two towers.')
  model, state, step_fn = step(config, mesh, example_inputs(config, source.spec), steps, rng,
                               tables=state_tables(config, len(source)))
  init = config.get('model_init', {})
  if init.get('workdir'):
    params, batch_stats = init_from_checkpoint(jax.device_get(state.params),
                                               jax.device_get(state.batch_stats), init)
    shardings = step_lib.state_shardings(mesh, state)
    state = state.replace(params=jax.device_put(params, shardings.params),
                          batch_stats=jax.device_put(batch_stats, shardings.batch_stats))
  eval_mesh, split = parallel.batch_mesh(mesh), config.eval.get('split', 'test')
  if not mixture.is_mixture(config.dataset):
    test = pair_batches.get_source(config.dataset, split)
    return state, step_fn, two_tower_eval.TwoTowerEvaluator(config, model, eval_mesh, test,
                                                             source.spec, source.tokenizer)
  evaluators = {}
  for (name, dataset), part in zip(mixture.part_configs(config.dataset), source.parts):
    part_config = ml_collections.ConfigDict(dict(config.to_dict(), dataset=dataset.to_dict()))
    a_tower = 'b' if source.mixed and not part.spec.a_is_image else 'a'  # text queries: tower b
    evaluators[name] = two_tower_eval.TwoTowerEvaluator(
        part_config, model, eval_mesh, pair_batches.get_source(dataset, split), part.spec,
        source.tokenizer, a_tower=a_tower)
  return state, step_fn, two_tower_eval.MixtureEvaluator(evaluators)
