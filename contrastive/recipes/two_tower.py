"""The two-tower recipe family (CLIP, SigLIP, LiT): config checks, data, model, optimizer, the
tables the loop refreshes, and the trained model for inference.

The step is the shared `step.update` with `objectives.two_tower`. Config fields
(configs/siglip_emoji.py):

  dataset    name ('emoji_cldr' | 'wordnet_gloss' | 'jsonl_pairs'), data_dir, image_size, ...;
             or name 'mixture' with parts, fractions and each part's fields
             (contrastive/data/mixture.py: several datasets in one run); or name
             'webdataset': tar shards of JPEGs and captions (contrastive/data/webdataset.py)
  tokenizer  vocab_size, context (L, tokens per text incl. EOS), model_type
  model      image/text (or a/b) tower configs, embed_dim, loss_params ('clip' | 'siglip'),
             logit_scale_init, logit_bias_init (contrastive/models/two_tower.py)
  loss       name ('clip_loss' | 'sigmoid_loss'), block_size, collective
  lit        lock: '' | 'a' | 'b' ('image' / 'text' for image-text): that tower and its
             projection get no gradient and no optimizer state (two_tower_init.py)
  model_init workdir: a workdir of this codebase to initialise towers from (its latest
             checkpoint), mapping: 'src:dst,...' parameter groups (e.g. 'encoder:tower_a' takes a
             SimCLR encoder as the image tower)
  optimizer  as the other recipes, plus logit_lr_mult (the temperature/bias learning rate factor)
  augment    the training images' augmentation (two_tower_augment.py; off by default)
  batching, negclip, hard_negatives, geodesic_mixup: which rows share a batch, NegCLIP's
             reordered texts, corpus-mined negatives, m^3-Mix negatives (alpha > 0)
             (contrastive/batching/from_config.py, contrastive/negatives/negclip.py,
             contrastive/negatives/corpus_index.py, objectives.geodesic_mixup_loss)
  static_negatives  SPN4CIR's bank of frozen embeddings from a previous stage's workdir as
             extra negatives (contrastive/negatives/static_bank.py)
"""

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from contrastive import objectives
from contrastive import parallel
from contrastive import run_config
from contrastive import step as step_lib
from contrastive import two_tower_eval
from contrastive.batching import from_config as batching
from contrastive.config_lib import ConfigError
from contrastive.data import mixture
from contrastive.data import pair_batches
from contrastive.data import tokenizers
from contrastive.data import shard_index
from contrastive.data import webdataset
from contrastive.data import webdataset_loader
from contrastive.models import two_tower as two_tower_lib
from contrastive.negatives import corpus_index
from contrastive.negatives import static_bank
from contrastive.negatives import static_bank_table
from contrastive.recipes import base
from contrastive.recipes import two_tower_augment
from contrastive.recipes import two_tower_checks
from contrastive.recipes import two_tower_init
from contrastive.recipes.two_tower_model import model_config
from contrastive.recipes.two_tower_model import TwoTowerModel


@dataclasses.dataclass(frozen=True)
class Settings:
  """The facts of a two-tower config, resolved once (`settings`)."""
  config: ml_collections.ConfigDict
  locked: tuple  # the parameter groups LiT freezes (two_tower_init.LOCKS)
  is_mixture: bool
  hard: corpus_index.HardNegatives  # corpus-mined negatives (hard.num_hard per row; 0: off)
  static: static_bank.StaticNegatives  # SPN4CIR's static bank (static.num_static; 0: off)
  num_negclip: int  # NegCLIP perturbations per text (0: off)
  mixup_alpha: float  # m^3-Mix (0: off)
  query_runs: Any  # a mixture's (start, stop, is_text) rows per part, or None
  shards: Any  # config.dataset of webdataset shards with its defaults (a dict), or None
  common: base.Common  # dtypes, remat, GradCache, the non-finite guard


