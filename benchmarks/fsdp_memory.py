r"""Per-device bytes of the train state under the fsdp axis: compiled memory analysis of the
SimCLR step (the default recipe's ResNet at SimCLR's ResNet-50 width is too slow to compile
here, so its ResNet-18 preset, LARS) on 8 CPU devices, meshes data x fsdp = 8x1 ... 1x8.

  python benchmarks/fsdp_memory.py > benchmarks/results/fsdp_memory.jsonl

One JSON line per mesh: the state's bytes, the compiled step's argument bytes per device
(state shard + batch shard) and temporaries, and the ratio to the replicated mesh.
"""

import json
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position

from contrastive import objectives
from contrastive import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from contrastive import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from contrastive import step as step_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from contrastive.losses import nt_xent  # pylint: disable=g-import-not-at-top,wrong-import-position
from contrastive.models import build_model  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  model = build_model(ml_collections.ConfigDict(dict(preset='resnet18', head_hidden_dims=(512,),
                                                     head_out_dim=128)))
  tx, schedule = optim.build_optimizer(ml_collections.ConfigDict(dict(
      name='lars', lr=0.3, scale_lr_by_batch=False, warmup_steps=1, weight_decay=1e-6,
      momentum=0.9, batch_size=64)), total_steps=10)
  aug = ml_collections.ConfigDict(dict(crop_scale=(0.2, 1.0), flip=True, jitter_prob=0.0,
                                       brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                                       gray_prob=0.0, blur_prob=0.0))
  base = None
  for fsdp in (1, 2, 4, 8):
    mesh = parallel.make_mesh([('data', 8 // fsdp), ('fsdp', fsdp)])
    state = step_lib.abstract_state(lambda m=mesh: step_lib.create_train_state(
        model, tx, (16, 16, 3), jax.random.key(0), m), mesh)
    objective = objectives.image_views(model=model, aug_cfg=aug,
                                       loss_fn=lambda a, b: nt_xent(a, b, temperature=0.2))
    step = step_lib.jit_train_step(mesh, state, objective=objective, tx=tx, schedule=schedule)
    batch = {'image': jax.ShapeDtypeStruct((64, 16, 16, 3), jnp.uint8,
                                           sharding=parallel.data_sharding(mesh))}
    mem = step.lower(state, batch, jax.random.key(0)).compile().memory_analysis()
    state_mib = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / 2**20
    args = mem.argument_size_in_bytes / 2**20
    base = base or args
    print(json.dumps(dict(mesh=dict(mesh.shape), state_mib=state_mib, argument_mib=args,
                          temp_mib=mem.temp_size_in_bytes / 2**20,
                          argument_vs_replicated=args / base)), flush=True)


if __name__ == '__main__':
  main()
