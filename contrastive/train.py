"""Training: the train/eval loop around the sharded jitted step of `contrastive.step`."""

import contextlib
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from contrastive import checkpoint
from contrastive import evaluate
from contrastive import faults
from contrastive import grad_cache
from contrastive import metric_writer
from contrastive import optim
from contrastive import parallel
from contrastive import precision
from contrastive import run_config
from contrastive import two_tower_recipe
from contrastive import validate
from contrastive import workdir as workdir_lib
from contrastive.batching import from_config as batching
from contrastive.data import pipeline
from contrastive.losses import pair_loss_from_config
from contrastive.models import build_model
from contrastive.negatives import corpus_index
from contrastive.samplers import feature_transform
from contrastive.samplers import guide
from contrastive.samplers import momentum as momentum_lib
from contrastive.step import abstract_state
from contrastive.step import create_train_state
from contrastive.step import jit_train_step
from contrastive.step import Method
from contrastive.step import train_step  # pylint: disable=unused-import
from contrastive.step import TrainState  # pylint: disable=unused-import


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf loss or state; the message names the step and the last
  (finite) checkpoint."""


def total_steps(config, num_train):
  """config.total_steps if set (> 0), else config.num_epochs over num_train examples."""
  if config.get('total_steps'):
    return int(config.total_steps)
  return int(config.num_epochs * num_train // config.batch_size)


def build_method(config, *, steps, steps_per_epoch, clusters=None):
  """The step's `Method` from config, or None for plain SimCLR with config.loss."""
  if not validate.uses_samplers(config) and clusters is None:
    return None
  momentum = None
  if validate.momentum_base(config):
    momentum = momentum_lib.momentum_schedule(validate.momentum_base(config), steps,
                                              config.momentum.schedule)
  elif guide.guide_workdir(config):  # GIST's guide from a checkpoint: frozen
    momentum = guide.frozen
  return Method(name=config.get('method', 'simclr'), samplers=config.samplers,
                temperature=config.loss.temperature, symmetric=config.get('symmetric', True),
                momentum=momentum, steps_per_epoch=steps_per_epoch,
                block_size=config.loss.get('block_size'),
                clusters=None if clusters is None else jnp.asarray(clusters, jnp.int32))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, clusters=None):
  """Trains the recipe in `config` (SimCLR, MoCo, samplers; or with config.family='two_tower'
  CLIP, SigLIP, LiT), evaluating and checkpointing in `workdir`.

  `clusters` ([N] int, the cluster of each training example id) restricts each query's
  negatives to its own cluster (MCL's later stages, see contrastive/mcl.py).

  Rerunning with the same workdir resumes from the latest checkpoint that restores, if the
  config agrees with the one saved there (contrastive/run_config.py). One run at a time holds
  the workdir (contrastive/workdir.py). SIGTERM or SIGINT (preemption, Ctrl-C) saves a
  checkpoint after the current step and returns (state, {}).
  `config.dtype='float64'` runs everything in float64 (jax_enable_x64 for this call only).

  Returns:
    The final TrainState and the last evaluation's metrics.
  """
  validate.validate_config(config, num_devices=jax.device_count(),
                           num_processes=jax.process_count())
  workdir_lib.check_workdir(workdir)
  x64 = jax.enable_x64(True) if config.get('dtype') == 'float64' else contextlib.nullcontext()
  profiler = metric_writer.StepProfiler(workdir, config.get('profile_steps'),
                                        enabled=jax.process_index() == 0)
  with faults.Preemption() as preemption, _locked(workdir), x64, profiler:
    return _train_and_evaluate(config, workdir, clusters=clusters, preemption=preemption,
                               profiler=profiler)


@contextlib.contextmanager
def _locked(workdir):
  """Holds the workdir's lock (process 0) for the run; every process fails if it is taken."""
  lock = workdir_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0)
  error = None
  try:
    lock.acquire()
  except workdir_lib.WorkdirLockedError as e:
    error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if np.max(multihost_utils.process_allgather(np.int32(error is not None))) and not error:
      error = workdir_lib.WorkdirLockedError(f'{workdir} is in use (see process 0\'s error).')
  if error:
    raise error
  try:
    yield
  finally:
    lock.release()


def _check_resume(config, workdir, ckpt_dir, steps):
  """Refuses a resume whose config differs from the saved run's (run_config) or whose
  schedule ends before its newest checkpoint, before anything is compiled; then records the
  start in the workdir."""
  saved = checkpoint.saved_steps(ckpt_dir)
  if saved and saved[-1] > steps:
    raise validate.ConfigError(
        f'The workdir\'s newest checkpoint is step {saved[-1]}, past this config\'s {steps} '
        f'steps (total_steps={config.get("total_steps")}, num_epochs={config.get("num_epochs")}):'
        f' set --config.total_steps >= {saved[-1]} or use a new --workdir.')
  run_config.check_and_record(config, workdir, resuming=bool(saved),
                              write=jax.process_index() == 0, devices=jax.device_count(),
                              processes=jax.process_count())


