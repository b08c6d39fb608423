"""GradCache: the exact gradient of a global-batch contrastive loss, in micro-batches.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup".
A contrastive loss couples every row of the batch, so plain gradient accumulation (a loss per
micro-batch) changes the objective: fewer negatives. GradCache keeps the global loss and only
splits the encoder's work, all inside the one jitted step:

  1. embed:  e_c = f(params, x_c) for each micro-batch c, without keeping activations
             (`lax.scan`; the embeddings of the global batch are small: [B, D]);
  2. loss:   L(e) over the global batch (dense, blockwise or ring; queue and samplers
             included) and its gradient g = dL/de (plus dL/dparams for what the loss itself
             learns, such as a temperature);
  3. replay: each micro-batch again, grads += vjp(f(., x_c))(g_c), the chain rule
             dL/dparams = sum_c (de_c/dparams)^T g_c.

Augmentations depend only on each row's number in the global batch (`Objective.embed`'s
'index'), so step 3 replays step 1's views exactly, and for towers whose rows do not interact
(ViT, text transformer, LayerNorm heads) the result equals the full-batch gradient up to
summation order. With BatchNorm the towers differ by construction: each micro-batch is
normalised by its own statistics (as in any micro-batched BatchNorm), and the running averages
are updated once per micro-batch, in order.

Peak activation memory is one micro-batch's, at the cost of a second forward pass.
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from contrastive import parallel
from contrastive.objectives import with_index


def check_micro_batch(micro_batch_size, batch_size, num_batch_devices):
  """Raises ValueError unless micro_batch_size splits the batch evenly on every device.

  The global batch B is embedded in B / M micro-batches of M rows, M / n on each of the n
  devices the batch is split over, so M / n must divide each device's B / n rows.
  """
  m, b, n = micro_batch_size, batch_size, num_batch_devices
  if m <= 0 or m % n or b % m:
    raise ValueError(
        f'config.grad_cache.micro_batch_size={m} must be a multiple of the {n} devices the batch '
        f'is split over and divide batch_size={b}, so that each device\'s {b // n} rows split '
        f'evenly; the nearest that does: {_suggest(b, n, m)}.')


def _suggest(b, n, m):
  per_device = b // n
  sizes = [k * n for k in range(1, per_device + 1) if per_device % k == 0]
  return min(sizes, key=lambda s: abs(s - m)) if sizes else n


def _to_chunks(x, n, chunks, sharding):
  """[B, ...] rows split over n devices -> [chunks, B / chunks, ...]: micro-batch c takes the
  c-th block of every device's rows, so no row leaves its device."""
  rest = x.shape[1:]
  m = x.shape[0] // (n * chunks)
  x = x.reshape(n, chunks, m, *rest).swapaxes(0, 1).reshape(chunks, n * m, *rest)
  return jax.lax.with_sharding_constraint(x, sharding) if sharding is not None else x


def _from_chunks(x, n, chunks):
  """Inverse of `_to_chunks`: [chunks, B / chunks, ...] -> [B, ...] in the batch's order."""
  rest = x.shape[2:]
  m = x.shape[1] // n
  return x.reshape(chunks, n, m, *rest).swapaxes(0, 1).reshape(n * chunks * m, *rest)


def value_and_grad(objective, *, micro_batch_size, mesh=None):
  """fn(params, state, batch, rng) -> ((loss, (metrics, batch_stats, keys)), grads) like
  `jax.value_and_grad(objective, has_aux=True)`, computed micro-batch by micro-batch.

  Args:
    objective: an `objectives.Objective` (embed, loss).
    micro_batch_size: M, rows per micro-batch of the global batch (`check_micro_batch`).
    mesh: the step's mesh (the batch's rows are split over its batch axes), or None.
  """
  n = 1 if mesh is None else parallel.batch_size_divisor(dict(mesh.shape))
  chunk_sharding = None
  if mesh is not None:
    axes = parallel.batch_axes(mesh)
    chunk_sharding = NamedSharding(mesh, P(None, axes if len(axes) > 1 else axes[0]))

  def fn(params, state, batch, rng):
    size = jax.tree.leaves(batch)[0].shape[0]
    check_micro_batch(micro_batch_size, size, n)
    chunks = size // micro_batch_size
    rows = jax.tree.map(lambda x: _to_chunks(x, n, chunks, chunk_sharding),
                        with_index(batch, 0, size))

    def embed_one(batch_stats, rows_c):  # 1. no gradient, no activations kept
      emb, const, batch_stats = objective.embed(params, state.replace(batch_stats=batch_stats),
                                                rows_c, rng)
      return batch_stats, (emb, const)

    batch_stats, (emb, const) = jax.lax.scan(embed_one, state.batch_stats, rows)
    emb, const = jax.tree.map(lambda x: _from_chunks(x, n, chunks), (emb, const))

    # 2. the loss over the global batch and its gradient w.r.t. embeddings and parameters
    loss_fn = lambda p, e: objective.loss(p, state, (e, const), batch, rng)
    (loss, (metrics, keys)), (grads, emb_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, emb)
    emb_grads = jax.tree.map(lambda x: _to_chunks(x, n, chunks, chunk_sharding), emb_grads)

    def replay(acc, rows_and_cotangent):  # 3. each micro-batch's vjp, one at a time
      rows_c, cotangent = rows_and_cotangent
      _, vjp = jax.vjp(lambda p: objective.embed(p, state, rows_c, rng)[0], params)
      return jax.tree.map(jnp.add, acc, vjp(cotangent)[0]), None

    grads, _ = jax.lax.scan(replay, grads, (rows, emb_grads))
    return (loss, (metrics, batch_stats, keys)), grads

  return fn
