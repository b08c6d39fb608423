"""Time of the SimCLR and MoCo train steps with and without each negative sampler.

One JSON line per variant: the median wall time of --repeats jitted steps (after two warm-up
calls, the first compiling) of the default recipe's model at batch --batch_size on this
machine's devices, and its ratio to the baseline of the same method measured in the same run.
The variants are compiled first, then timed in interleaved rounds (one step of each per
round), so a slow drift of a shared machine does not favour one of them:

  python benchmarks/step_overhead.py >> benchmarks/results/step_overhead.jsonl

Variants are config variants (configs/*.py:VARIANTS), so the measured step is the one
`contrastive.main` runs. The acceptance target: MoCo + queue + mining + MoCHi within 10% of
MoCo + queue alone.
"""

import argparse
import json
import os
import statistics
import time

import jax
import ml_collections
import numpy as np

from contrastive import config_lib
from contrastive import objectives
from contrastive import optim
from contrastive import parallel
from contrastive import step as step_lib
from contrastive import validate
from contrastive.losses import pair_loss_from_config
from contrastive.models import build_model
from contrastive.recipes import image_views

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs')
# (name, config file, variants, baseline name)
VARIANTS = [
    ('simclr', 'simclr_fmnist.py', '', 'simclr'),
    ('simclr+mining', 'simclr_fmnist.py', 'mining', 'simclr'),
    ('simclr+mochi', 'simclr_fmnist.py', 'mochi', 'simclr'),
    ('moco_v2', 'moco_v2_fmnist.py', '', 'moco_v2'),
    ('moco_v2+mining', 'moco_v2_fmnist.py', 'mining', 'moco_v2'),
    ('moco_v2+mochi', 'moco_v2_fmnist.py', 'mochi', 'moco_v2'),
    ('moco_v2+mining+mochi', 'moco_v2_fmnist.py', 'mining,mochi', 'moco_v2'),
    ('moco_v2+ft', 'moco_v2_fmnist.py', 'ft', 'moco_v2'),
    ('moco_v2+threshold', 'moco_v2_fmnist.py', 'threshold', 'moco_v2'),
    ('moco_v2+gist', 'moco_v2_fmnist.py', 'gist', 'moco_v2'),
    ('moco_v3', 'moco_v3_fmnist.py', '', 'moco_v3'),
]


def build_variant(config_file, variants, batch_size):
  """A function run(i) that runs train step i of the config at batch_size (synthetic 28x28
  images) and returns its wall time in seconds; run.hlo_text() is the compiled step's HLO."""
  config = config_lib.load_config(os.path.join(CONFIGS, config_file), variants)
  config.batch_size = batch_size
  config.dataset.name = 'not_local'  # no data is read: skip the dataset check
  validate.validate_config(config, num_devices=jax.device_count(), num_processes=1)
  mesh = parallel.make_mesh(config.mesh)
  model = build_model(config.model)
  tx, schedule = optim.build_optimizer(
      ml_collections.ConfigDict(dict(config.optimizer, batch_size=batch_size)), 1000)
  method = image_views.method(image_views.settings(config), steps=1000,
                              steps_per_epoch=60000 / batch_size)
  state = step_lib.create_train_state(model, tx, (28, 28, 1), jax.random.key(0), mesh,
                                      ema=bool(image_views.settings(config).momentum_base),
                                      queue_size=config.queue_size, batch_size=batch_size)
  objective = objectives.image_views(
      model=model, aug_cfg=config.augment, method=method,
      loss_fn=pair_loss_from_config(config.loss, mesh=mesh))
  step = step_lib.jit_train_step(mesh, state, objective=objective, tx=tx, schedule=schedule,
                                 momentum=method.momentum if method else None)
  rng = np.random.default_rng(0)
  holder = [state]

  def run(i):
    batch = {'image': rng.integers(0, 256, (batch_size, 28, 28, 1), np.uint8),
             'id': np.arange(i * batch_size, (i + 1) * batch_size, dtype=np.int32)}
    batch = jax.device_put(batch, parallel.data_sharding(mesh))
    start = time.perf_counter()
    holder[0], metrics = step(holder[0], batch, jax.random.key(i))
    jax.block_until_ready((holder[0], metrics))
    return time.perf_counter() - start

  def hlo_text():
    """The optimized HLO of the compiled step (instruction names as the profiler's events)."""
    batch = {'image': np.zeros((batch_size, 28, 28, 1), np.uint8),
             'id': np.zeros((batch_size,), np.int32)}
    batch = jax.device_put(batch, parallel.data_sharding(mesh))
    return step.lower(holder[0], batch, jax.random.key(0)).compile().as_text()

  run.hlo_text = hlo_text
  return run


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch_size', type=int, default=512)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--variants', default=','.join(v[0] for v in VARIANTS))
  args = p.parse_args(argv)
  chosen = [v for v in VARIANTS if v[0] in set(args.variants.split(','))]
  runs, times = {}, {}
  for name, config_file, variants, _ in chosen:  # compile (first call) and warm up (second)
    runs[name] = build_variant(config_file, variants, args.batch_size)
    times[name] = [runs[name](0), runs[name](1)]
  for i in range(args.repeats):  # interleaved rounds: slow drifts of the machine hit all alike
    for name, *_ in chosen:
      times[name].append(runs[name](2 + i))
  medians = {name: statistics.median(t[2:]) for name, t in times.items()}
  for name, config_file, variants, baseline in chosen:
    base = medians.get(baseline)
    print(json.dumps(dict(
        variant=name, config=f'{config_file}:{variants}', batch=args.batch_size,
        devices=jax.device_count(), time_s=round(medians[name], 4),
        times_s=[round(t, 4) for t in times[name]], baseline=baseline,
        ratio=None if base is None else round(medians[name] / base, 4))), flush=True)

if __name__ == '__main__':
  main()
