"""A FIFO memory queue of keys (MoCo), kept in the train state and updated inside the jitted step.

The queue is a logical global array [K, D]: under `jax.jit` it is sharded along the mesh's
`data` axis (each device stores K / n entries), the write of a step's global batch of keys is
one `dynamic_update_slice`, and the loss reads all K entries as extra negatives, so every
device's queries see every device's past keys. Its content is the same for any device count.

K must be a multiple of the global batch B: a write never wraps, and after K / B steps the
queue holds exactly the last K / B batches (He et al. 2020, "Momentum Contrast for
Unsupervised Visual Representation Learning", Algorithm 1: enqueue, dequeue the oldest).
"""

import flax
import jax
import jax.numpy as jnp

from contrastive.losses import l2_normalize

EMPTY = -1  # id of a slot that was never written


@flax.struct.dataclass
class Queue:
  """keys: [K, D] L2-normalised keys (float32, or float64 for reference runs); ids: [K] int32
  example ids (EMPTY = unwritten); ptr: [] int32, the slot of the next write (the oldest
  entries)."""
  keys: jax.Array
  ids: jax.Array
  ptr: jax.Array


def check_queue_size(size, batch_size):
  """Raises ValueError unless the queue size is a positive multiple of the global batch."""
  if size <= 0 or size % batch_size:
    raise ValueError(f'The queue size K={size} must be a positive multiple of the global batch '
                     f'B={batch_size} (each step writes B keys at once); e.g. '
                     f'K={max(1, round(size / batch_size)) * batch_size}.')


def init_queue(size, dim, batch_size, dtype=jnp.float32):
  """An empty queue of `size` slots for `dim`-wide keys of `dtype`, written `batch_size` at a
  time."""
  check_queue_size(size, batch_size)
  return Queue(keys=jnp.zeros((size, dim), dtype),
               ids=jnp.full((size,), EMPTY, jnp.int32), ptr=jnp.zeros((), jnp.int32))


def enqueue(queue, keys, ids):
  """Writes the global batch of keys over the oldest B entries.

  Args:
    queue: Queue with K slots.
    keys: [B, D] keys of this step (any scale: stored L2-normalised, without gradient, in
      the queue's dtype).
    ids: [B] int example ids of the keys (for same-instance masking).

  Returns:
    The new Queue; ptr advances by B modulo K.
  """
  b, k = keys.shape[0], queue.keys.shape[0]
  check_queue_size(k, b)
  keys = l2_normalize(jax.lax.stop_gradient(keys)).astype(queue.keys.dtype)
  new_keys = jax.lax.dynamic_update_slice(queue.keys, keys,
                                          (queue.ptr, jnp.zeros_like(queue.ptr)))  # int32s
  new_ids = jax.lax.dynamic_update_slice(queue.ids, ids.astype(jnp.int32), (queue.ptr,))
  return Queue(keys=new_keys, ids=new_ids, ptr=(queue.ptr + b) % k)


def is_full(queue):
  """True once every slot has been written (K / B steps)."""
  return jnp.all(queue.ids != EMPTY)
