"""Device mesh and shardings: the batch is split along the mesh's `data` and `fsdp` axes,
parameters and optimizer state along `fsdp`.

Configs give the mesh as data, `config.mesh = [('data', -1)]` (every array replicated but the
batch) or e.g. `[('data', 2), ('fsdp', 4)]`, where -1 means "all the devices the other axes
leave" (as in big_vision and maxtext).

FSDP rule (big_vision's `fsdp` sharding rule): each array of the train state (parameters,
optimizer slots, momentum encoder, BatchNorm statistics) is split along its largest dimension
that the `fsdp` axis size divides, and replicated when none does. XLA's partitioner then
gathers each weight where a layer uses it and reduce-scatters its gradient, so per-device
state bytes fall ~1/n with the axis size n while the batch, the losses and the queue stay
global.
"""

import math
import os

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA = 'data'
FSDP = 'fsdp'
AXES = (DATA, FSDP)  # the mesh axes a config may name; the batch is split over both


def mesh_shape(axes, num_devices):
  """Resolves a config mesh [(name, size), ...] with at most one -1 into concrete sizes.

  Raises:
    ValueError: if the sizes don't multiply to num_devices, or there is no `data` axis.
  """
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  if DATA not in names:
    raise ValueError(f'config.mesh={list(axes)} has no {DATA!r} axis; use [("data", -1)].')
  unknown = [n for n in names if n not in AXES] + [n for n in AXES if names.count(n) > 1]
  if unknown:
    raise ValueError(f'config.mesh={list(axes)}: axis {unknown[0]!r} is unknown or repeated; '
                     f'name each of {AXES} at most once.')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh={list(axes)}: sizes must be positive or -1.')
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


def batch_axes(mesh):
  """The mesh axes the batch is split over: ('data',) or ('data', 'fsdp')."""
  return tuple(a for a in AXES if a in mesh.shape)


def batch_size_divisor(shape):
  """Devices the batch is split over, of a `mesh_shape` dict: data x fsdp."""
  return math.prod(shape.get(a, 1) for a in AXES)


def batch_mesh(mesh):
  """The same devices as one `data` axis, in the order the batch is split over them.

  Batch-only computations (the losses' shard_map ring, retrieval, k-means) see one axis;
  their arrays' layout is the same on both meshes, so switching costs no data movement.
  """
  if batch_axes(mesh) == (DATA,):
    return mesh
  return Mesh(mesh.devices.reshape(-1), (DATA,))


def data_sharding(mesh):
  """Leading (batch) dimension split over the batch axes (`data`, `fsdp`), the rest
  replicated."""
  axes = batch_axes(mesh)
  return NamedSharding(mesh, P(axes if len(axes) > 1 else DATA))


def fsdp_spec(shape, size):
  """PartitionSpec of one state array of `shape` under the FSDP rule: its largest dimension
  divisible by the fsdp axis size (the first such on ties) along `fsdp`; P() when none is."""
  if size <= 1:
    return P()
  dims = [i for i, d in enumerate(shape) if d % size == 0 and d >= size]
  if not dims:
    return P()
  dim = max(dims, key=lambda i: (shape[i], -i))
  return P(*([None] * dim + [FSDP]))


def fsdp_shardings(mesh, tree):
  """NamedShardings of `tree`'s arrays (anything with .shape) under the FSDP rule; replicated
  everywhere when the mesh has no fsdp axis."""
  size = mesh.shape.get(FSDP, 1)
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, size)), tree)


def unsharded_by_fsdp(mesh, params):
  """['name [shape]', ...] of the parameters the fsdp axis divides no dimension of (they stay
  replicated; scalars are not listed), for the start-up log; [] without an fsdp axis."""
  size = mesh.shape.get(FSDP, 1)
  if size <= 1:
    return []
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [f'{jax.tree_util.keystr(path, simple=True, separator="/")} {list(x.shape)}'
          for path, x in flat if x.ndim and fsdp_spec(x.shape, size) == P()]


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
