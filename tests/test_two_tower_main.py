"""The two-tower recipes through `python -m contrastive.main`: each `:runlocal` trains and
evaluates, `inference.load` reproduces the evaluator's embeddings, and a run killed with SIGKILL
resumes bitwise identically."""

import json
import os
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from contrastive import checkpoint
from contrastive import inference
from contrastive import parallel
from contrastive import two_tower_eval
from contrastive.data import emoji
from contrastive.data import glyphs
from contrastive.data import pair_batches
from tests import xla_flags

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
pytestmark = pytest.mark.skipif(not os.path.exists(emoji.FONT_PATH),
                                reason='make install (Debian fonts-noto-color-emoji etc.)')


def _command(config, workdir, data_dir, *flags):
  return [sys.executable, '-m', 'contrastive.main',
          f'--config={os.path.join(REPO, "configs", config)}:runlocal', f'--workdir={workdir}',
          f'--config.dataset.data_dir={data_dir}', *flags]


def _env():
  return dict(os.environ, XLA_FLAGS=xla_flags.FAST_COMPILE, JAX_PLATFORMS='cpu',
              PYTHONPATH=REPO)


def main(config, workdir, data_dir, *flags):
  out = subprocess.run(_command(config, workdir, data_dir, *flags), cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  return out.stdout


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def siglip_run(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('siglip') / 'run')
  return workdir, main('siglip_emoji.py', workdir, data_dir)


def test_siglip_emoji_runlocal_trains_and_evaluates(siglip_run):
  workdir, out = siglip_run
  assert 'step 6/6' in out
  rows = _rows(workdir)
  losses = [r['loss'] for r in rows if 'loss' in r]
  assert len(losses) == 6 and all(np.isfinite(losses))
  final = rows[-1]
  for key in ('a2b/r@1', 'a2b/r@10', 'b2a/r@5', 'zero_shot/balanced_top1',
              'zero_shot_subclass/balanced_top1', 'alignment',
              'uniformity_a'):
    assert key in final and np.isfinite(final[key]), key
  assert final['zero_shot/chance'] == pytest.approx(1 / 9)
  if os.path.exists(glyphs.SYMBOLA_PATH):  # the held-out emoji drawn in Symbola
    for key in ('zero_shot_cross_style/balanced_top1', 'zero_shot_cross_style/noto_top1',
                'zero_shot_cross_style_seen/balanced_top1'):
      assert key in final and 0 <= final[key] <= 1, key
    assert 'zero_shot_cross_style: ' in out
  else:
    assert 'apt-get install fonts-symbola' in out
  assert 'bias' in rows[0] and 'temperature' in rows[0] and 'truncated_texts' in rows[0]
  assert os.path.exists(os.path.join(workdir, pair_batches.TOKENIZER_NAME))


def test_config_error_after_validation_is_one_line(siglip_run, data_dir, tmp_path):
  """A config mistake that only shows once the run reads another workdir (model_init's
  checkpoint folder exists but holds no checkpoint: validation passes, the recipe's parts
  raise) ends like every config error: one 'ERROR: ConfigError' line, exit 1, no traceback."""
  del siglip_run  # (the data_dir it prepared)
  source = tmp_path / 'empty_run'
  os.makedirs(source / 'checkpoints')
  out = subprocess.run(
      _command('siglip_emoji.py', str(tmp_path / 'run'), data_dir,
               f'--config.model_init.workdir={source}',
               '--config.model_init.mapping=tower_a:tower_a'),
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  errors = [line for line in out.stderr.splitlines() if line.startswith('ERROR: ')]
  assert out.returncode == 1, out.stderr[-3000:]
  assert errors and errors[-1].startswith('ERROR: ConfigError: config.model_init.workdir: '
                                          'No checkpoint in'), out.stderr[-3000:]
  assert 'Traceback' not in out.stderr


def test_inference_load_reproduces_the_evaluator(siglip_run, data_dir):
  """inference.load (one device, its own jit) gives the embeddings the training-time
  evaluator computes (the mesh, sharded batches) from the same checkpoint: per row the same
  float32 operations, so equal up to matmul blocking (~1e-6 on unit vectors; a wrong
  checkpoint, tokenizer or tower differs by > 1e-2)."""
  workdir, _ = siglip_run
  model = inference.load(workdir)
  config = model.config
  config.dataset.data_dir = data_dir
  source = pair_batches.get_source(config.dataset, 'test')
  spec = pair_batches.spec(config.dataset, source)
  mesh = parallel.make_mesh([('data', -1)])
  evaluator = two_tower_eval.TwoTowerEvaluator(config, model.module, mesh, source, spec,
                                               model.tokenizer)
  state = checkpoint.read_state(os.path.join(workdir, 'checkpoints', str(model.step)))
  state = types.SimpleNamespace(params=state['params'], batch_stats=state.get('batch_stats'))
  np.testing.assert_allclose(model.encode_image(evaluator.a), evaluator.embed(state, 'a',
                                                                              evaluator.a),
                             atol=1e-5)
  np.testing.assert_allclose(model.encode_text(evaluator.ev['b_items']),
                             evaluator.embed(state, 'b', evaluator.b), atol=1e-5)
  big = np.repeat(np.repeat(evaluator.a[:4], 3, axis=1), 3, axis=2)  # any size is resized
  assert model.encode_image(big).shape == (4, config.model.embed_dim)
  with pytest.raises(ValueError, match=r'uint8 images \[N, H, W, 3\]'):
    model.encode_image(evaluator.a[..., :1])


@pytest.mark.slow  # make test-all; CI keeps the suite under 10 min
@pytest.mark.parametrize('config', ['clip_emoji.py', 'siglip_wordnet.py',
                                    'siglip_emoji_wordnet.py', 'clip_emoji_wordnet.py'])
def test_other_recipes_runlocal(config, data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  # the CLIP mixture with siglip_emoji.py's :sketch augmentation and :styles fonts
  sketch = (('--config.augment.sketch_prob=0.3', '--config.augment.gray_prob=0.3',
             '--config.dataset.emoji_cldr.styles=("unifont","noto_symbols")')
            if config == 'clip_emoji_wordnet.py' else ())
  out = main(config, workdir, data_dir, *sketch)
  assert 'step 6/6' in out
  if config == 'siglip_emoji_wordnet.py':  # the mixture: each dataset evaluated, mined per part
    assert 'each from its own part' in out and '16 rows of emoji_cldr, 16 rows of' in out
    assert 'refreshed mined' in out
    final = _rows(workdir)[-1]
    for key in ('emoji_cldr/a2b/r@1', 'emoji_cldr/zero_shot/balanced_top1',
                'wordnet_gloss/b2a/r@10', 'wordnet_gloss/zero_shot/balanced_top1'):
      assert np.isfinite(final[key]), key
    return
  if config == 'clip_emoji_wordnet.py':  # the mixture with CLIP's loss: no mined negatives
    assert 'mined' not in out and 'wordnet_gloss/a2b/r@1' in _rows(workdir)[-1]
    assert os.path.isdir(os.path.join(data_dir, 'emoji_cldr', '32px_en_sub64_unifont_noto_symbols'))
    if os.path.exists(glyphs.SYMBOLA_PATH):  # the emoji part's cross-style zero-shot
      assert 0 <= _rows(workdir)[-1]['emoji_cldr/zero_shot_cross_style/balanced_top1'] <= 1
    return
  assert 'a2b/r@1' in _rows(workdir)[-1]
  if config == 'clip_emoji.py':
    assert 'bias' not in _rows(workdir)[0]


# The negatives' config options: TAS-B topics, no duplicate groups, NegCLIP text negatives.
NEGATIVES = ('--config.batching.method=tas_b', '--config.batching.num_topics=4',
             '--config.batching.no_duplicates=True', '--config.negclip.num_negatives=2',
             '--config.hard_negatives.num_hard=2', '--config.hard_negatives.refresh_every=2')


NGAME = ('--config.batching.method=clusters', '--config.batching.cluster_size=8',
         '--config.geodesic_mixup.alpha=0.5')


@pytest.mark.slow  # make test-all; CI keeps the suite under 10 min
@pytest.mark.parametrize('batching', [(), NEGATIVES, NGAME],
                         ids=['plain', 'tas_b_negclip_mined', 'ngame_mixup'])
def test_sigkill_then_rerun_is_bitwise_identical(siglip_run, data_dir, tmp_path, batching):
  """Killed after checkpoint 3 and rerun: step 6 equals the uninterrupted run's, with the plain
  recipe and with the negatives' options (config.batching: the topics recomputed on resume;
  NegCLIP's perturbations drawn per row index; the mined negatives, re-mined before steps 3
  and 5, restored with checkpoint 3 rather than recomputed; NGAME's clusters of step 0, also
  restored; m^3-Mix's lambda drawn from the step's key)."""
  if batching:
    ref_workdir = str(tmp_path / 'ref')
    out = main('siglip_emoji.py', ref_workdir, data_dir, *batching)
    if batching == NGAME:  # the clusters of step 0, restored with checkpoint 3 on resume
      assert 'Batches: clusters: clusters of 8 rows' in out
      assert 'Step 0: refreshed composition (batching)' in out
    else:
      assert 'Batches: tas_b: 4 topics' in out
      assert 'Step 4: refreshed mined (hard_negatives)' in out
    final = _rows(ref_workdir)[-1]
    if batching == NEGATIVES:
      assert 0 <= final['order_sensitivity'] <= 1 and final['order_sensitivity/chance'] < 1
  else:
    ref_workdir, _ = siglip_run
  workdir = str(tmp_path / 'run')
  flags = ('--config.total_steps=6', *batching)
  proc = subprocess.Popen(_command('siglip_emoji.py', workdir, data_dir, *flags), cwd=REPO,
                          env=_env(), text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  for line in proc.stdout:
    if line.startswith('step 5/'):  # checkpoint 3 is being saved (runlocal: every 3 steps)
      for _ in range(300):  # asynchronously: kill once it is committed
        if os.path.isdir(os.path.join(workdir, 'checkpoints', '3')):
          break
        time.sleep(0.1)
      proc.send_signal(signal.SIGKILL)
      break
  assert proc.wait(timeout=600) == -signal.SIGKILL
  out = main('siglip_emoji.py', workdir, data_dir, *flags)
  assert 'Resumed from step' in out
  ref = checkpoint.read_state(os.path.join(ref_workdir, 'checkpoints', '6'))
  got = checkpoint.read_state(os.path.join(workdir, 'checkpoints', '6'))
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  ref_losses = {r['step']: r['loss'] for r in _rows(ref_workdir) if 'loss' in r}
  losses = {r['step']: r['loss'] for r in _rows(workdir) if 'loss' in r}
  assert losses == ref_losses


def test_help_exits_0():
  out = subprocess.run([sys.executable, '-m', 'contrastive.main', '--help'], capture_output=True,
                       text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)) or '.')
  assert out.returncode == 0, out.stderr[-500:]
  assert '--workdir' in out.stdout + out.stderr and 'Traceback' not in out.stderr


def _last_error(command):
  out = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  errors = [line for line in out.stderr.splitlines() if line.startswith('ERROR: ')]
  assert out.returncode == 1 and errors and 'Traceback' not in out.stderr, out.stderr[-3000:]
  return errors[-1]


def _params(workdir):
  return checkpoint.read_state(checkpoint.latest_step_dir(workdir))['params']


def test_lit_command_trains_with_the_locked_tower_loaded(siglip_run, data_dir, tmp_path):
  """docs/two_towers.md's LiT command (at :runlocal size): the locked tower is the loaded one,
  bitwise, after training; the text tower trains."""
  source, _ = siglip_run
  workdir = str(tmp_path / 'lit')
  out = main('siglip_emoji.py', workdir, data_dir, '--config.lit.locked_tower=image',
             f'--config.model_init.workdir={source}',
             '--config.model_init.mapping=tower_a:tower_a,proj_a:proj_a')
  assert 'step 6/6' in out
  before, after = _params(source), _params(workdir)
  for group in ('tower_a', 'proj_a'):
    for a, b in zip(jax.tree.leaves(before[group]), jax.tree.leaves(after[group])):
      np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before['tower_b']),
                                                      jax.tree.leaves(after['tower_b'])))


