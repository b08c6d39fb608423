r"""GradCache: memory and step time against the micro-batch size, at a fixed global batch.

  python benchmarks/grad_cache.py > benchmarks/results/grad_cache.jsonl

The SigLIP emoji recipe's step (configs/siglip_emoji.py: ViT + text transformer, 2 devices),
on random inputs of the recipe's shapes, in four worker processes driven one step at a time in
turn (benchmarks/interleaved.py): the full batch at B0 and at 16 B0, and GradCache at 16 B0
with micro-batches of B0 and 4 B0. One JSON line per point: step time (median), XLA's compiled
temporaries and argument bytes per device, the worker's peak RSS; then one line of ratios:

  memory   GradCache at 16 B0 (micro B0) / full batch at B0: the goal is ~1 (a batch 16x
           larger in the memory of the small one);
  time     GradCache at 16 B0 / full batch at 16 B0: the goal is <= 1.4 (GradCache runs each
           forward pass twice: ~4/3 of a step's work).
"""

import argparse
import json
import statistics
import sys
import time

import interleaved  # benchmarks/interleaved.py


def run_worker(point):
  """Builds the step of `point` ({'batch', 'micro'}) and serves timed steps."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', interleaved.cores())  # before the backend starts
  import emoji_step  # pylint: disable=g-import-not-at-top (benchmarks/emoji_step.py)
  state, step, batch, memory = emoji_step.build(
      batch_size=point['batch'],
      **{'grad_cache.micro_batch_size': point['micro']})
  holder = [state]

  def run(i):
    start = time.perf_counter()
    holder[0], metrics = step(holder[0], batch, jax.random.key(i))
    jax.block_until_ready(metrics['loss'])
    return dict(time_s=time.perf_counter() - start, temp_bytes=memory.temp_size_in_bytes,
                argument_bytes=memory.argument_size_in_bytes)

  interleaved.serve(run, sum(x.size for x in jax.tree.leaves(state.params)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  parser.add_argument('--b0', type=int, default=128)
  parser.add_argument('--rounds', type=int, default=5)
  args = parser.parse_args()
  if args.worker:
    return run_worker(json.loads(args.worker))
  b0 = args.b0
  points = {'full_b0': dict(batch=b0, micro=0), 'full_16b0': dict(batch=16 * b0, micro=0),
            'gradcache_16b0_micro_b0': dict(batch=16 * b0, micro=b0),
            'gradcache_16b0_micro_4b0': dict(batch=16 * b0, micro=4 * b0)}
  workers = {k: interleaved.Worker(sys.executable, __file__, p) for k, p in points.items()}
  results = {k: [] for k in points}
  for i in range(args.rounds + 1):  # round 0: the first call (compilation) is not timed
    for k, w in workers.items():
      out = w.step(i)
      if i:
        results[k].append(out)
  rows = {}
  for k, w in workers.items():
    peak = w.close()
    times = [r['time_s'] for r in results[k]]
    rows[k] = dict(point=k, **points[k], devices=interleaved.cores(),
                   time_s_median=statistics.median(times),
                   temp_mib=results[k][0]['temp_bytes'] / 2**20,
                   argument_mib=results[k][0]['argument_bytes'] / 2**20, peak_rss_gib=peak)
    print(json.dumps(rows[k]), flush=True)
  gc = rows['gradcache_16b0_micro_b0']
  print(json.dumps(dict(
      ratio='gradcache_16b0_micro_b0',
      memory_vs_full_b0=gc['temp_mib'] / rows['full_b0']['temp_mib'],
      memory_vs_full_16b0=gc['temp_mib'] / rows['full_16b0']['temp_mib'],
      rss_vs_full_b0=gc['peak_rss_gib'] / rows['full_b0']['peak_rss_gib'],
      time_vs_full_16b0=gc['time_s_median'] / rows['full_16b0']['time_s_median'])), flush=True)


if __name__ == '__main__':
  main()
