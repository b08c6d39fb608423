"""The SigLIP emoji recipe's jitted step on fixed random inputs of its shapes: what the worker
processes of `grad_cache.py` and `bf16_step.py` time. Import it after the worker has set its
CPU device count."""

import os

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def build(config_file='siglip_emoji.py', **overrides):
  """(state, jitted step, sharded batch, compiled memory analysis) of configs/`config_file`
  with `overrides` (dotted field -> value, e.g. {'batch_size': 256, 'dtype': 'bfloat16'}).
  The batch has every field the config adds (`recipes.two_tower.batch_fields`), random tokens."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from contrastive import config_lib  # pylint: disable=g-import-not-at-top
  from contrastive import parallel  # pylint: disable=g-import-not-at-top
  from contrastive.data import mixture  # pylint: disable=g-import-not-at-top
  from contrastive.data import pair_batches  # pylint: disable=g-import-not-at-top
  from contrastive.recipes import two_tower  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config(os.path.join(ROOT, 'configs', config_file))
  for field, value in overrides.items():
    *parents, name = field.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[name] = value
  mesh = parallel.make_mesh(config.mesh)
  specs = [pair_batches.SPECS[name] for name, _ in mixture.part_configs(config.dataset)]
  settings = two_tower.settings(config)
  inputs = two_tower.example_inputs(config, specs[0])
  _, state, step = two_tower.step(settings, mesh, inputs, 1000, jax.random.key(0))
  rng = np.random.default_rng(0)
  b = config.batch_size
  runs = settings.query_runs or ((0, b, not specs[0].a_is_image),)
  special = {'a_is_text': np.concatenate([np.full(e - s, t) for s, e, t in runs]),
             'task': np.concatenate([np.full(e - s, k) for k, (s, e, _) in enumerate(runs)]),
             'id': np.arange(b), 'b_hard_id': np.arange(b, 2 * b),
             'truncated': np.zeros(b)}
  batch = {}
  for name, (shape, dtype) in two_tower.batch_fields(settings, inputs, specs).items():
    if name in special:
      value = np.broadcast_to(special[name].reshape(b, *[1] * len(shape)), (b, *shape))
    elif dtype == np.uint8:
      value = rng.integers(0, 256, (b, *shape))
    elif dtype == np.bool_:
      value = np.ones((b, *shape))
    else:  # tokens
      value = rng.integers(3, config.tokenizer.vocab_size, (b, *shape))
    batch[name] = np.asarray(value, dtype)
  batch = jax.device_put(batch, parallel.data_sharding(mesh))
  memory = step.lower(state, batch, jax.random.key(0)).compile().memory_analysis()
  return state, step, batch, memory
