"""Entry point: python -m contrastive.main --config configs/simclr_fmnist.py --workdir DIR.

Multi-process (one process per host, the same command on every host): see
contrastive/distributed.py and launch/. Local example, 2 CPU processes:

  python -m contrastive.main --config ... --workdir DIR --coordinator_address=127.0.0.1:12345 \
      --num_processes=2 --process_id=0   # and --process_id=1 in a second shell
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from contrastive import distributed
from contrastive import mcl
from contrastive import parallel
from contrastive import train

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
config_flags.DEFINE_config_file('config', None, 'Config file (path[:variants]).', lock_config=True)
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', distributed.MODES,
                                 'jax.distributed: auto-detect, always (TPU pods) or never.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s rank.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  multi_process = distributed.initialize(
      _DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  config = flags.FLAGS.config
  cpu_devices = None if multi_process else parallel.default_cpu_devices(
      [config.batch_size, config.eval.batch_size])
  if cpu_devices:  # before any backend starts; TPU/GPU backends are unaffected
    jax.config.update('jax_num_cpu_devices', cpu_devices)
  if config.get('mcl', {}).get('stages', 1) > 1:
    mcl.train_stages(config, _WORKDIR.value)
  else:
    train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