def settings(config):
  return Settings(
      config=config, locked=two_tower_init.LOCKS[two_tower_checks.lit_lock(config)],
      is_mixture=mixture.is_mixture(config.get('dataset')),
      hard=two_tower_checks.hard_negatives(config), static=static_bank.settings(config),
      num_negclip=two_tower_checks.num_negclip(config),
      mixup_alpha=two_tower_checks.mixup_alpha(config),
      query_runs=mixture.query_runs(config.get('dataset'), config.get('batch_size')),
      shards=(webdataset.settings(config.dataset)
              if (config.get('dataset') or {}).get('name') == 'webdataset' else None),
      common=base.common(config))


def example_inputs(config, pair_spec):
  """Tiny example inputs for model.init: (a, b) of batch 2."""
  tokens = np.zeros((2, config.tokenizer.context), np.int32)
  if pair_spec.a_is_image:
    s = mixture.image_size(config.dataset)
    return np.zeros((2, s, s, 3), np.uint8), tokens
  return tokens, tokens


def train_source(s, workdir):
  """The training split as the step's rows (`pair_batches.TokenizedPairs`; a
  `mixture.MixturePairs` of them for a mixture), with the tokenizer trained on it on the
  first start (saved in the workdir)."""
  config = s.config
  if s.shards:
    return _shard_rows(s, workdir)
  datasets = mixture.part_configs(config.dataset)
  for _, cfg in datasets:  # a JSON-lines file edited since this workdir's run started: refused
    pair_batches.check_run_source(cfg, workdir, run_config.allowed_changes(config))
  raws = [pair_batches.get_source(cfg, 'train') for _, cfg in datasets]
  specs = [pair_batches.spec(cfg, raw) for (_, cfg), raw in zip(datasets, raws)]
  if len(raws) == 1:
    tok = pair_batches.load_or_train_tokenizer(
        workdir, raws[0], specs[0], config.tokenizer,
        dataset_dir=pair_batches.builder(config.dataset).data_dir)
  else:  # a mixture's tokenizer: trained on all its parts' texts, kept in the workdir
    tok = pair_batches.load_or_train_tokenizer(workdir, raws, specs, config.tokenizer)
  rows = [pair_batches.TokenizedPairs(raw, spec, tok, config.tokenizer.context,
                                      negclip=s.num_negclip, negclip_seed=config.seed,
                                      with_row=bool(s.hard.num_hard or s.static.num_static))
          for raw, spec in zip(raws, specs)]
  if len(rows) == 1:
    return rows[0]
  shapes = {tuple(raw[0][spec.a].shape) for raw, spec in zip(raws, specs) if spec.a_is_image}
  if len(shapes) > 1:
    raise ConfigError(f'config.dataset: the image parts\' images differ in shape '
                      f'{sorted(shapes)}; give them one image_size.')
  source = mixture.MixturePairs([name for name, _ in datasets], rows,
                                shapes.pop() if shapes else None)
  if source.mixed:
    two_tower_checks.check_mixed_towers(config)
  return source


def _shard_rows(s, workdir):
  """webdataset's training rows: the shards indexed (checked for unusable samples before
  anything compiles) and the tokenizer trained on a sample of their captions."""
  cfg, config = s.shards, s.config
  shards = webdataset.Shards(shard_index.expand(cfg['train_shards']), cfg)
  webdataset_loader.check_index(shards, cfg['max_skipped_fraction'])
  print(f'Shards: {len(shards)} samples in {len(shards.paths)} shard(s) '
        f'({shards.bad_fraction():.3%} unusable by the index).', flush=True)
  captions = webdataset.CaptionSample(shards, cfg['tokenizer_sample'], config.seed)
  tok = pair_batches.load_or_train_tokenizer(workdir, captions, webdataset.SPEC,
                                             config.tokenizer)
  return webdataset_loader.TrainRows(shards, tok, config.tokenizer.context, cfg)


