"""Training: the loop every recipe shares around the sharded jitted step of `contrastive.step`.

`train_and_evaluate` looks up the config's recipe (contrastive/recipes/) once; the recipe gives
the training rows, the state, step and evaluator, the loader and the tables the loop refreshes.
The loop owns what every run shares: the mesh, the run's config record, checkpoints and resume,
preemption, the non-finite guard, periodic evaluation and the metrics.
"""

import contextlib
import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from contrastive import checkpoint
from contrastive import faults
from contrastive import metric_writer
from contrastive import parallel
from contrastive import recipes
from contrastive import run_config
from contrastive import validate
from contrastive import workdir as workdir_lib
from contrastive.config_lib import ConfigError
from contrastive.data import pipeline
from contrastive.samplers import feature_transform


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf loss or state; the message names the step and the last
  (finite) checkpoint."""


def total_steps(config, num_train):
  """config.total_steps if set (> 0), else config.num_epochs over num_train examples."""
  if config.get('total_steps'):
    return int(config.total_steps)
  return int(config.num_epochs * num_train // config.batch_size)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, clusters=None):
  """Trains the recipe of `config` (config.family: SimCLR, MoCo and the samplers by default;
  'two_tower': CLIP, SigLIP, LiT), evaluating and checkpointing in `workdir`.

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
    loop = _start(config, workdir, clusters=clusters, preemption=preemption, profiler=profiler)
    return _train(loop)


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


def _check_schedule(config, ckpt_dir, steps):
  """Refuses a resume whose schedule ends before the workdir's newest checkpoint."""
  saved = checkpoint.saved_steps(ckpt_dir)
  if saved and saved[-1] > steps:
    raise ConfigError(
        f'The workdir\'s newest checkpoint is step {saved[-1]}, past this config\'s {steps} '
        f'steps (total_steps={config.get("total_steps")}, num_epochs={config.get("num_epochs")}):'
        f' set --config.total_steps >= {saved[-1]} or use a new --workdir.')


def _mesh(config):
  mesh = parallel.make_mesh(config.mesh)
  print(f'Mesh {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} devices '
        f'({jax.process_count()} process(es)).', flush=True)
  return mesh


def _report_unsharded(mesh, params):
  replicated = parallel.unsharded_by_fsdp(mesh, params)
  if replicated:
    print(f'fsdp: the axis size {mesh.shape[parallel.FSDP]} divides no dimension of '
          f'{len(replicated)} parameter(s), kept replicated: {", ".join(replicated)}', flush=True)


@dataclasses.dataclass
class _Loop:
  """What the training loop reads and writes (`_start` builds it; `_train` runs it)."""
  config: Any
  workdir: str
  state: Any
  step_fn: Any
  evaluator: Any
  batch_iter: Any
  tables: list
  ckpt: Any
  writer: Any
  preemption: Any
  profiler: Any
  data_sharding: Any  # of the global batches, along the mesh's batch axes
  start: int
  steps: int
  progress: Any = None  # metric_writer.Progress, from the first update on
  histograms: list = dataclasses.field(default_factory=list)  # (step, pos/neg score counts)
  data_check: Any = None  # fn(step, metrics) of a loader that checks its skipped samples


def _start(config, workdir, *, clusters, preemption, profiler):
  """The run's recipe, data, state (restored if the workdir has a checkpoint) and tables,
  after the config is checked against the workdir's, before anything is compiled."""
  recipe = recipes.get(config)
  s = recipe.settings(config)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  resuming = bool(checkpoint.saved_steps(ckpt_dir))
  changes = run_config.check(config, workdir, resuming=resuming)  # before any work
  writer = metric_writer.MetricWriter(workdir, enabled=jax.process_index() == 0)
  mesh = _mesh(config)
  source = recipe.train_source(s, workdir)
  steps = total_steps(config, len(source))
  _check_schedule(config, ckpt_dir, steps)
  if jax.process_index() == 0:
    run_config.record(config, workdir, changes, resuming=resuming, devices=jax.device_count(),
                      processes=jax.process_count())
  rng = jax.random.key(config.seed)
  parts = recipe.parts(s, mesh, source, steps, jax.random.fold_in(rng, 0), clusters=clusters)
  loader, plan = recipe.loader(s, source, parts)
  batch_iter = iter(loader)
  _report_unsharded(mesh, parts.state.params)
  ckpt = checkpoint.Checkpointer(ckpt_dir, save_every=config.checkpoint_every,
                                 keep=config.checkpoint_keep)
  state, data_state = ckpt.restore_latest(parts.state)
  if data_state is not None:
    batch_iter.set_state(data_state)
  start = int(state.step)
  tables = recipe.tables(s, source, mesh, plan, steps)
  for table in tables:
    table.sync(state, start)
  if resuming:  # a killed run's lines of the steps run again
    writer.drop_replayed(start, {f'{t.metric}/refresh_seconds' for t in tables if t.due(start)})
  return _Loop(config=config, workdir=workdir, state=state, step_fn=parts.step_fn,
               evaluator=parts.evaluator, batch_iter=batch_iter, tables=tables, ckpt=ckpt,
               writer=writer, preemption=preemption, profiler=profiler,
               data_sharding=parallel.data_sharding(mesh), start=start, steps=steps,
               data_check=getattr(batch_iter, 'check', None))


