"""Per-device memory and FLOPs of SigLIP's loss with SPN4CIR's static bank
(contrastive/negatives/static_bank.py), from XLA's compiled program: nothing is allocated or run.

The loss and its gradient (w.r.t. both towers' rows) are compiled for `--devices` virtual CPU
devices with the bank split along the batch axis, as `TrainState.static_bank` is, and abstract
inputs, so a 1M x 128 bank costs no memory here. One JSON line per configuration:

  python benchmarks/static_bank_memory.py >> benchmarks/results/static_bank_memory.jsonl

Fields: batch B, bank M, dim D, devices n, path ('ring' / 'all_gather' blockwise with
block_size, or 'dense'), topk (0: the whole bank), bank_mib_per_device (M D 4 / n plus the ids'
M 8 / n), xla_argument_mib / xla_temp_mib (per device: the inputs, the bank included, and the
scratch), bank_gmac (B M' D multiply-adds per matmul pass over the bank's M' columns, M or B k
with topk, all devices together: XLA's cost analysis counts a loop's body once, so it is
computed here) and compile_s.
"""

import argparse
import json
import os
import sys
import time


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--batch', type=int, default=32768)
  parser.add_argument('--bank', type=int, default=1 << 20)
  parser.add_argument('--dim', type=int, default=128)
  parser.add_argument('--block_size', type=int, default=1024)
  parser.add_argument('--paths', default='ring,all_gather,topk4,dense')
  args = parser.parse_args()
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={args.devices}')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from contrastive import objectives  # pylint: disable=g-import-not-at-top
  from contrastive import parallel  # pylint: disable=g-import-not-at-top
  from contrastive.losses import sigmoid_loss  # pylint: disable=g-import-not-at-top
  from contrastive.negatives import static_bank  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh([('data', -1)])
  data = parallel.data_sharding(mesh)
  b, m, d, width = args.batch, args.bank, args.dim, 11  # E: emoji's most texts per group
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=data)
  bank = {'b': spec((m, d), jnp.float32), 'b_ids': spec((m, 2), jnp.int32)}
  for path in args.paths.split(','):
    topk = int(path[4:]) if path.startswith('topk') else 0
    batch = {'id': spec((b,), jnp.int32), 'b_text': spec((b,), jnp.int32),
             'b_group_texts': spec((b, width), jnp.int32)}
    if topk:
      batch['static_b'] = spec((b, topk), jnp.int32)
    blockwise_args = {} if path == 'dense' else dict(
        block_size=args.block_size, mesh=mesh,
        collective='all_gather' if path == 'all_gather' else 'ring')

    def loss(za, zb, bank, batch, blockwise_args=blockwise_args):
      z = (za, zb)
      return static_bank.loss(sigmoid_loss, z, batch, bank, objectives.text_negatives(z, batch),
                              dict(temperature=0.1, bias=-10.0), blockwise_args)[0]

    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(
        spec((b, d), jnp.float32), spec((b, d), jnp.float32), bank, batch).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    columns = b * topk if topk else m
    print(json.dumps(dict(
        batch=b, bank=m, dim=d, devices=args.devices, path=path, topk=topk,
        block_size=None if path == 'dense' else args.block_size,
        bank_mib_per_device=round((m * d * 4 + m * 8) / args.devices / 2**20, 1),
        xla_argument_mib=round(memory.argument_size_in_bytes / 2**20, 1),
        xla_temp_mib=round(memory.temp_size_in_bytes / 2**20, 1),
        bank_gmac=round(b * columns * d / 1e9, 1), compile_s=round(seconds, 1))), flush=True)


if __name__ == '__main__':
  main()
