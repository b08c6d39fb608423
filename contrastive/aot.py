r"""Compile a config's full train step for a TPU topology on this machine, without TPUs.

  python -m contrastive.aot --config configs/siglip_emoji.py:pod --topology v5e:16x16
  python -m contrastive.aot --config configs/simclr_fmnist.py:resnet50 --topology v4:2x2x4 \
      --config.grad_cache.micro_batch_size=512

`libtpu` from PyPI (requirements-tpu.txt: jax[tpu] at the pinned jax, not part of the CPU
install) describes any TPU topology: `jax.experimental.topologies.get_topology_desc` gives its
devices, the config's mesh is built over them, and the step is lowered with
`jax.ShapeDtypeStruct` inputs carrying their shardings (nothing is allocated) and compiled by
XLA:TPU. The compiled executable's `memory_analysis()` gives each chip's bytes (arguments,
outputs, temporaries, code) and `cost_analysis()` its FLOPs per step.

Prints one table and one JSON line; exits 0 when the step fits a chip's HBM, 1 when it does
not, 2 for bad input (unknown topology, invalid config, libtpu missing). The launch scripts'
`--dry-run` runs this first (launch/tpu_pod.sh).
"""

import os

# Before jax starts: with libtpu installed but no TPU attached, the TPU backend would try to
# start (and warn at length); the topology is described without it.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Only a description of the chips is loaded, no TPU is claimed: several checks may run at once.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from contrastive import aot_report  # pylint: disable=g-import-not-at-top,wrong-import-position

_TOPOLOGY = flags.DEFINE_string('topology', None, 'TPU topology, e.g. v5e:4x4, v4:2x2x4.')
config_flags.DEFINE_config_file('config', None, 'Config file (path[:variants]).', lock_config=True)
flags.mark_flags_as_required(['config', 'topology'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    report = aot_report.compile_for_topology(flags.FLAGS.config, _TOPOLOGY.value)
  except aot_report.AotInputError as e:
    print(f'ERROR: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  print(aot_report.format_table([report]), flush=True)
  print(json.dumps(report), flush=True)
  if not report['fits']:
    print(f'ERROR: the step needs {report["total_gib"]:.2f} GiB per device (XLA: '
          f'{report.get("xla_error", "memory analysis")}), more than the '
          f'{report["hbm_gib"]:g} GiB of a {report["chip"]} device: lower the batch size, add '
          '--config.grad_cache.micro_batch_size, an fsdp mesh axis, bfloat16 or remat.',
          file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