def test_lit_and_model_init_that_load_nothing_are_refused(siglip_run, data_dir, tmp_path):
  """A locked tower nothing loads (it would stay random), a mapping that copies nothing or
  into no group of the model, and a text tower from a run with another tokenizer: one line
  each, before training."""
  source, _ = siglip_run
  run = str(tmp_path / 'run')
  assert _last_error(_command('siglip_emoji.py', run, data_dir, '--config.lit.locked_tower=a')) \
      .startswith('ERROR: ConfigError: config.lit locks tower_a, but config.model_init loads '
                  'nothing into it')
  from contrastive import config_lib  # pylint: disable=g-import-not-at-top
  from contrastive import validate  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'siglip_emoji.py'), 'runlocal')
  config.dataset.data_dir = data_dir
  config.model_init.workdir = source
  for mapping, message in (('', 'with no mapping copies nothing'),
                           ('tower_a:encoder', r"\['encoder'\] is not a parameter group")):
    config.model_init.mapping = mapping
    with pytest.raises(config_lib.ConfigError, match=message):
      validate.validate_config(config, num_devices=2, num_processes=1)
  config.lit.locked_tower, config.lit.allow_random_locked = 'a', True  # a random baseline
  config.model_init.workdir = ''
  validate.validate_config(config, num_devices=2, num_processes=1)
  # A copy of the source run whose tokenizer was trained on other texts.
  from contrastive.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  other = tmp_path / 'other_tokenizer'
  os.makedirs(other)
  os.symlink(os.path.join(source, 'checkpoints'), other / 'checkpoints')
  tokenizer_lib.train([f'word{i} other text {i % 7}' for i in range(400)], 300,
                      hard_vocab_limit=False).save(str(other / pair_batches.TOKENIZER_NAME))
  error = _last_error(_command('siglip_emoji.py', run, data_dir,
                               f'--config.model_init.workdir={other}',
                               '--config.model_init.mapping=tower_b:tower_b'))
  assert 'ConfigError: config.model_init copies the text tower tower_b' in error
  assert 'trained with another tokenizer' in error
