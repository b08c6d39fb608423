"""The two-tower losses' forward + backward on one accelerator (GPU/TPU) against the batch size:
dense ([B, B] logits) and blockwise (`block_size`, no B x B array), bfloat16 and float32
embeddings. One JSON line per point:

  python benchmarks/loss_accelerator.py > benchmarks/results/loss_accelerator.jsonl

Fields: loss, path, dtype, batch, dim, block_size, time_s (median of --repeats timed calls after
a first, compiling one), times_s, compile_s, tflops (6 B^2 D / time_s: the forward's B x B x D
similarity matmul and the backward's two, the FLOPs any exact loss must do), xla_gib (XLA's
compiled argument / output / temp sizes: temp is the step's working memory), value (the
loss), and dloss_vs_f32 (|L_bf16 - L_f32| at the same B, float32 inputs holding the same bfloat16 values).
Points whose compiled temp memory would exceed --max_temp_gib are skipped with a reason line.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from contrastive.losses import clip_loss
from contrastive.losses import sigmoid_loss

TEMPERATURE, BIAS = 0.07, -10.0
LOSSES = {'clip_loss': lambda a, b, **kw: clip_loss(a, b, temperature=TEMPERATURE, **kw),
          'sigmoid_loss': lambda a, b, **kw: sigmoid_loss(a, b, temperature=TEMPERATURE,
                                                          bias=BIAS, **kw)}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--losses', default='clip_loss,sigmoid_loss')
  p.add_argument('--batch_sizes', default='16384,65536,262144,1048576')
  p.add_argument('--dense_limit', type=int, default=32768, help='largest B for the dense path')
  p.add_argument('--block_sizes', default='4096', help='blockwise block sizes')
  p.add_argument('--f32_batches', default='262144', help='B at which float32 is also timed')
  p.add_argument('--dim', type=int, default=256)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--max_temp_gib', type=float, default=100.0)
  return p.parse_args(argv)


def embeddings(b, d, seed=0):
  """(za, zb) [B, D] bfloat16: unit rows, each zb_i near za_i (cosine ~0.7)."""
  rng = np.random.default_rng(seed)
  za = rng.standard_normal((b, d), np.float32)
  zb = 0.7 * za / np.linalg.norm(za, axis=1, keepdims=True) + 0.7 * rng.standard_normal(
      (b, d), np.float32) / np.sqrt(d)
  return jnp.asarray(za, jnp.bfloat16), jnp.asarray(zb, jnp.bfloat16)


def run_point(loss, path, dtype, b, d, block_size, repeats, max_temp_gib, reference):
  """One JSON-able dict (or a skip line) for a loss at batch b."""
  za, zb = (x.astype(dtype) for x in embeddings(b, d))
  kw = {} if path == 'dense' else dict(block_size=block_size)
  step = jax.jit(jax.value_and_grad(lambda a, c: LOSSES[loss](a, c, **kw)[0], argnums=(0, 1)))
  start = time.perf_counter()
  compiled = step.lower(za, zb).compile()
  mem = compiled.memory_analysis()
  gib = lambda n: round(n / 2 ** 30, 3)
  xla = dict(argument=gib(mem.argument_size_in_bytes), output=gib(mem.output_size_in_bytes),
             temp=gib(mem.temp_size_in_bytes))
  row = dict(loss=loss, path=path, dtype=jnp.dtype(dtype).name, batch=b, dim=d,
             block_size=None if path == 'dense' else block_size, xla_gib=xla)
  if xla['temp'] > max_temp_gib:
    return dict(row, skipped=f'temp {xla["temp"]} GiB > --max_temp_gib')
  value, grads = compiled(za, zb)
  jax.block_until_ready(grads)
  row['compile_s'] = round(time.perf_counter() - start, 3)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    value, grads = compiled(za, zb)
    jax.block_until_ready(grads)
    times.append(time.perf_counter() - t)
  row['time_s'] = round(statistics.median(times), 5)
  row['times_s'] = [round(t, 5) for t in times]
  row['tflops'] = round(6 * b * b * d / row['time_s'] / 1e12, 2)
  row['value'] = float(value)
  if reference is not None:
    row['dloss_vs_f32'] = abs(float(value) - reference)
  return row


def main(argv=None):
  args = parse_args(argv)
  device = jax.devices()[0]
  print(json.dumps(dict(device=str(device.device_kind), platform=device.platform,
                        jax=jax.__version__)), flush=True)
  f32_batches = {int(b) for b in args.f32_batches.split(',') if b}
  for loss in args.losses.split(','):
    for b in map(int, args.batch_sizes.split(',')):
      paths = ([('dense', None)] if b <= args.dense_limit else []) + [
          ('blockwise', int(s)) for s in args.block_sizes.split(',')]
      for path, block_size in paths:
        reference = None
        if b in f32_batches:
          row = run_point(loss, path, jnp.float32, b, args.dim, block_size, args.repeats,
                          args.max_temp_gib, None)
          reference = row.get('value')
          print(json.dumps(row), flush=True)
        print(json.dumps(run_point(loss, path, jnp.bfloat16, b, args.dim, block_size,
                                   args.repeats, args.max_temp_gib, reference)), flush=True)


if __name__ == '__main__':
  main()
