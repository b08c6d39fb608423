"""kNN and linear-probe accuracy of each recipe and sampler on Fashion-MNIST, same step budget.

Each recipe runs through the public entry point, in its own process:

  python -m contrastive.main --config configs/FILE:VARIANTS --workdir DIR \\
      --config.total_steps=STEPS --config.eval.random_init_baseline=False

and this script prints one JSON line per recipe with the final evaluation (read from DIR's
metrics.jsonl: kNN, linear probe, and the few-shot accuracies with and without OpTA) and the
wall time:

  python benchmarks/recipes.py --steps=300 >> benchmarks/results/recipes.jsonl

MCL trains one model per stage, each for STEPS steps (twice the budget of the others), and
reports the concatenated features of both stages.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
# (name, config file and variants)
RECIPES = [
    ('simclr', 'simclr_fmnist.py'),
    ('simclr+infonce', 'simclr_fmnist.py:loss=info_nce'),
    ('simclr+amcl', 'simclr_fmnist.py:loss=amcl'),  # 4 heads, learned temperatures
    ('simclr+pamc', 'simclr_fmnist.py:loss=pamc_info_nce'),  # 32 meta-node negatives
    ('moco_v2', 'moco_v2_fmnist.py'),
    ('moco_v2+amcl', 'moco_v2_fmnist.py:loss=amcl'),  # 4 heads, each its queue slice
    ('moco_v3', 'moco_v3_fmnist.py'),
    ('moco_v2+mining', 'moco_v2_fmnist.py:mining'),
    ('moco_v2+mochi', 'moco_v2_fmnist.py:mochi'),
    ('moco_v2+ft', 'moco_v2_fmnist.py:ft'),
    ('moco_v2+threshold', 'moco_v2_fmnist.py:threshold'),
    ('moco_v2+gist', 'moco_v2_fmnist.py:gist'),
    ('simclr+mcl', 'simclr_fmnist.py:mcl'),
    ('simclr+beclr', 'simclr_fmnist.py:beclr'),  # DyCE pseudo-positives (InfoNCE)
    ('moco_v2+beclr', 'moco_v2_fmnist.py:beclr'),
]


def last_eval(metrics_path):
  """The last metrics.jsonl row with evaluation results (knn_top1 or mcl/knn_top1)."""
  found = {}
  with open(metrics_path, encoding='utf-8') as f:
    for line in f:
      row = json.loads(line)
      if 'knn_top1' in row or 'mcl/knn_top1' in row:
        found = row
  return found


def run_recipe(name, config, steps, workdir, extra_flags):
  """Trains one recipe in a fresh process; returns its JSON record."""
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, '-m', 'contrastive.main', f'--config=configs/{config}',
         f'--workdir={workdir}', f'--config.total_steps={steps}',
         '--config.eval.random_init_baseline=False', *extra_flags]
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  record = dict(recipe=name, config=config, steps=steps, wall_s=round(wall, 1),
                returncode=proc.returncode)
  if proc.returncode:
    record['error'] = proc.stderr[-2000:]
    return record
  row = last_eval(os.path.join(workdir, 'metrics.jsonl'))
  prefix = 'mcl/' if 'mcl/knn_top1' in row else ''
  record.update(knn_top1=row.get(prefix + 'knn_top1'),
                linear_top1=row.get(prefix + 'linear_top1'))
  record.update({k[len(prefix):]: v for k, v in row.items()  # config.eval.fewshot's metrics
                 if k.startswith(prefix + 'fewshot_')})
  return record


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--recipes', default=','.join(r[0] for r in RECIPES))
  p.add_argument('--workdir', default='/tmp/recipes')
  p.add_argument('--flag', action='append', default=[],
                 help='extra flag for every run, e.g. --flag=--config.batch_size=128')
  args = p.parse_args(argv)
  chosen = args.recipes.split(',')
  for name, config in RECIPES:
    if name in chosen:
      record = run_recipe(name, config, args.steps, os.path.join(args.workdir, name), args.flag)
      print(json.dumps(record), flush=True)


if __name__ == '__main__':
  main()