def _evaluate(loop, step, prefix=''):
  """Runs the evaluator on the state, writes and prints its metrics (and the score
  histograms so far, config.samplers.histograms)."""
  metrics = {prefix + k: v for k, v in loop.evaluator(loop.state).items()}
  metrics['skipped_steps'] = int(loop.state.skipped_steps)
  loop.writer.write(step, metrics)
  print(metric_writer.format_metrics(step, metrics), flush=True)
  if loop.histograms and jax.process_index() == 0:  # the scores so far, one line per logged step
    feature_transform.plot_score_histograms(
        loop.histograms, os.path.join(loop.workdir, f'score_histograms_{step}.png'))
  return metrics


def _record_histograms(loop, step, metrics):
  if 'hist_pos' in metrics:
    bins = len(metrics['hist_pos'])
    loop.histograms.append((step, dict(pos=metrics['hist_pos'], neg=metrics['hist_neg'],
                                       edges=np.linspace(-1, 1, bins + 1))))


def _stop(loop, message):
  """Closes the checkpointer (waiting for its writes) and the writer; prints `message`."""
  loop.ckpt.close()
  loop.writer.close()
  close = getattr(loop.batch_iter, 'close', None)  # stops grain's worker processes
  if close:
    close()
  if message:
    print(message, flush=True)


def _next_batch(loop, step):
  """The global batch of update `step`, after the tables due before it are refreshed."""
  for table in loop.tables:
    if table.due(step - 1):  # from the state before this update
      with loop.progress.paused():
        loop.state = _refresh(table, loop.evaluator, loop.state, step - 1, loop.writer)
  batch = next(loop.batch_iter)
  for table in loop.tables:
    batch = table.attach(batch)
  return pipeline.to_global(batch, loop.data_sharding)


def _train(loop):
  """Runs updates start + 1 ... steps, checkpointing, evaluating and stopping on request;
  returns (state, the last evaluation's metrics) ({} when preempted)."""
  config, start, steps = loop.config, loop.start, loop.steps
  if start == 0 and config.eval.random_init_baseline:
    _evaluate(loop, 0, prefix='random_init/')
  loop.progress = metric_writer.Progress(start, steps, config.batch_size, loop.writer)
  step_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  if start < steps and loop.preemption.requested():
    _stop(loop, f'Stopped by {loop.preemption.signal_name()} during start-up, before step '
          f'{start + 1}: nothing new to save; rerun the same command to resume.')
    return loop.state, {}
  nonfinite = config.get('nonfinite', 'error')
  eval_metrics, skips_in_a_row = {}, 0
  for step in range(start + 1, steps + 1):
    loop.profiler.before_step(step)
    batch = _next_batch(loop, step)
    loop.state, metrics = loop.step_fn(loop.state, batch, jax.random.fold_in(step_rng, step))
    metrics = jax.device_get(metrics)
    loop.profiler.after_step(step, loop.state)
    if step <= start + 2:  # after compiling, and one step later
      metric_writer.log_device_memory(step, loop.writer, report_unavailable=step == start + 1)
    skips_in_a_row = 0 if metrics['finite'] else skips_in_a_row + 1
    if skips_in_a_row and (nonfinite == 'error' or
                           skips_in_a_row >= config.get('max_consecutive_skips', 10)):
      loop.ckpt.wait()
      raise NonFiniteLossError(_nonfinite_message(step, metrics, nonfinite, skips_in_a_row,
                                                  loop.ckpt))
    if loop.data_check:  # raises past config.dataset.max_skipped_fraction (webdataset)
      loop.data_check(step, metrics)
    loop.progress.update(step, metrics, every=config.log_every)
    if step % config.log_every == 0 or step == steps:
      _record_histograms(loop, step, metrics)
    # The last step is saved before the final evaluation, so a kill during it loses nothing.
    loop.ckpt.save(step, loop.state, loop.batch_iter.get_state(), force=step == steps)
    if step == steps or (config.eval.every and step % config.eval.every == 0):
      with loop.progress.paused():
        eval_metrics = _evaluate(loop, step)
    if step < steps and loop.preemption.requested():
      loop.ckpt.save(step, loop.state, loop.batch_iter.get_state(), force=True)
      _stop(loop, f'Preempted: saved checkpoint {step} in {loop.ckpt.directory} (after '
            f'{loop.preemption.signal_name()}); rerun the same command to resume.')
      return loop.state, {}
  if not eval_metrics:  # resumed after the last step: evaluate what was restored
    eval_metrics = _evaluate(loop, steps)
  _stop(loop, '')
  return loop.state, eval_metrics


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