def image_views_step(config, mesh, image_shape, steps, rng, *, steps_per_epoch=1.0,
                     clusters=None, abstract=False):
  """(model, state, jitted step) of the image-views family (SimCLR, MoCo, samplers).

  image_shape: [H, W, C] of the training images. abstract: the state as ShapeDtypeStructs
  with their shardings, nothing allocated (compiling for other devices: contrastive/aot.py).
  """
  model = build_model(config.model, dtype=precision.compute_dtype(config),
                      remat=precision.remat(config))
  tx, schedule = optim.build_optimizer(
      ml_collections.ConfigDict(dict(config.optimizer, batch_size=config.batch_size)), steps)
  method = build_method(config, steps=steps, clusters=clusters, steps_per_epoch=steps_per_epoch)
  make_state = lambda: create_train_state(model, tx, image_shape, rng, mesh,
                                          ema=bool(validate.momentum_base(config) or
                                                   guide.guide_workdir(config)),
                                          queue_size=config.get('queue_size', 0),
                                          batch_size=config.batch_size,
                                          dtype=precision.state_dtype(config))
  state = abstract_state(make_state, mesh) if abstract else make_state()
  step_fn = jit_train_step(mesh, state, model=model, tx=tx,
                           loss_fn=pair_loss_from_config(config.loss,
                                                         mesh=parallel.batch_mesh(mesh)),
                           aug_cfg=config.augment, schedule=schedule,
                           nonfinite=config.get('nonfinite', 'error'), method=method,
                           micro_batch_size=grad_cache.micro_batch_size(config))
  return model, state, step_fn


def _image_views_parts(config, mesh, train_source, steps, rng, *, clusters):
  """(state, jitted step, evaluator) of the image-views family (SimCLR, MoCo, samplers)."""
  model, state, step_fn = image_views_step(
      config, mesh, train_source[0]['image'].shape, steps, rng, clusters=clusters,
      steps_per_epoch=len(train_source) / config.batch_size)
  if guide.guide_workdir(config):
    try:
      state = guide.load_guide(state, guide.guide_workdir(config))
    except ValueError as e:
      raise validate.ConfigError(str(e)) from None
  return state, step_fn, evaluate.Evaluator(config.eval, config.dataset, model,
                                            parallel.batch_mesh(mesh))