def state_tables(s, num_rows):
  """{TrainState field: shape} of the tables the loop refreshes and the checkpoint keeps:
  'mined' [N, K] (config.hard_negatives) and 'composition' [N] / [N, k] (config.batching
  clusters / neighbours)."""
  tables = {}
  if s.hard.num_hard:
    tables['mined'] = (num_rows, s.hard.num_hard)
  cfg = batching.settings(s.config)
  if cfg['method'] == 'clusters':
    tables['composition'] = (num_rows,)
  elif cfg['method'] == 'neighbours':
    tables['composition'] = (num_rows, int(cfg['num_neighbours']))
  return tables


def step(s, mesh, inputs, steps, rng, *, abstract=False, tables=None, bank=None):
  """(model, state, jitted step) of a two-tower config; `inputs`: `example_inputs`.

  abstract: the state as ShapeDtypeStructs with their shardings, nothing allocated
  (compiling for other devices: contrastive/aot.py). tables: {state field: shape} of the
  loop's int32 tables (`state_tables`), created as -1 and replicated. bank: {leaf: (shape,
  dtype)} of the static bank (`bank_shapes`), created as zeros split along the batch axes.
  """
  config = s.config
  model = two_tower_lib.build_two_tower(model_config(config), dtype=s.common.compute_dtype,
                                        remat=s.common.remat)
  params = jax.eval_shape(lambda r: model.init(r, *inputs, train=False), rng)['params']
  tx, schedule = two_tower_init.optimizer(config.optimizer, params, steps,
                                          batch_size=config.batch_size, locked=s.locked)
  make_state = lambda: step_lib.create_train_state(
      model, tx, None, rng, mesh, inputs=inputs, dtype=s.common.state_dtype)
  state = step_lib.abstract_state(make_state, mesh) if abstract else make_state()
  repl = parallel.replicated(mesh)
  for field, shape in (tables or {}).items():
    state = state.replace(**{field: jax.ShapeDtypeStruct(shape, np.int32, sharding=repl)
                             if abstract else jax.device_put(np.full(shape, -1, np.int32), repl)})
  state = static_bank.with_bank(state, bank, mesh, abstract=abstract)
  if s.shards:  # the count of replaced samples (webdataset_loader), saved with the state
    state = state.replace(skipped_samples=jax.ShapeDtypeStruct((), np.int32, sharding=repl)
                          if abstract else jax.device_put(np.int32(0), repl))
  block_size = config.loss.get('block_size')
  objective = objectives.two_tower(
      model=model, loss_name=config.loss.name, locked=s.locked, block_size=block_size,
      mesh=parallel.batch_mesh(mesh) if block_size else None,
      collective=config.loss.get('collective'), mixup_alpha=s.mixup_alpha,
      query_runs=s.query_runs, loss_kwargs=two_tower_checks.loss_kwargs(config))
  objective = two_tower_augment.wrap(objective, two_tower_augment.settings(config))
  step_fn = step_lib.jit_train_step(mesh, state, objective=objective, tx=tx, schedule=schedule,
                                    nonfinite=s.common.nonfinite,
                                    micro_batch_size=s.common.micro_batch_size)
  return model, state, step_fn


def parts(s, mesh, source, steps, rng, *, clusters=None):
  """`Parts` of a run; `source` from `train_source`."""
  if clusters is not None:
    raise ConfigError('config.mcl: MCL cluster negatives are not implemented for two towers.')
  config = s.config
  lay = static_bank.layout_of_source(source)[0] if s.static.num_static else None
  bank, topk = bank_shapes(s, mesh, lay)
  model, state, step_fn = step(s, mesh, example_inputs(config, source.spec), steps, rng,
                               tables=dict(state_tables(s, len(source)), **topk), bank=bank)
  init = config.get('model_init', {})
  shared = model.tower_b is None
  text_groups = {'tower_b'} | ({'tower_a'} if shared or not source.spec.a_is_image else set())
  two_tower_init.check_same_tokenizer(config, source.tokenizer, text_groups)
  if init.get('workdir'):
    params, batch_stats = two_tower_init.init_from_checkpoint(
        jax.device_get(state.params), jax.device_get(state.batch_stats), init.workdir,
        init.mapping)
    shardings = step_lib.state_shardings(mesh, state)
    state = state.replace(params=jax.device_put(params, shardings.params),
                          batch_stats=jax.device_put(batch_stats, shardings.batch_stats))
  return base.Parts(state=state, step_fn=step_fn, model=model,
                    evaluator=evaluator(s, model, mesh, source))


