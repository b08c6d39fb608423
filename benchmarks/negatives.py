"""The dual-encoder negatives ablation: each dual-encoder negatives technique against the baseline on the
SigLIP emoji and WordNet recipes, at the same step budget, over several seeds.

Each run goes through the public entry point, in its own process:

  python -m contrastive.main --config configs/siglip_emoji.py --workdir DIR \\
      --config.total_steps=STEPS --config.seed=SEED --config.eval.every=0 \\
      --config.eval.random_init_baseline=False  TECHNIQUE FLAGS

and prints one JSON line with the final held-out evaluation (metrics.jsonl), the median
seconds per training step (the logged intervals after the first, which holds the compile),
the time spent re-mining hard negatives and the wall time:

  python benchmarks/negatives.py --recipes=emoji --seeds=0,1,2 \\
      >> benchmarks/results/negatives.jsonl
  python benchmarks/negatives.py --report benchmarks/results/negatives.jsonl \\
      --plot benchmarks/results/negatives.png    # the README table (mean ± std) and plot
  python benchmarks/negatives.py --step_rounds=10  # each technique's jitted step, interleaved

Techniques (flags in TECHNIQUES): TAS-B topic batches, no duplicate groups in a batch, NegCLIP
word-order negatives, ANCE corpus-mined negatives refreshed during training, m^3-Mix
geodesic negatives, and batches of NGAME clusters or Sample4Geo neighbours recomputed from the
current towers every epoch. Every technique keeps the recipe's model, batch, optimizer and steps.
"""

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
RECIPES = {'emoji': ('siglip_emoji.py', 300),
           # the recorded WordNet rows: the 2-block transformer (the recipe's default is a bag)
           'wordnet': ('siglip_wordnet.py:transformer', 300),
           # both in one run: 128 rows of each per batch, 600 steps = each dataset's rows of
           # the single-dataset recipes' 300 steps of 256
           'emoji_wordnet': ('siglip_emoji_wordnet.py', 600)}
TECHNIQUES = {
    'baseline': (),
    'no_duplicates': ('--config.batching.no_duplicates=True',),
    'tas_b': ('--config.batching.method=tas_b', '--config.batching.num_topics=16'),
    'negclip': ('--config.negclip.num_negatives=2',),
    # 2 mined texts per row, re-mined at the recipe's interval (emoji 100 steps, WordNet 250)
    'ance': ('--config.hard_negatives.num_hard=2',),
    'ance_r100': ('--config.hard_negatives.num_hard=2', '--config.hard_negatives.refresh_every=100'),
    'geodesic': ('--config.geodesic_mixup.alpha=0.5',),
    'ngame': ('--config.batching.method=clusters', '--config.batching.cluster_size=16'),
    'neighbours': ('--config.batching.method=neighbours', '--config.batching.num_neighbours=4'),
}
MIXTURE_TECHNIQUES = {  # the mixture recipe mines (MM-Embed) by default
    'baseline': ('--config.hard_negatives.num_hard=0', '--config.hard_negatives.refresh_every=0'),
    'mm_embed': (),  # 2 mined negatives per row from its own dataset's texts, every 200 steps
    'ance_any_part': ('--config.hard_negatives.same_part=False',),  # from both datasets' texts
}
METRICS = ('a2b/r@1', 'a2b/r@10', 'b2a/r@1', 'b2a/r@10', 'zero_shot/balanced_top1',
           'order_sensitivity')


def read_metrics(path):
  """(last evaluation row, median seconds per step after the first logged interval, total
  seconds of hard-negative refreshes) from a metrics.jsonl."""
  final, rates, refresh = {}, [], 0.0
  with open(path, encoding='utf-8') as f:
    for line in f:
      row = json.loads(line)
      if any(k.endswith('a2b/r@1') for k in row):  # ('emoji_cldr/a2b/r@1': a mixture's)
        final = row
      if 'steps_per_s' in row:
        rates.append(row['steps_per_s'])
      refresh += sum(v for k, v in row.items() if k.endswith('/refresh_seconds'))
  step_s = float(np.median(1 / np.array(rates[1:]))) if len(rates) > 1 else None
  return final, step_s, refresh


