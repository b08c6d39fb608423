"""SimCLR training: train state, the sharded jitted train step, and the train/eval loop."""

import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from contrastive import checkpoint
from contrastive import evaluate
from contrastive import faults
from contrastive import metric_writer
from contrastive import optim
from contrastive import parallel
from contrastive import validate
from contrastive.data import augment
from contrastive.data import pipeline
from contrastive.losses import pair_loss_from_config
from contrastive.models import build_model


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes. Replicated over the mesh (data parallelism).

  With the data iterator's state (saved beside it) and the step rng, fold_in(seed, step),
  this is all that the next step depends on, so a restored run continues bit for bit.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  skipped_steps: jax.Array  # updates dropped for a non-finite loss/gradient (nonfinite='skip')


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf loss; the message names the step."""


def create_train_state(model, tx, image_shape, rng, mesh):
  """Initialises params, BatchNorm stats and optimizer state directly with replicated sharding."""

  def init(rng):
    variables = model.init(rng, jnp.zeros((2, *image_shape), jnp.uint8), train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables['batch_stats'], opt_state=tx.init(params),
                      skipped_steps=jnp.zeros((), jnp.int32))

  return jax.jit(init, out_shardings=parallel.replicated(mesh))(rng)


def train_step(state, batch, rng, *, model, tx, loss_fn, aug_cfg, schedule, nonfinite='error'):
  """One SimCLR update on the global batch.

  Args:
    state: TrainState.
    batch: {'image': [B, H, W, C] uint8, ...}, sharded along the mesh's data axis.
    rng: key for this step's augmentations (per example: fold_in(rng, example index)).
    nonfinite: 'error' applies every update (the loop raises on a non-finite loss); 'skip'
      keeps params, BatchNorm stats and optimizer state unchanged when the loss or any
      gradient is NaN/inf, and counts the step in `skipped_steps`.

  Returns:
    (new state, metrics): metrics holds loss, the loss's own metrics, lr, l2_grads, l2_params,
    skipped_steps.
  """
  v1, v2 = augment.two_views(rng, batch['image'], aug_cfg)
  b = v1.shape[0]
  # Interleave the views, [B, 2, H, W, C] -> [2B, H, W, C], so each device keeps its own rows;
  # BatchNorm then normalises over all 2B views of the global batch.
  views = jnp.stack([v1, v2], axis=1).reshape(2 * b, *v1.shape[1:])

  def objective(params):
    (_, z), updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, views,
                                  train=True, mutable=['batch_stats'])
    z = z.reshape(b, 2, -1)
    loss, metrics = loss_fn(z[:, 0], z[:, 1])
    return loss, (metrics, updates['batch_stats'])

  (loss, (metrics, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  skipped = state.skipped_steps
  if nonfinite == 'skip':
    ok = faults.all_finite(loss, grads)
    params, batch_stats, opt_state = faults.keep_if_finite(
        ok, (params, batch_stats, opt_state), (state.params, state.batch_stats, state.opt_state))
    skipped = skipped + jnp.where(ok, 0, 1).astype(skipped.dtype)
  metrics = dict(metrics, loss=loss, lr=schedule(state.step), skipped_steps=skipped,
                 l2_grads=optax.tree.norm(grads), l2_params=optax.tree.norm(params))
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state, skipped_steps=skipped)
  return new_state, metrics


def jit_train_step(mesh, state, **step_kwargs):
  """train_step under jax.jit with explicit shardings; the state's buffers are donated."""
  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  state_sharding = jax.tree.map(lambda _: repl, state)
  return jax.jit(functools.partial(train_step, **step_kwargs),
                 in_shardings=(state_sharding, data, repl),
                 out_shardings=(state_sharding, repl),
                 donate_argnums=(0,))


