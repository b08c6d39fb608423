"""Plots the JSON lines of benchmarks/loss_scaling.py: time and peak memory against B.

  python benchmarks/plot_loss_scaling.py benchmarks/results/loss_scaling.jsonl \\
      --out benchmarks/results/loss_scaling.png

Left: forward + backward seconds per implementation (and device count / collective), with the
3-matmul floor dashed. Right: the process's peak RSS. Both axes logarithmic.
"""

import argparse
import collections
import json

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


def label(record):
  name = record['impl']
  if record['impl'] == 'blockwise':
    name += f' (block {record["block_size"]})'
  name += f', {record["devices"]} dev'
  if record.get('collective'):
    name += f' {record["collective"]}'
  return name


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('jsonl')
  p.add_argument('--out', default='benchmarks/results/loss_scaling.png')
  args = p.parse_args(argv)
  with open(args.jsonl) as f:
    records = [json.loads(line) for line in f if line.strip()]
  records = [r for r in records if 'error' not in r]
  series = collections.defaultdict(list)
  floors = {}
  for r in records:
    series[label(r)].append(r)
    if r.get('floor_s') and r['devices'] == 1:
      floors.setdefault(r['batch'], r['floor_s'])

  fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
  for name, points in sorted(series.items()):
    points.sort(key=lambda r: r['batch'])
    batch = [r['batch'] for r in points]
    style = dict(marker='o', linestyle='--' if ' 8 dev' in name else '-')
    ax_time.plot(batch, [r['time_s'] for r in points], label=name, **style)
    ax_mem.plot(batch, [r['peak_rss_gib'] for r in points], label=name, **style)
  if floors:
    batch = sorted(floors)
    ax_time.plot(batch, [floors[b] for b in batch], 'k:', label='3 matmuls (floor)')
  loss = records[0]['loss'] if records else ''
  for ax, title, unit in ((ax_time, f'{loss} forward + backward', 'seconds'),
                          (ax_mem, 'peak RSS of the process', 'GiB')):
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel('batch B (D = 256, float32, 2-core CPU)')
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.grid(True, which='both', alpha=0.3)
  ax_time.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(args.out, dpi=120)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