def run(recipe, technique, seed, steps, workdir, extra):
  """Trains one (recipe, technique, seed) in a fresh process; returns its JSON record."""
  config, _ = RECIPES[recipe]
  shutil.rmtree(workdir, ignore_errors=True)
  flags = MIXTURE_TECHNIQUES[technique] if recipe == 'emoji_wordnet' else TECHNIQUES[technique]
  cmd = [sys.executable, '-m', 'contrastive.main', f'--config=configs/{config}',
         f'--workdir={workdir}', f'--config.total_steps={steps}', f'--config.seed={seed}',
         '--config.eval.every=0', '--config.eval.random_init_baseline=False', *flags, *extra]
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  record = dict(recipe=recipe, technique=technique, seed=seed, steps=steps,
                wall_s=round(time.perf_counter() - start, 1), returncode=proc.returncode)
  if proc.returncode:
    record['error'] = (proc.stdout + proc.stderr)[-2000:]
    return record
  final, step_s, refresh = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  record.update({k: v for k, v in final.items()  # a mixture's with its parts' prefixes
                 if any(k == m or k.endswith('/' + m) for m in METRICS)},
                step_s=step_s, refresh_s=round(refresh, 1))
  return record


def report(path, plot=None):
  """Mean ± std over seeds per (recipe, technique) as a Markdown table; a bar plot of r@1."""
  groups = collections.defaultdict(list)
  with open(path, encoding='utf-8') as f:
    for line in f:
      r = json.loads(line)
      if r.get('returncode'):
        continue
      parts = sorted({k.split('/')[0] for k in r if k.endswith('/a2b/r@1')})
      for part in parts:  # a mixture: a row per dataset, e.g. 'emoji_wordnet:emoji_cldr'
        groups[(f'{r["recipe"]}:{part}', r['technique'])].append(
            dict(r, **{k[len(part) + 1:]: v for k, v in r.items() if k.startswith(part + '/')}))
      if not parts:
        groups[(r['recipe'], r['technique'])].append(r)
  cols = ('a2b/r@1', 'a2b/r@10', 'b2a/r@1', 'b2a/r@10', 'zero_shot/balanced_top1')
  print('| recipe | technique | seeds | ' + ' | '.join(cols) +
        ' | s / step | refresh s (share of wall) | wall |')
  print('|' + '---|' * (len(cols) + 6))
  order = list(TECHNIQUES) + list(MIXTURE_TECHNIQUES)
  keys = sorted(groups, key=lambda k: (k[0], order.index(k[1]) if k[1] in order else 99))
  for recipe, technique in keys:
    rows = groups[(recipe, technique)]
    cells = []
    for c in cols:
      v = np.array([r[c] for r in rows if r.get(c) is not None], float)
      cells.append('' if not len(v) else f'{v.mean():.3f}' if len(v) == 1 else
                   f'{v.mean():.3f} ± {v.std():.3f}')
    step = np.median([r['step_s'] for r in rows if r.get('step_s')])
    refresh = np.mean([r.get('refresh_s', 0) for r in rows])
    wall = np.mean([r['wall_s'] for r in rows])
    print(f'| {recipe} | {technique} | {len(rows)} | ' + ' | '.join(cells) +
          f' | {step:.2f} | {refresh:.0f} ({refresh / wall:.1%}) | {wall / 60:.1f} min |')
  if plot:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    recipes = sorted({k[0] for k in keys})
    fig, axes = plt.subplots(1, len(recipes), figsize=(5 * len(recipes), 3.5), squeeze=False)
    for ax, recipe in zip(axes[0], recipes):
      names = [t for r, t in keys if r == recipe]
      for offset, metric in ((-0.2, 'a2b/r@1'), (0.2, 'b2a/r@1')):
        values = [[r[metric] for r in groups[(recipe, t)]] for t in names]
        ax.bar(np.arange(len(names)) + offset, [np.mean(v) for v in values], 0.4,
               yerr=[np.std(v) for v in values], label=metric, capsize=3)
      ax.set_xticks(range(len(names)), names, rotation=30, ha='right')
      ax.set_title(f'SigLIP {recipe}: held-out recall@1, mean ± std', fontsize=10)
      ax.legend()
    fig.tight_layout()
    fig.savefig(plot, dpi=100)


