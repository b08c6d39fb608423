"""Bitwise before/after check of every recipe: short `:runlocal` runs through `contrastive.main`.

A refactor that must not change behaviour records the runs on the old code, then compares on the
new code, on the same machine (float32 sums may differ between CPUs, so the record is not a
fixture for other machines):

  python -m tests.equivalence record /tmp/before.json   # on the old commit
  python -m tests.equivalence compare /tmp/before.json  # on the new one: exit 1 on a difference

Each run trains a few steps on 2 CPU devices and evaluates; what is compared is every metric the
run logged (less wall-clock times and memory readings) and a SHA-256 of every array of its final
checkpoint (parameters, optimizer state, queue, tables), so equal means bit for bit.
`--only NAME,...` runs a subset.
"""

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
STEPS = '--config.total_steps=3'
# (name, config with variants, flags). The two-tower flags as the tests use them.
TAS_B_NEGCLIP_ANCE = ('--config.batching.method=tas_b', '--config.batching.num_topics=4',
                      '--config.batching.no_duplicates=True', '--config.negclip.num_negatives=2',
                      '--config.hard_negatives.num_hard=2',
                      '--config.hard_negatives.refresh_every=2')
NGAME_MIXUP = ('--config.batching.method=clusters', '--config.batching.cluster_size=8',
               '--config.geodesic_mixup.alpha=0.5')
RUNS = (
    ('simclr', 'simclr_fmnist.py:runlocal', (STEPS,)),
    ('simclr_vit', 'simclr_fmnist.py:runlocal,vit', (STEPS,)),
    ('simclr_mcl', 'simclr_fmnist.py:runlocal,mcl', (STEPS,)),
    ('moco_v2', 'moco_v2_fmnist.py:runlocal', (STEPS,)),
    ('moco_v2_samplers', 'moco_v2_fmnist.py:runlocal,mining,mochi,ft,threshold,gist', (STEPS,)),
    ('moco_v3', 'moco_v3_fmnist.py:runlocal', (STEPS,)),
    ('siglip_emoji', 'siglip_emoji.py:runlocal', ()),
    ('siglip_emoji_dense', 'siglip_emoji.py:runlocal,dense', ()),
    ('clip_emoji', 'clip_emoji.py:runlocal', ()),
    ('siglip_lit', 'siglip_emoji.py:runlocal,lit', ('--config.lit.allow_random_locked=True',)),
    ('siglip_lit_init', 'siglip_emoji.py:runlocal,lit',
     ('--config.model_init.workdir={siglip_emoji}',
      '--config.model_init.mapping=tower_a:tower_a,proj_a:proj_a')),
    ('siglip_grad_cache', 'siglip_emoji.py:runlocal', ('--config.grad_cache.micro_batch_size=8',)),
    ('clip_grad_cache', 'clip_emoji.py:runlocal', ('--config.grad_cache.micro_batch_size=8',)),
    ('siglip_tas_b_negclip_ance', 'siglip_emoji.py:runlocal', TAS_B_NEGCLIP_ANCE),
    ('siglip_ngame_mixup', 'siglip_emoji.py:runlocal', NGAME_MIXUP),
    ('siglip_wordnet', 'siglip_wordnet.py:runlocal', ()),
    ('siglip_emoji_wordnet', 'siglip_emoji_wordnet.py:runlocal', ()),
    ('clip_emoji_wordnet', 'clip_emoji_wordnet.py:runlocal', ()),
)
# Readings of the clock or of memory, which differ between any two runs.
VOLATILE = re.compile(r'seconds|per_s|_time|memory|bytes|rss|elapsed|eta')


def _checkpoint_digest(workdir):
  """SHA-256 over every array of the newest checkpoint (in the tree's order)."""
  from contrastive import checkpoint  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, 'checkpoints')
  steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(checkpoint.read_state(os.path.join(directory, str(steps[-1])))):
    leaf = np.asarray(leaf)
    digest.update(f'{leaf.dtype}{leaf.shape}'.encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return f'step {steps[-1]}: {digest.hexdigest()}'


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in row.items() if not VOLATILE.search(k)} for row in rows]


def run(name, config, flags, root, data_dirs):
  """Trains one run; returns {'metrics': [...], 'checkpoint': digest}."""
  workdir = os.path.join(root, name)
  data_dir = data_dirs['fmnist' if 'fmnist' in config else 'pairs']
  flags = [f.format(**{n: os.path.join(root, n) for n, _, _ in RUNS}) for f in flags]
  cmd = [sys.executable, '-m', 'contrastive.main', f'--config={REPO}/configs/{config}',
         f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}', *flags]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  start = time.time()
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f'{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}')
  if 'mcl' in config.split(':')[1].split(','):  # MCL's stages each have a workdir; the last one's checkpoint
    stages = sorted(d for d in os.listdir(workdir) if d.startswith('stage'))
    digest = _checkpoint_digest(os.path.join(workdir, stages[-1]))
  else:
    digest = _checkpoint_digest(workdir)
  print(f'{name}: {time.time() - start:.0f} s', flush=True)
  return {'metrics': _metrics(workdir), 'checkpoint': digest}


def record_all(names):
  root = tempfile.mkdtemp(prefix='equivalence_')
  data_dirs = {'fmnist': os.path.join(root, 'tfds_fmnist'), 'pairs': os.path.join(root, 'tfds')}
  return {name: run(name, config, flags, root, data_dirs)
          for name, config, flags in RUNS if not names or name in names}


def compare(before, after):
  """The names of the runs whose metrics or checkpoint differ, with the first difference."""
  diffs = []
  for name, got in after.items():
    want = before.get(name)
    if want is None:
      diffs.append(f'{name}: not in the record')
    elif want['checkpoint'] != got['checkpoint']:
      diffs.append(f'{name}: checkpoint {want["checkpoint"]} != {got["checkpoint"]}')
    elif want['metrics'] != got['metrics']:
      first = next(i for i, (a, b) in enumerate(zip(want['metrics'], got['metrics'])) if a != b)
      diffs.append(f'{name}: metrics row {first}: {want["metrics"][first]} != '
                   f'{got["metrics"][first]}')
  return diffs


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('action', choices=('record', 'compare'))
  parser.add_argument('path')
  parser.add_argument('--only', default='', help='comma-separated run names')
  args = parser.parse_args()
  names = set(filter(None, args.only.split(',')))
  if 'siglip_lit_init' in names:
    names.add('siglip_emoji')  # its model_init workdir
  results = record_all(names)
  if args.action == 'record':
    with open(args.path, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=1)
    print(f'Recorded {len(results)} runs in {args.path}.')
    return 0
  with open(args.path, encoding='utf-8') as f:
    diffs = compare(json.load(f), results)
  for line in diffs:
    print('DIFFERS', line)
  print(f'{len(results) - len(diffs)} of {len(results)} runs bitwise equal.')
  return 1 if diffs else 0


if __name__ == '__main__':
  sys.exit(main())
