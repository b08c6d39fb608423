"""Multi-process start-up: `jax.distributed.initialize` from flags, or from the cluster's env.

One process per host (TPU VM worker, GPU node or local CPU process); every process runs the
same command. Call `initialize` before anything touches a jax backend.

  explicit:  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
  auto:      SLURM (srun with > 1 task), Open MPI (mpirun) or JAX_COORDINATOR_ADDRESS in the
             environment: jax's own cluster detection fills in the rest
  on:        always call jax.distributed.initialize() (Cloud TPU pods, whose workers are found
             through the TPU metadata server rather than environment variables)
  off / a single process with no cluster: nothing happens.
"""

import glob
import os

import jax

MODES = ('auto', 'on', 'off')
# Device files of the accelerators jax has backends for: TPU (v2-v4 /dev/accel*, v5e and later
# through VFIO) and NVIDIA GPUs.
ACCELERATOR_FILES = ('/dev/accel*', '/dev/vfio/[0-9]*', '/dev/nvidia[0-9]*')


def cpu_only_platform(env=None, find=glob.glob):
  """'cpu' when this host has no accelerator device file and the user has not named the
  platforms (JAX_PLATFORMS), else None.

  Selecting the CPU platform before any backend starts keeps jax from probing libtpu, which
  (installed for `contrastive.aot`) prints "unexpected worker hostname" errors on every start
  of a host without a TPU.
  """
  env = os.environ if env is None else env
  if env.get('JAX_PLATFORMS') or any(find(pattern) for pattern in ACCELERATOR_FILES):
    return None
  return 'cpu'


def detect_cluster(env=None):
  """The multi-process launcher this process runs under ('slurm', 'ompi', 'env'), or None."""
  env = os.environ if env is None else env
  if int(env.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_PROCID' in env:
    return 'slurm'
  if 'OMPI_MCA_orte_hnp_uri' in env:
    return 'ompi'
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return 'env'
  return None


def initialize(mode='auto', *, coordinator_address=None, num_processes=None, process_id=None,
               env=None):
  """Starts jax's distributed runtime when this is a multi-process job; returns True if it did.

  Args:
    mode: 'auto' (explicit arguments, else a detected cluster, else single-process), 'on'
      (always initialise; jax detects TPU pods, SLURM, MPI, Kubernetes), 'off' (never).
    coordinator_address: 'host:port' of process 0; with num_processes and process_id it
      bypasses detection (local CPU processes, any cluster jax doesn't know).
    num_processes, process_id: the job's size and this process's rank.
    env: environment to inspect (default os.environ).
  """
  if mode not in MODES:
    raise ValueError(f'--distributed={mode!r} is unknown; choose one of {MODES}.')
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise ValueError('Set all of --coordinator_address, --num_processes and --process_id, or '
                     'none of them.')
  if mode == 'off' or (mode == 'auto' and coordinator_address is None
                       and detect_cluster(env) is None):
    return False
  if coordinator_address is not None and num_processes == 1:
    return False
  # CPU processes exchange collectives through gloo (no effect on TPU/GPU backends).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  print(f'jax.distributed: process {jax.process_index()} of {jax.process_count()}, '
        f'{jax.local_device_count()} local / {jax.device_count()} global devices', flush=True)
  return True