STEP_VARIANTS = {  # what each technique changes in the jitted step (the others change batches)
    'baseline': ('siglip_emoji.py', {}),
    'negclip': ('siglip_emoji.py', {'negclip.num_negatives': 2}),
    'ance': ('siglip_emoji.py', {'hard_negatives.num_hard': 2,
                                 'hard_negatives.refresh_every': 100}),
    'geodesic': ('siglip_emoji.py', {'geodesic_mixup.alpha': 0.5}),
    # the emoji + WordNet mixture (mined negatives off): each tower on its own rows (the
    # default), and both towers on every row (what GradCache's micro-batches do)
    'mixture': ('siglip_emoji_wordnet.py', {'hard_negatives.num_hard': 0}),
    'mixture_every_row': ('siglip_emoji_wordnet.py', {'hard_negatives.num_hard': 0}),
}


def step_times(rounds, names):
  """The recipes' jitted steps with each technique's extra inputs (2 NegCLIP or 2 mined texts
  per row through tower b; m^3-Mix's second loss pass; a mixture's text queries), random
  tokens of the recipe's shapes, interleaved round by round in one process on 2 CPU devices:
  one JSON line per variant with the median seconds and the ratio to the emoji baseline
  measured in the same rounds."""
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=2')
  import jax  # pylint: disable=g-import-not-at-top
  import emoji_step  # pylint: disable=g-import-not-at-top
  from contrastive.data import mixture  # pylint: disable=g-import-not-at-top
  built, query_runs = {}, mixture.query_runs
  for name in ['baseline'] + [n for n in names if n != 'baseline']:
    config_file, overrides = STEP_VARIANTS[name]
    if name.endswith('every_row'):  # no layout: both towers on every row
      mixture.query_runs = lambda dataset_cfg, batch_size: None
    state, step, batch, _ = emoji_step.build(config_file, **overrides)
    mixture.query_runs = query_runs
    state, _ = step(state, batch, jax.random.key(0))  # compile
    built[name] = [state, step, batch]
  times = {name: [] for name in built}
  for r in range(rounds):
    for name, (state, step, batch) in built.items():
      start = time.perf_counter()
      state, metrics = step(state, batch, jax.random.key(r))
      jax.block_until_ready(metrics['loss'])
      times[name].append(time.perf_counter() - start)
      built[name][0] = state
  base = float(np.median(times['baseline']))
  for name, ts in times.items():
    print(json.dumps(dict(benchmark='negatives_step', technique=name, rounds=rounds,
                          config=STEP_VARIANTS[name][0], step_s=round(float(np.median(ts)), 4),
                          ratio=round(float(np.median(ts)) / base, 3))), flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--recipes', default=','.join(RECIPES))
  default = [t for t in TECHNIQUES if t != 'ance_r100'] + list(MIXTURE_TECHNIQUES)[1:]
  p.add_argument('--techniques', default=','.join(default),
                 help='each recipe runs those of its list (emoji_wordnet: MIXTURE_TECHNIQUES)')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--steps', type=int, default=0, help='0: each recipe\'s budget in RECIPES')
  p.add_argument('--workdir', default='/tmp/negatives')
  p.add_argument('--flag', action='append', default=[],
                 help='extra flag for every run, e.g. --flag=--config.batch_size=128')
  p.add_argument('--report', help='a JSON-lines file of this script: print the table')
  p.add_argument('--plot', help='with --report: write the recall@1 bar plot here')
  p.add_argument('--step_rounds', type=int, default=0,
                 help='> 0: only time the jitted step of each technique (STEP_VARIANTS)')
  p.add_argument('--step_variants', default=','.join(STEP_VARIANTS),
                 help='with --step_rounds: which of STEP_VARIANTS (the baseline always)')
  args = p.parse_args(argv)
  if args.step_rounds:
    step_times(args.step_rounds, args.step_variants.split(','))
    return
  if args.report:
    report(args.report, args.plot)
    return
  for seed in [int(s) for s in args.seeds.split(',')]:
    for recipe in args.recipes.split(','):
      names = MIXTURE_TECHNIQUES if recipe == 'emoji_wordnet' else TECHNIQUES
      for technique in [t for t in args.techniques.split(',') if t in names]:
        steps = args.steps or RECIPES[recipe][1]
        workdir = os.path.join(args.workdir, f'{recipe}_{technique}_{seed}')
        print(json.dumps(run(recipe, technique, seed, steps, workdir, args.flag)), flush=True)


if __name__ == '__main__':
  main()