def total_steps(config, num_train):
  """config.total_steps if set (> 0), else config.num_epochs over num_train examples."""
  if config.get('total_steps'):
    return int(config.total_steps)
  return int(config.num_epochs * num_train // config.batch_size)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains the SimCLR recipe in `config`, evaluating and checkpointing in `workdir`.

  Rerunning with the same workdir resumes from the latest checkpoint that restores. SIGTERM
  (preemption) saves a checkpoint after the current step and returns (state, {}).

  Returns:
    The final TrainState and the last evaluation's metrics.
  """
  # ---- Checks (before any compilation) -----------------------------------------------------
  validate.validate_config(config, num_devices=jax.device_count(),
                           num_processes=jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  writer = metric_writer.MetricWriter(workdir, enabled=jax.process_index() == 0)

  # ---- Mesh ---------------------------------------------------------------------------------
  mesh = parallel.make_mesh(config.mesh)

  # ---- Input pipeline -----------------------------------------------------------------------
  train_source = pipeline.get_source(config.dataset, 'train')
  steps = total_steps(config, len(train_source))
  loader = pipeline.train_loader(train_source, global_batch_size=config.batch_size,
                                 seed=config.seed)
  batch_iter = iter(loader)
  image_shape = train_source[0]['image'].shape

  # ---- Model, optimizer, loss ---------------------------------------------------------------
  model = build_model(config.model)
  tx, schedule = optim.build_optimizer(
      ml_collections.ConfigDict(dict(config.optimizer, batch_size=config.batch_size)), steps)
  loss_fn = pair_loss_from_config(config.loss)
  rng = jax.random.key(config.seed)
  state = create_train_state(model, tx, image_shape, jax.random.fold_in(rng, 0), mesh)

  # ---- Checkpoint (resume) ------------------------------------------------------------------
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                 save_every=config.checkpoint_every, keep=config.checkpoint_keep)
  state, data_state = ckpt.restore_latest(state)
  if data_state is not None:
    batch_iter.set_state(data_state)
  start = int(state.step)

  # ---- Update step --------------------------------------------------------------------------
  nonfinite = config.get('nonfinite', 'error')
  step_fn = jit_train_step(mesh, state, model=model, tx=tx, loss_fn=loss_fn,
                           aug_cfg=config.augment, schedule=schedule, nonfinite=nonfinite)
  data_sharding = parallel.data_sharding(mesh)

  # ---- Evaluation ---------------------------------------------------------------------------
  evaluator = evaluate.Evaluator(config.eval, config.dataset, model, mesh)

  def run_eval(step, prefix=''):
    metrics = {prefix + k: v for k, v in evaluator(state).items()}
    writer.write(step, metrics)
    print(metric_writer.format_metrics(step, metrics), flush=True)
    return metrics

  if start == 0 and config.eval.random_init_baseline:
    run_eval(0, prefix='random_init/')

  # ---- Loop ---------------------------------------------------------------------------------
  progress = metric_writer.Progress(start, steps, config.batch_size, writer)
  eval_metrics = {}
  step_rng = jax.random.fold_in(rng, 1)
  with faults.Preemption() as preemption:
    for step in range(start + 1, steps + 1):
      batch = pipeline.to_global(next(batch_iter), data_sharding)
      state, metrics = step_fn(state, batch, jax.random.fold_in(step_rng, step))
      metrics = jax.device_get(metrics)
      if nonfinite == 'error' and not np.isfinite(metrics['loss']):
        ckpt.wait()
        raise NonFiniteLossError(
            f'Non-finite loss {metrics["loss"]} at step {step}; last good checkpoint: '
            f'{ckpt.latest_step()} in {ckpt.directory} (config.nonfinite=\'skip\' skips such '
            'steps instead).')
      progress.update(step, metrics, every=config.log_every)
      if step == steps or (config.eval.every and step % config.eval.every == 0):
        with progress.paused():
          eval_metrics = run_eval(step)
      ckpt.save(step, state, batch_iter.get_state(), force=step == steps)
      if step < steps and preemption.requested():
        ckpt.save(step, state, batch_iter.get_state(), force=True)
        ckpt.close()
        writer.close()
        print(f'Preempted: saved checkpoint {step} in {ckpt.directory}; rerun the same '
              'command to resume.', flush=True)
        return state, {}
  if not eval_metrics:  # resumed after the last step: evaluate what was restored
    eval_metrics = run_eval(steps)
  ckpt.close()
  writer.close()
  return state, eval_metrics
