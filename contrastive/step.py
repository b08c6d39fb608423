"""The train state and the one jitted, sharded train step of every recipe family (SimCLR, MoCo
v2/v3, two towers): `update` applies a family's objective (contrastive/objectives.py), which
its recipe (contrastive/recipes/) builds.

The step sees the global batch as one logical array split along the mesh's `data` axis, so
its in-batch negatives, its BatchNorm statistics and its memory queue are global: each device's
queries meet every device's keys inside this one compiled function.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from contrastive import faults
from contrastive import grad_cache
from contrastive import parallel
from contrastive.models import heads
from contrastive.samplers import momentum as momentum_lib
from contrastive.samplers import dyce as dyce_lib
from contrastive.samplers import queue as queue_lib


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes. Replicated over the mesh, or split along its fsdp
  axis (`state_shardings`); the queue is split along the batch axes.

  With the data iterator's state (saved beside it) and the step rng, fold_in(seed, step),
  this is all that the next step depends on, so a restored run continues bit for bit.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  skipped_steps: jax.Array  # updates dropped for a non-finite loss/gradient (nonfinite='skip')
  ema_params: Any = None  # the momentum encoder (MoCo), or None
  ema_batch_stats: Any = None
  queue: queue_lib.Queue | None = None  # MoCo's memory of past keys, or None
  mined: Any = None  # [N, K] int32 corpus-mined hard negatives of each training row, or None
  # (contrastive/negatives/corpus_index.py: refreshed by the loop, saved with the state)
  composition: Any = None  # the batch plan's clusters [N] or neighbours [N, k] of the current
  # period (contrastive/batching/periodic.py), or None
  skipped_samples: Any = None  # [] int32: unusable samples the loader replaced so far (the
  # batches' 'skipped' rows summed: webdataset shards), or None
  static_bank: Any = None  # SPN4CIR's bank {'b': [M, D], 'b_ids': [M, 2], ...} of frozen
  # embeddings, split along the batch axes (contrastive/negatives/static_bank.py), or None
  static_topk: Any = None  # [N, k] int32 each training row's mined bank entries, or None
  dyce: dyce_lib.DyCE | None = None  # BECLR's clustered memory of past keys, or None


def create_train_state(model, tx, image_shape, rng, mesh, *, inputs=None, ema=False,
                       queue_size=0, batch_size=0, dtype=jnp.float32, dyce=None):
  """Initialises the state directly with its shardings.

  Args:
    image_shape: [H, W, C] of the image-views family's inputs (model.init sees a [2, H, W, C]
      uint8 batch); ignored with `inputs`.
    inputs: example inputs of another family's model, e.g. (images, tokens) for a two-tower
      model; model.init(rng, *inputs, train=False).
    ema: also keep a momentum encoder, initialised as a copy of the online one.
    queue_size: K > 0 adds an empty memory queue of K keys, written batch_size at a time.
    dyce: None, or (M, P): an empty DyCE memory of M keys and P prototypes (BECLR).
    dtype: of every float leaf (params, BatchNorm statistics, optimizer slots, queue):
      float32, or float64 (under jax_enable_x64) for reference runs whose results must not
      depend on the order of float32 sums, such as the tests across device counts.
  """
  if queue_size:
    queue_lib.check_queue_size(queue_size, batch_size)

  def init(rng):
    example = inputs or (jnp.zeros((2, *image_shape), jnp.uint8),)
    variables = model.init(rng, *example, train=False)
    params, batch_stats = jax.tree.map(lambda x: x.astype(dtype),  # all floats (flax: float32)
                                       (variables['params'], variables.get('batch_stats', {})))
    width = heads.embedding_dim(model.head) if queue_size or dyce else None
    queue = (queue_lib.init_queue(queue_size, width, batch_size, dtype=dtype)
             if queue_size else None)
    memory = (dyce_lib.init_dyce(dyce[0], width, dyce[1], batch_size, dtype=dtype)
              if dyce else None)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), skipped_steps=jnp.zeros((), jnp.int32),
                      ema_params=params if ema else None,
                      ema_batch_stats=batch_stats if ema else None, queue=queue, dyce=memory)

  shardings = state_shardings(mesh, jax.eval_shape(init, rng))
  return jax.jit(init, out_shardings=shardings)(rng)


def abstract_state(make_state, mesh):
  """The state `make_state()` would create, as ShapeDtypeStructs with their shardings
  (`state_shardings`): its structure without allocating it, e.g. to compile for devices this
  process does not have (contrastive/aot.py)."""
  shapes = jax.eval_shape(make_state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, state_shardings(mesh, shapes))


def state_shardings(mesh, state):
  """The FSDP rule (`parallel.fsdp_shardings`: replicated without an fsdp axis) for every
  array, except the queue's keys and ids and the static bank: split along the batch axes, and
  the loop's tables (mined negatives, batch composition, the bank's top-k): replicated (every
  process reads them whole)."""
  repl = parallel.replicated(mesh)
  shardings = parallel.fsdp_shardings(mesh, state)
  for field in ('mined', 'composition', 'static_topk'):
    if getattr(state, field) is not None:
      shardings = shardings.replace(**{field: repl})
  if state.static_bank is not None:
    data = parallel.data_sharding(mesh)
    shardings = shardings.replace(static_bank=jax.tree.map(lambda _: data, state.static_bank))
  if state.queue is not None:
    data = parallel.data_sharding(mesh)
    shardings = shardings.replace(queue=queue_lib.Queue(keys=data, ids=data, ptr=repl))
  if state.dyce is not None:
    data = parallel.data_sharding(mesh)
    shardings = shardings.replace(dyce=dyce_lib.DyCE(keys=data, labels=data, prototypes=repl,
                                                     ptr=repl, count=repl, ready=repl))
  return shardings


def update(state, batch, rng, *, objective, tx, schedule, nonfinite='error', momentum=None,
           micro_batch_size=0, mesh=None, fsdp=None, memory_update=None):
  """One optimizer update on the global batch; what every recipe family shares.

  Args:
    state: TrainState.
    batch: the family's batch (global arrays sharded along the data axis).
    rng: key for this step.
    objective: fn(params, state, batch, rng) -> (loss, (metrics, batch_stats, keys)), the
      recipe family's loss (contrastive/objectives.py); `keys` are enqueued if the state has a
      queue.
    nonfinite: 'error' applies every update (the loop raises when `finite` is false); 'skip'
      keeps the whole state unchanged when the loss, a gradient or any array of the new state
      is NaN/inf, and counts the step in `skipped_steps`.
    momentum: the momentum encoder's schedule fn(step) (with ema_params), or None.
    micro_batch_size: > 0 computes the same gradient with GradCache (contrastive/grad_cache.py),
      embedding that many rows at a time (`objective` must be an `objectives.Objective`);
      `mesh`: the step's mesh, which the batch's rows are split over.
    fsdp: None, or (gathered, sharded) shardings of the parameters (`jit_train_step` sets them
      on a mesh with an fsdp axis): the objective sees the parameters gathered (all-gathered
      once per step, so activations stay split by batch rows over every device, ZeRO-3 style)
      and their gradient is reduce-scattered back to the sharded layout of the optimizer.
    memory_update: fn(dyce, keys, rng) -> dyce, BECLR's memory update (with state.dyce).

  Returns:
    (new state, metrics): loss, the objective's metrics, lr, l2_grads, l2_params,
    skipped_steps, finite (loss, gradients and the whole new state are finite) and momentum
    (with a momentum encoder).
  """
  if micro_batch_size:
    value_and_grad = grad_cache.value_and_grad(objective, micro_batch_size=micro_batch_size,
                                               mesh=mesh)
  else:
    value_and_grad = jax.value_and_grad(objective, has_aux=True)
  params = state.params
  if fsdp is not None:
    params = jax.lax.with_sharding_constraint(params, fsdp[0])
  (loss, (metrics, batch_stats, keys)), grads = value_and_grad(params, state, batch, rng)
  if fsdp is not None:
    grads = jax.lax.with_sharding_constraint(grads, fsdp[1])
  with jax.named_scope('optimizer'):  # names its ops in profiles (benchmarks/step_profile.py)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
  new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                      opt_state=opt_state)
  if state.ema_params is not None:
    m = momentum(state.step)
    new = new.replace(ema_params=momentum_lib.ema_update(state.ema_params, params, m),
                      ema_batch_stats=momentum_lib.ema_update(state.ema_batch_stats,
                                                              batch_stats, m))
    metrics = dict(metrics, momentum=m)
  if state.queue is not None:
    new = new.replace(queue=queue_lib.enqueue(state.queue, keys, batch['id']))
  if state.dyce is not None:
    new = new.replace(dyce=memory_update(state.dyce, keys, jax.random.fold_in(rng, 1)))
  # The whole new state is checked, not only loss and gradients: a finite step can still
  # overflow a BatchNorm variance or an optimizer moment.
  ok = faults.all_finite(loss, grads, new)
  skipped = state.skipped_steps
  if nonfinite == 'skip':
    new = faults.keep_if_finite(ok, new, state.replace(step=state.step + 1))
    skipped = skipped + jnp.where(ok, 0, 1).astype(skipped.dtype)
  new = new.replace(skipped_steps=skipped)
  if state.skipped_samples is not None:  # counted whether or not the update was kept
    new = new.replace(skipped_samples=state.skipped_samples + jnp.sum(batch['skipped']))
    metrics = dict(metrics, skipped_samples=new.skipped_samples)
  metrics = dict(metrics, loss=loss, lr=schedule(state.step), skipped_steps=skipped, finite=ok,
                 l2_grads=optax.tree.norm(grads), l2_params=optax.tree.norm(new.params))
  return new, metrics


def jit_train_step(mesh, state, step_fn=update, **step_kwargs):
  """step_fn (`update`, with a recipe's objective in step_kwargs) under jax.jit with explicit
  shardings; the state's buffers are donated. With `micro_batch_size` (GradCache), the step
  gets the mesh too; with an fsdp axis, the parameters' gathered and sharded layouts."""
  if step_kwargs.get('micro_batch_size'):
    step_kwargs['mesh'] = mesh
  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  shardings = state_shardings(mesh, state)
  if mesh.shape.get(parallel.FSDP, 1) > 1:
    step_kwargs['fsdp'] = (jax.tree.map(lambda _: repl, shardings.params), shardings.params)
  return jax.jit(functools.partial(step_fn, **step_kwargs),
                 in_shardings=(shardings, data, repl),
                 out_shardings=(shardings, repl),
                 donate_argnums=(0,))
