"""`composed_loader`: a plan's global batches read as `pipeline.train_loader` reads its shuffle.

The dataset is `grain.MapDataset.range` over global steps: step s -> the plan's global batch
of s -> this process's rows [p b, (p + 1) b) of it -> the records, stacked as train_loader
stacks them. The grain iterator's state is the next step, so `get_state()` / `set_state()`
(stored with a checkpoint) resume the stream exactly, and any number of processes see the
single-process batches (with the mesh's devices in process order, as in train_loader).
"""

import sys

import grain
import jax
import numpy as np

from contrastive.data import pipeline


def process_slice(rows, process_index, process_count):
  """Process `process_index`'s share of a global batch: rows [p b, (p + 1) b), b = B / P."""
  b = len(rows) // process_count
  return rows[process_index * b:(process_index + 1) * b]


def check_loader(plan, num_rows, global_batch_size, seed, process_count):
  """Raises ValueError if the plan, the dataset, the seed and the process count do not fit."""
  if not 0 <= int(seed) < 2**32:
    raise ValueError(f'seed must be in [0, 2**32) (as grain shuffle seeds); got {seed}.')
  if not hasattr(plan, 'rows'):
    raise ValueError(f'plan must have rows(step, seed) (batching.plan(...)); got {plan!r}: wrap '
                     'a function (epoch, seed) -> [S, B] in EpochPlan(fn, steps_per_epoch=S, '
                     'global_batch_size=B).')
  if getattr(plan, 'global_batch_size', global_batch_size) != global_batch_size:
    raise ValueError(f'the plan composes batches of {plan.global_batch_size} rows; '
                     f'global_batch_size is {global_batch_size}.')
  plan_rows = getattr(plan, 'num_rows', None)
  if plan_rows is not None and plan_rows != num_rows:
    raise ValueError(f'the plan is for {plan_rows} rows; the source has {num_rows}.')
  if global_batch_size > num_rows:
    raise ValueError(f'global_batch_size {global_batch_size} is larger than the dataset '
                     f'({num_rows} rows).')
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} must be divisible by the process '
                     f'count {process_count}.')


def composed_loader(source, plan, *, global_batch_size, seed, prefetch=2):
  """An endless, seeded grain dataset of this process's share of each of `plan`'s global batches.

  Args:
    source: a random-access source with `__getitems__` (as for train_loader).
    plan: `batching.plan(...)`, an `EpochPlan`, or any object with rows(step, seed) -> [B] ints.
    global_batch_size: B, divisible by the process count.
    seed: int, passed to the plan: the batch of step s is a pure function of (seed, s).
    prefetch: grain's prefetch buffer (batches read ahead); 0 reads each batch in the calling
      thread when it is asked for (a plan recomputed from the training state: periodic.py).

  Returns:
    grain.IterDataset of stacked records with b = B / process_count rows; `iter(...)` has
    get_state() / set_state(). With plan('random', ...) the batches are train_loader's.
  """
  num_processes, index = jax.process_count(), jax.process_index()
  check_loader(plan, len(source), global_batch_size, seed, num_processes)
  stack = pipeline._stack  # pylint: disable=protected-access  # train_loader's own stacking
  batches = (grain.MapDataset.range(sys.maxsize)
             .map(lambda step: process_slice(plan.rows(step, seed), index, num_processes))
             .map(lambda idx: stack(source.__getitems__(idx))))
  return batches.to_iter_dataset(grain.ReadOptions(num_threads=1 if prefetch else 0,
                                                   prefetch_buffer_size=prefetch))


def global_rows(plan, seed, steps):
  """The global batches of steps [0, steps) as one [steps, B] array (for inspection)."""
  return np.stack([plan.rows(s, seed) for s in range(steps)])
