"""Device mesh and shardings: the batch is split along the mesh's `data` axis.

Configs give the mesh as data, `config.mesh = [('data', -1)]`, where -1 means "all the
devices the other axes leave" (as in big_vision and maxtext).
"""

import math
import os

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA = 'data'


def mesh_shape(axes, num_devices):
  """Resolves a config mesh [(name, size), ...] with at most one -1 into concrete sizes.

  Raises:
    ValueError: if the sizes don't multiply to num_devices, or there is no `data` axis.
  """
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  if DATA not in names:
    raise ValueError(f'config.mesh={list(axes)} has no {DATA!r} axis; use [("data", -1)].')
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh={list(axes)}: at most one axis may be -1.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if known <= 0 or num_devices % known:
      raise ValueError(f'config.mesh={list(axes)} does not fit {num_devices} devices: the fixed axes '
                       f'({known}) must divide the device count.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'config.mesh={list(axes)} has {math.prod(sizes)} devices but there are '
                     f'{num_devices}; set --config.mesh to sizes that multiply to {num_devices} '
                     'or use -1.')
  return dict(zip(names, sizes))


def make_mesh(axes, devices=None):
  """A Mesh over `devices` (default: all) with the config's named axes."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(axes, len(devices))
  return Mesh(np.asarray(devices).reshape(tuple(shape.values())), tuple(shape))


def data_sharding(mesh):
  """Leading (batch) dimension split over the `data` axis, the rest replicated."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh):
  """Every device holds the whole array (parameters, optimizer state, scalars)."""
  return NamedSharding(mesh, P())


def default_cpu_devices(batch_sizes, *, cores=None, env=None):
  """How many CPU devices to ask for when the user has not chosen: one per core, or fewer.

  XLA runs each CPU convolution on one core, so one process with one CPU device leaves the
  other cores idle; with one device per core the mesh splits the batch over the cores
  (BatchNorm statistics and the loss stay global, and results equal the one-device run's up to
  float32 summation order: tests/test_distributed.py).

  Args:
    batch_sizes: every global batch size the run uses (train, eval): the count divides them all.
    cores: the cores this process may run on (default: its CPU affinity).
    env: environment (default os.environ).

  Returns:
    The largest count <= cores dividing every batch size, or None where the user chose already
    (XLA_FLAGS --xla_force_host_platform_device_count, JAX_NUM_CPU_DEVICES) or only one core.
  """
  env = os.environ if env is None else env
  if ('xla_force_host_platform_device_count' in env.get('XLA_FLAGS', '') or
      env.get('JAX_NUM_CPU_DEVICES')):
    return None
  if cores is None:  # the cores this process may use (Linux), else all (macOS has no affinity)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  count = max(d for d in range(1, max(cores, 1) + 1) if all(b % d == 0 for b in batch_sizes))
  return count if count > 1 else None
