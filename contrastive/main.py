"""Entry point: python -m contrastive.main --config configs/simclr_fmnist.py --workdir DIR.

Multi-process (one process per host, the same command on every host): see
contrastive/distributed.py and launch/. Local example, 2 CPU processes:

  python -m contrastive.main --config ... --workdir DIR --coordinator_address=127.0.0.1:12345 \
      --num_processes=2 --process_id=0   # and --process_id=1 in a second shell
"""

import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from contrastive import checkpoint
from contrastive import distributed
from contrastive import mcl
from contrastive import parallel
from contrastive import train
from contrastive import workdir
from contrastive.config_lib import ConfigError
from contrastive.data import fashion_mnist
from contrastive.data import pairs
from contrastive.data import webdataset_loader

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
config_flags.DEFINE_config_file('config', None, 'Config file (path[:variants]).', lock_config=True)
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', distributed.MODES,
                                 'jax.distributed: auto-detect, always (TPU pods) or never.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s rank.')
flags.mark_flags_as_required(['config', 'workdir'])


# Mistakes with a one-line fix: reported without a traceback, wherever they are raised (the
# checks before compiling, or later ones that need the data or another workdir).
USER_ERRORS = (ConfigError, workdir.WorkdirError, workdir.WorkdirLockedError,
               fashion_mnist.MissingDatasetError, checkpoint.CheckpointError,
               train.NonFiniteLossError, webdataset_loader.SkippedSamplesError,
               pairs.PairsDataError)


def _exit_on_error(error):
  """Reports `error` in one final line (with the traceback unless it is a USER_ERRORS one) and
  ends the process at once: orbax's and asyncio's threads must not keep a failed job alive."""
  if not isinstance(error, USER_ERRORS + (KeyboardInterrupt, OSError)):
    traceback.print_exception(error, limit=-10, chain=False, file=sys.stderr)
  message = str(error).strip().splitlines()[0] if str(error).strip() else ''
  print(f'ERROR: {type(error).__name__}: {message}', file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(130 if isinstance(error, KeyboardInterrupt) else 1)  # pylint: disable=protected-access


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    run(flags.FLAGS.config, _WORKDIR.value)
  except BaseException as e:  # pylint: disable=broad-except
    if isinstance(e, SystemExit):
      raise
    _exit_on_error(e)


def run(config, workdir_path):
  """Starts jax.distributed if needed, picks the CPU device count and trains `config`."""
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if distributed.cpu_only_platform():  # no libtpu probing (and its errors) on a CPU host
    jax.config.update('jax_platforms', 'cpu')
  multi_process = distributed.initialize(
      _DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  cpu_devices = None if multi_process else parallel.default_cpu_devices(
      [config.batch_size, config.eval.batch_size])
  if cpu_devices:  # before any backend starts; TPU/GPU backends are unaffected
    jax.config.update('jax_num_cpu_devices', cpu_devices)
  if config.get('mcl', {}).get('stages', 1) > 1:
    mcl.train_stages(config, workdir_path)
  else:
    train.train_and_evaluate(config, workdir_path)


if __name__ == '__main__':
  if set(sys.argv[1:]) & {'--help', '-h', '-?', '--helpshort'}:  # absl's help flags exit 1
    app.usage(shorthelp=True, exitcode=0)
  app.run(main)
