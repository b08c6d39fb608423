r"""The two-tower step in float32 and in bfloat16 (`config.dtype`): time and drift.

  python benchmarks/bf16_step.py > benchmarks/results/bf16_step.jsonl

The SigLIP emoji recipe's step (configs/siglip_emoji.py, 2 devices) on fixed random inputs of
its shapes, float32 and bfloat16 in two worker processes driven one step at a time in turn
(benchmarks/interleaved.py), from the same initial parameters. One JSON line per dtype (step
time median, compiled temporaries, peak RSS, the loss of every step) and one line comparing
them: time ratio, and the relative drift of the bfloat16 loss from the float32 one at each
step (training moves the two runs apart, so the drift grows with the step).
"""

import argparse
import json
import statistics
import sys
import time

import interleaved  # benchmarks/interleaved.py


def run_worker(point):
  """Builds the step of `point` ({'dtype', 'batch'}) and serves timed steps."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', interleaved.cores())  # before the backend starts
  import emoji_step  # pylint: disable=g-import-not-at-top (benchmarks/emoji_step.py)
  state, step, batch, memory = emoji_step.build(
      batch_size=point['batch'], dtype=point['dtype'])
  holder = [state]

  def run(i):
    start = time.perf_counter()
    holder[0], metrics = step(holder[0], batch, jax.random.key(i))
    loss = float(metrics['loss'])
    return dict(time_s=time.perf_counter() - start, loss=loss,
                temp_bytes=memory.temp_size_in_bytes)

  interleaved.serve(run, sum(x.size for x in jax.tree.leaves(state.params)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--rounds', type=int, default=10)
  args = parser.parse_args()
  if args.worker:
    return run_worker(json.loads(args.worker))
  dtypes = ('float32', 'bfloat16')
  workers = {d: interleaved.Worker(sys.executable, __file__, dict(dtype=d, batch=args.batch))
             for d in dtypes}
  results = {d: [] for d in dtypes}
  for i in range(args.rounds + 1):  # round 0 (compilation) is not timed
    for d, w in workers.items():
      results[d].append(w.step(i))
  rows = {}
  for d, w in workers.items():
    peak = w.close()
    timed = results[d][1:]
    rows[d] = dict(dtype=d, batch=args.batch, devices=interleaved.cores(),
                   time_s_median=statistics.median(r['time_s'] for r in timed),
                   temp_mib=timed[0]['temp_bytes'] / 2**20, peak_rss_gib=peak,
                   losses=[r['loss'] for r in results[d]])
    print(json.dumps(rows[d]), flush=True)
  drift = [abs(a - b) / abs(b) for a, b in zip(rows['bfloat16']['losses'],
                                                rows['float32']['losses'])]
  print(json.dumps(dict(
      ratio='bfloat16/float32',
      time=rows['bfloat16']['time_s_median'] / rows['float32']['time_s_median'],
      temp=rows['bfloat16']['temp_mib'] / rows['float32']['temp_mib'],
      loss_drift_first_step=drift[0], loss_drift_max=max(drift))), flush=True)


if __name__ == '__main__':
  main()