def _train_and_evaluate(config, workdir, *, clusters, preemption, profiler):
  """train_and_evaluate once the config is checked, the workdir locked and the precision set."""
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  run_config.check_and_record(config, workdir, resuming=bool(checkpoint.saved_steps(ckpt_dir)),
                              write=False)  # refuses a changed config before any work
  writer = metric_writer.MetricWriter(workdir, enabled=jax.process_index() == 0)

  # ---- Mesh ---------------------------------------------------------------------------------
  mesh = parallel.make_mesh(config.mesh)
  print(f'Mesh {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} devices '
        f'({jax.process_count()} process(es)).', flush=True)

  # ---- Input pipeline -----------------------------------------------------------------------
  two_tower = config.get('family') == 'two_tower'
  train_source = (two_tower_recipe.train_source(config, workdir) if two_tower else
                  pipeline.get_source(config.dataset, 'train'))
  steps = total_steps(config, len(train_source))
  _check_resume(config, workdir, ckpt_dir, steps)

  # ---- Model, optimizer, objective, evaluation ----------------------------------------------
  rng = jax.random.key(config.seed)
  parts = two_tower_recipe.parts if two_tower else _image_views_parts
  state, step_fn, evaluator = parts(config, mesh, train_source, steps,
                                    jax.random.fold_in(rng, 0), clusters=clusters)
  plan = None
  if two_tower:  # composed from the starting state (tas_b): the same on resume
    loader, composition, plan = batching.train_loader(
        config, train_source, lambda a: evaluator.embed(state, 'a', a), with_plan=True)
    print(f'Batches: {composition}.', flush=True)
  else:
    loader = pipeline.train_loader(train_source, global_batch_size=config.batch_size,
                                   seed=config.seed)
  batch_iter = iter(loader)
  replicated = parallel.unsharded_by_fsdp(mesh, state.params)
  if replicated:
    print(f'fsdp: the axis size {mesh.shape[parallel.FSDP]} divides no dimension of '
          f'{len(replicated)} parameter(s), kept replicated: {", ".join(replicated)}', flush=True)

  # ---- Checkpoint (resume) ------------------------------------------------------------------
  ckpt = checkpoint.Checkpointer(ckpt_dir, save_every=config.checkpoint_every,
                                 keep=config.checkpoint_keep)
  state, data_state = ckpt.restore_latest(state)
  if data_state is not None:
    batch_iter.set_state(data_state)
  start = int(state.step)
  # Tables the loop refreshes from the towers and the state keeps: the batch plan's clusters
  # or neighbours (config.batching), the corpus-mined negatives (config.hard_negatives).
  tables = [t for t in (getattr(plan, 'periodic', None),) if t is not None]
  if two_tower and corpus_index.num_hard(config):
    tables.append(corpus_index.CorpusIndex(config, train_source, mesh, plan=plan,
                                           total_steps=steps))
    print(f'Hard negatives: {tables[-1].describe()}.', flush=True)
  for table in tables:
    table.sync(state, start)

  data_sharding = parallel.data_sharding(mesh)
  histograms = []  # (step, pos/neg score counts) at each logged step (config.samplers.histograms)

  def record_histograms(step, metrics):
    if 'hist_pos' in metrics:
      bins = len(metrics['hist_pos'])
      histograms.append((step, dict(pos=metrics['hist_pos'], neg=metrics['hist_neg'],
                                    edges=np.linspace(-1, 1, bins + 1))))

  def run_eval(step, prefix=''):
    metrics = {prefix + k: v for k, v in evaluator(state).items()}
    metrics['skipped_steps'] = int(state.skipped_steps)
    writer.write(step, metrics)
    print(metric_writer.format_metrics(step, metrics), flush=True)
    if histograms and jax.process_index() == 0:  # the scores so far, one line per logged step
      feature_transform.plot_score_histograms(
          histograms, os.path.join(workdir, f'score_histograms_{step}.png'))
    return metrics

  if start == 0 and config.eval.random_init_baseline:
    run_eval(0, prefix='random_init/')

  # ---- Loop ---------------------------------------------------------------------------------
  progress = metric_writer.Progress(start, steps, config.batch_size, writer)
  eval_metrics = {}
  step_rng = jax.random.fold_in(rng, 1)
  if start < steps and preemption.requested():
    ckpt.close()
    writer.close()
    print(f'Stopped by {preemption.signal_name()} during start-up, before step {start + 1}: '
          'nothing new to save; rerun the same command to resume.', flush=True)
    return state, {}
  nonfinite = config.get('nonfinite', 'error')
  skips_in_a_row = 0
  for step in range(start + 1, steps + 1):
    profiler.before_step(step)
    for table in tables:
      if table.due(step - 1):  # from the state before this update
        with progress.paused():
          state = _refresh(table, evaluator, state, step - 1, writer)
    batch = next(batch_iter)
    for table in tables:
      batch = table.attach(batch)
    batch = pipeline.to_global(batch, data_sharding)
    state, metrics = step_fn(state, batch, jax.random.fold_in(step_rng, step))
    metrics = jax.device_get(metrics)
    profiler.after_step(step, state)
    if step <= start + 2:  # after compiling, and one step later
      metric_writer.log_device_memory(step, writer, report_unavailable=step == start + 1)
    skips_in_a_row = 0 if metrics['finite'] else skips_in_a_row + 1
    if skips_in_a_row and (nonfinite == 'error' or
                           skips_in_a_row >= config.get('max_consecutive_skips', 10)):
      ckpt.wait()
      raise NonFiniteLossError(_nonfinite_message(step, metrics, nonfinite, skips_in_a_row, ckpt))
    progress.update(step, metrics, every=config.log_every)
    if step % config.log_every == 0 or step == steps:
      record_histograms(step, metrics)
    # The last step is saved before the final evaluation, so a kill during it loses nothing.
    ckpt.save(step, state, batch_iter.get_state(), force=step == steps)
    if step == steps or (config.eval.every and step % config.eval.every == 0):
      with progress.paused():
        eval_metrics = run_eval(step)
    if step < steps and preemption.requested():
      ckpt.save(step, state, batch_iter.get_state(), force=True)
      ckpt.close()
      writer.close()
      print(f'Preempted: saved checkpoint {step} in {ckpt.directory} (after '
            f'{preemption.signal_name()}); rerun the same command to resume.', flush=True)
      return state, {}
  if not eval_metrics:  # resumed after the last step: evaluate what was restored
    eval_metrics = run_eval(steps)
  ckpt.close()
  writer.close()
  return state, eval_metrics


def _refresh(table, evaluator, state, step, writer):
  """The state with `table` (its field) recomputed by the state's towers; the time is logged."""
  start = time.perf_counter()
  state = table.refresh(evaluator.embed, state, step)
  seconds = time.perf_counter() - start
  writer.write(step, {f'{table.metric}/refresh_seconds': seconds})
  print(f'Step {step}: refreshed {table.field} ({table.metric}) in {seconds:.1f} s.', flush=True)
  return state


def _nonfinite_message(step, metrics, nonfinite, skips_in_a_row, ckpt):
  """Why the run stops: which values were non-finite, and the last (finite) checkpoint."""
  what = (f'loss {metrics["loss"]}' if not np.isfinite(metrics['loss']) else
          f'state (the loss {metrics["loss"]:.4g} is finite: a gradient, parameter, BatchNorm '
          'statistic or optimizer moment overflowed)')
  where = f'last good checkpoint: {ckpt.latest_step()} in {ckpt.directory}'
  if nonfinite == 'skip':
    return (f'{skips_in_a_row} step(s) in a row skipped up to step {step} (non-finite {what}); '
            f'{where}. config.max_consecutive_skips stops a diverged run: lower the learning '
            'rate or add gradient clipping (config.optimizer.grad_clip_norm).')
  return (f'Non-finite {what} at step {step}; {where} (config.nonfinite=\'skip\' skips such '
          'steps instead).')