def bank_shapes(s, mesh, lay):
  """(the static bank's {leaf: (shape, dtype)} or None, {'static_topk': shape} or {}) of the
  training split's `static_bank.Layout` (None when off)."""
  shapes = static_bank.state_shapes(
      s.static, lay, width=s.config.model.embed_dim, dtype=s.common.state_dtype,
      num_devices=parallel.batch_size_divisor(dict(mesh.shape)))
  return shapes.pop('static_bank', None), shapes


def evaluator(s, model, mesh, source):
  """Retrieval and zero-shot on the eval split (one per part of a mixture)."""
  config, eval_mesh = s.config, parallel.batch_mesh(mesh)
  split = config.eval.get('split', 'test')
  if s.shards:
    test = webdataset.EvalSamples(webdataset.Shards(shard_index.expand(
        s.shards['eval_shards']), s.shards), s.shards)
    print(f'Eval shards: {len(test)} usable samples ({test.skipped} left out).', flush=True)
    return two_tower_eval.TwoTowerEvaluator(config, model, eval_mesh, test, source.spec,
                                            source.tokenizer,
                                            task_model=TwoTowerModel(config, None,
                                                                     source.tokenizer, 0))
  if not s.is_mixture:
    test = pair_batches.get_source(config.dataset, split)
    return two_tower_eval.TwoTowerEvaluator(config, model, eval_mesh, test, source.spec,
                                            source.tokenizer, order_probe=s.num_negclip,
                                            task_model=TwoTowerModel(config, None,
                                                                     source.tokenizer, 0))
  evaluators = {}
  for (name, dataset), part in zip(mixture.part_configs(config.dataset), source.parts):
    part_config = ml_collections.ConfigDict(dict(config.to_dict(), dataset=dataset.to_dict()))
    a_tower = 'b' if source.mixed and not part.spec.a_is_image else 'a'  # text queries: tower b
    evaluators[name] = two_tower_eval.TwoTowerEvaluator(
        part_config, model, eval_mesh, pair_batches.get_source(dataset, split), part.spec,
        source.tokenizer, a_tower=a_tower, order_probe=s.num_negclip)
  return two_tower_eval.MixtureEvaluator(evaluators)


def loader(s, source, run_parts):
  """config.batching's stream (composed from the starting state for tas_b: the same on
  resume) and its plan."""
  state, evaluator_ = run_parts.state, run_parts.evaluator
  if s.shards:
    workers = webdataset.worker_count(s.shards)
    print(f'Batches: random shuffle of the shards\' samples, decoded by {workers} worker '
          'process(es).', flush=True)
    return webdataset_loader.train_loader(source, global_batch_size=s.config.batch_size,
                                          seed=s.config.seed, workers=workers), None
  stream, composition, plan = batching.train_loader(
      s.config, source, lambda a: evaluator_.embed(state, 'a', a), with_plan=True)
  print(f'Batches: {composition}.', flush=True)
  return stream, plan


