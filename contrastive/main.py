"""Entry point: python -m contrastive.main --config configs/simclr_fmnist.py --workdir DIR."""

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

from contrastive import train

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
config_flags.DEFINE_config_file('config', None, 'Config file (path[:variants]).', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  train.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
