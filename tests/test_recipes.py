"""The MoCo recipes with the samplers, and MCL's stage runner, through `contrastive.main`.

A short MoCo v2 run with every sampler on 2 devices (3 steps), MCL's two stages and SimCLR with
the ViT encoder (all slow:
`make test-all`; CI runs the MoCo step itself in test_moco.py); the step's method as built
from each config; MCL's cluster bookkeeping against hand-computed tables.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from contrastive import config_lib
from contrastive import mcl
from contrastive import parallel
from contrastive.data import fashion_mnist
from contrastive.recipes import image_views
from tests import xla_flags

REPO = os.path.join(os.path.dirname(__file__), '..')


def _main(config, workdir, *flags):
  if not os.path.isdir(fashion_mnist.DEBIAN_IDX_DIR):
    pytest.skip('apt-get install dataset-fashion-mnist')
  cmd = [sys.executable, '-m', 'contrastive.main', f'--config=configs/{config}',
         f'--workdir={workdir}', f'--config.dataset.data_dir={workdir}/tfds', *flags]
  env = dict(os.environ, XLA_FLAGS=xla_flags.with_devices(2),
             PYTHONPATH=os.path.abspath(REPO))
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return out.stdout, [json.loads(line) for line in f]


@pytest.mark.slow
def test_moco_v2_with_every_sampler_runs_from_main(tmp_path):
  stdout, rows = _main('moco_v2_fmnist.py:runlocal,mining,mochi,ft,threshold,gist', tmp_path,
                       '--config.total_steps=3')
  assert 'step 3/3' in stdout and 'knn_top1' in stdout
  steps = [r for r in rows if 'loss' in r]
  assert len(steps) == 3 and all(np.isfinite(r['loss']) for r in steps)
  assert 0.9 < steps[0]['momentum'] < 1.0
  assert sum(steps[-1]['hist_pos']) == 64  # one positive score per query (runlocal: B = 64)
  assert os.path.getsize(tmp_path / 'score_histograms_3.png') > 0


@pytest.mark.slow
def test_mcl_trains_two_stages_and_evaluates_their_concatenation(tmp_path):
  stdout, rows = _main('simclr_fmnist.py:runlocal,mcl', tmp_path, '--config.total_steps=3')
  assert 'MCL stage 2/2' in stdout
  for stage in ('stage1', 'stage2'):
    assert os.path.isdir(tmp_path / stage / 'checkpoints' / '3')
  assert 0.0 < rows[-1]['mcl/knn_top1'] <= 1.0


@pytest.mark.slow
def test_simclr_with_the_vit_encoder_runs_from_main(tmp_path):
  stdout, rows = _main('simclr_fmnist.py:vit,runlocal', tmp_path, '--config.total_steps=3')
  assert 'step 3/3' in stdout
  assert all(np.isfinite(r['loss']) for r in rows if 'loss' in r)
  assert 0.0 < rows[-1]['knn_top1'] <= 1.0
  with open(tmp_path / 'config.json', encoding='utf-8') as f:
    assert json.load(f)['model.encoder.name'] == 'vit'


def test_mcl_combines_clusters_of_all_stages():
  first = np.array([0, 0, 1, 1, -1], np.int32)
  second = np.array([0, 1, 1, 1, 0], np.int32)
  np.testing.assert_array_equal(mcl.combine_clusters(None, first, 2), first)
  # Shared clusters in both stages only: (0,0), (0,1), (1,1), (1,1), unknown.
  np.testing.assert_array_equal(mcl.combine_clusters(first, second, 2), [0, 1, 3, 3, -1])


def test_cluster_table_is_indexed_by_example_id():
  rng = np.random.default_rng(0)
  centres = np.array([[5.0, 0.0], [0.0, 5.0]])
  features = np.concatenate([c + 0.1 * rng.normal(size=(4, 2)) for c in centres])  # 8 rows
  ids = np.array([9, 2, 4, 6, 1, 3, 5, 7])
  mesh = parallel.make_mesh([('data', -1)], jax.devices()[:2])
  table = mcl.cluster_table(features.astype(np.float32), ids, 2, iters=5, seed=0, mesh=mesh)
  assert table.shape == (10,) and table[0] == table[8] == -1  # ids never seen
  assert len({table[i] for i in (9, 2, 4, 6)}) == 1 and len({table[i] for i in (1, 3, 5, 7)}) == 1
  assert table[9] != table[1]


def _method(config_arg):
  config = config_lib.load_config(os.path.join(REPO, 'configs', config_arg.split(':')[0]),
                                  (config_arg.split(':') + [None])[1])
  return image_views.method(image_views.settings(config), steps=100,
                            steps_per_epoch=10.0), config


def test_each_recipe_builds_its_step_method():
  assert _method('simclr_fmnist.py')[0] is None  # plain SimCLR: config.loss as is
  method, config = _method('moco_v2_fmnist.py')
  assert method.name == 'moco' and config.queue_size == 4096 and method.symmetric
  np.testing.assert_allclose(method.momentum(50), 0.99, rtol=1e-6)
  method, config = _method('moco_v3_fmnist.py')
  assert config.queue_size == 0 and config.model.predictor_hidden_dims
  np.testing.assert_allclose(method.momentum(100), 1.0, rtol=1e-6)  # cosine to 1
  method, config = _method('simclr_fmnist.py:mochi,gist')
  assert method.name == 'simclr' and method.samplers.mochi.num_hard == 128
  assert config.loss.name == 'info_nce' and config.momentum.base == 0.99  # the guide