def tables(s, source, mesh, plan, steps):
  """The batch plan's clusters or neighbours (config.batching) and the corpus-mined
  negatives (config.hard_negatives)."""
  out = [t for t in (getattr(plan, 'periodic', None),) if t is not None]
  if s.hard.num_hard:
    out.append(corpus_index.CorpusIndex(source, mesh, s.hard, seed=int(s.config.seed),
                                        fixed_b='tower_b' in s.locked,  # ADORE
                                        plan=plan, total_steps=steps))
    print(f'Hard negatives: {out[-1].describe()}.', flush=True)
  if s.static.num_static:
    out.append(static_bank_table.StaticBank(source, mesh, s.static, seed=int(s.config.seed)))
    print(f'Static negatives: {out[-1].describe()}.', flush=True)
  return out


def batch_fields(s, inputs, specs, group_width=1, lay=None):
  """{field: (per-row shape, dtype)} of the step's batch (pair_batches, objectives.two_tower):
  side a, b, ids, and the extra texts of the config (NegCLIP's P, the K mined; a mixture's
  part index and text queries). specs: the datasets' PairSpecs; group_width: the most texts
  of one group (`corpus_index.CorpusIndex.width`, with mined negatives); lay: the training
  split's `static_bank.Layout` (with the static bank)."""
  length = inputs[1].shape[1]
  fields = {'a': (inputs[0].shape[1:], inputs[0].dtype), 'b': ((length,), np.int32),
            'id': ((), np.int32), 'truncated': ((), np.int32)}
  for name, num in (('b_neg', s.num_negclip), ('b_hard', s.hard.num_hard)):
    if num:
      fields.update({name: ((num, length), np.int32), name + '_valid': ((num,), np.bool_)})
  if s.hard.num_hard:
    fields.update(b_hard_id=((s.hard.num_hard,), np.int32),
                  b_hard_text=((s.hard.num_hard,), np.int32), b_text=((), np.int32),
                  b_group_texts=((group_width,), np.int32))
  fields.update(static_bank.batch_fields(s.static, lay))
  if s.shards:
    fields['skipped'] = ((), np.int32)
  if len(specs) > 1:  # a mixture (contrastive/data/mixture.py)
    fields['task'] = ((), np.int32)
  if len({spec.a_is_image for spec in specs}) == 2:  # image and text queries
    fields.update(a_text=((length,), np.int32), a_is_text=((), np.bool_))
  return fields


def abstract_parts(s, mesh, steps, rng):
  """(abstract state, jitted step, abstract global batch) from the config alone (a JSON-lines
  dataset's first rows are read for its kinds of sides)."""
  datasets = [d for _, d in mixture.part_configs(s.config.dataset)]
  raws = [pair_batches.get_source(d, 'train') if d.name == 'jsonl_pairs' or s.hard.num_hard
          or s.static.num_static else None for d in datasets]
  specs = [pair_batches.spec(d, raw) for d, raw in zip(datasets, raws)]
  inputs = example_inputs(s.config, next((p for p in specs if p.a_is_image), specs[0]))
  lay = static_bank.layout_of_records(raws[0], specs[0]) if s.static.num_static else None
  _, state, step_fn = step(s, mesh, inputs, steps, rng, abstract=True,
                           bank=bank_shapes(s, mesh, lay)[0])
  data, b = parallel.data_sharding(mesh), s.config.batch_size
  width = corpus_index.group_width(raws, specs) if s.hard.num_hard else 1
  batch = {k: jax.ShapeDtypeStruct((b, *shape), np.dtype(dtype), sharding=data)
           for k, (shape, dtype) in batch_fields(s, inputs, specs, width, lay).items()}
  return state, step_fn, batch


def load(config, variables, workdir, step_number):
  """The trained `TwoTowerModel` of a workdir (its tokenizer saved beside the checkpoints, of
  config.tokenizer.kind: contrastive/data/tokenizers.py)."""
  tokenizer = tokenizers.load_workdir(workdir, config.get('tokenizer'))
  return TwoTowerModel(config, variables, tokenizer, step_number)


RECIPE = base.Recipe(name='two_tower', validate=two_tower_checks.validate, settings=settings,
                     train_source=train_source, parts=parts, loader=loader, tables=tables,
                     abstract_parts=abstract_parts, load=load)

