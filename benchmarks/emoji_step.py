"""The SigLIP emoji recipe's jitted step on fixed random inputs of its shapes: what the worker
processes of `grad_cache.py` and `bf16_step.py` time. Import it after the worker has set its
CPU device count and put the repository on sys.path."""

import os

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def build(**overrides):
  """(state, jitted step, sharded batch, compiled memory analysis) of configs/siglip_emoji.py
  with `overrides` (dotted field -> value, e.g. {'batch_size': 256, 'dtype': 'bfloat16'})."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from contrastive import config_lib  # pylint: disable=g-import-not-at-top
  from contrastive import parallel  # pylint: disable=g-import-not-at-top
  from contrastive import two_tower_recipe  # pylint: disable=g-import-not-at-top
  from contrastive.data import pair_batches  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config(os.path.join(ROOT, 'configs', 'siglip_emoji.py'))
  for field, value in overrides.items():
    *parents, name = field.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[name] = value
  mesh = parallel.make_mesh(config.mesh)
  inputs = two_tower_recipe.example_inputs(config, pair_batches.SPECS['emoji_cldr'])
  _, state, step = two_tower_recipe.step(config, mesh, inputs, 1000, jax.random.key(0))
  rng = np.random.default_rng(0)
  b = config.batch_size
  batch = {'a': rng.integers(0, 256, (b, *inputs[0].shape[1:]), dtype=np.uint8),
           'b': rng.integers(3, config.tokenizer.vocab_size, (b, inputs[1].shape[1]),
                             dtype=np.int32),
           'id': np.arange(b, dtype=np.int32), 'truncated': np.zeros(b, np.int32)}
  batch = jax.device_put(batch, parallel.data_sharding(mesh))
  memory = step.lower(state, batch, jax.random.key(0)).compile().memory_analysis()
  return state, step, batch, memory
