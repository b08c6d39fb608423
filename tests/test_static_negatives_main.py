"""config.static_negatives through `python -m contrastive.main` (slow): a second stage whose
bank is the first stage's text embeddings, and a bank workdir without checkpoints."""

import os
import subprocess
import sys

import numpy as np
import pytest

from contrastive import checkpoint
from contrastive.losses import blockwise
from tests import xla_flags
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
NO = blockwise.NO_NEGATIVE


def _env():
  return dict(os.environ, XLA_FLAGS=xla_flags.FAST_COMPILE, JAX_PLATFORMS='cpu',
              PYTHONPATH=REPO)


def _main(workdir, data_dir, *flags):
  command = [sys.executable, '-m', 'contrastive.main',
             f'--config={os.path.join(REPO, "configs", "siglip_emoji.py")}:runlocal',
             f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}', *flags]
  return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=600)


@pytest.fixture(scope='module')
def first_stage(tmp_path_factory):
  from contrastive.data import emoji  # pylint: disable=g-import-not-at-top
  if not os.path.exists(emoji.FONT_PATH):
    pytest.skip('make install (Debian fonts-noto-color-emoji etc.)')
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  workdir = str(tmp_path_factory.mktemp('stage1') / 'run')
  out = _main(workdir, data_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, data_dir


MAPPING = 'tower_a:tower_a,proj_a:proj_a,tower_b:tower_b,proj_b:proj_b,logit:logit'


@pytest.mark.slow  # two runlocal runs through contrastive.main (~1 min)
@pytest.mark.parametrize('flags', [(), ('--config.static_negatives.topk=2',
                                        '--config.static_negatives.sides=ab')],
                         ids=['whole_bank', 'topk_ab'])
def test_second_stage_runlocal_with_the_bank_of_the_first(first_stage, tmp_path, flags):
  source, data_dir = first_stage
  workdir = str(tmp_path / 'stage2')
  out = _main(workdir, data_dir, f'--config.model_init.workdir={source}',
              f'--config.model_init.mapping={MAPPING}',
              '--config.static_negatives.num_static=100000',
              f'--config.static_negatives.from_workdir={source}', *flags)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  assert 'Static negatives: ' in out.stdout and 'refreshed static_bank' in out.stdout
  assert 'step 6/6' in out.stdout
  # The bank is the first stage's text embeddings: the frozen towers, not the trained ones.
  from contrastive import inference  # pylint: disable=g-import-not-at-top
  model = inference.load(source)
  state = checkpoint.read_state(checkpoint.latest_step_dir(workdir))
  bank, ids = state['static_bank']['b'], state['static_bank']['b_ids']
  real = ids[:, 0] != NO
  assert real.sum() > 50 and (np.abs(np.linalg.norm(bank[real], axis=1) - 1) < 1e-5).all()
  config = model.config
  config.dataset.data_dir = data_dir
  from contrastive.data import pair_batches  # pylint: disable=g-import-not-at-top
  raw = pair_batches.get_source(config.dataset, 'train')
  spec = pair_batches.spec(config.dataset, raw)
  texts = np.unique([r[spec.b].decode() if isinstance(r[spec.b], bytes) else r[spec.b]
                     for r in raw.__getitems__(range(len(raw)))])
  got = bank[real][:20]
  want = model.encode_text(list(texts[ids[real][:20, 1]]))
  np.testing.assert_allclose(got, want, atol=1e-5)
  if flags:
    assert 'static_loss_a' in open(os.path.join(workdir, 'metrics.jsonl')).read()


@pytest.mark.slow
def test_a_bank_from_a_workdir_without_checkpoints_is_one_line(first_stage, tmp_path):
  _, data_dir = first_stage
  os.makedirs(tmp_path / 'empty' / 'checkpoints')
  out = _main(str(tmp_path / 'run'), data_dir, '--config.static_negatives.num_static=10',
              f'--config.static_negatives.from_workdir={tmp_path / "empty"}')
  errors = [line for line in out.stderr.splitlines() if line.startswith('ERROR: ')]
  assert out.returncode == 1 and errors and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert 'has no checkpoint' in errors[-1]
