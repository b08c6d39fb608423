"""Your own pairs (configs/siglip_pairs.py, dataset 'jsonl_pairs') through the entry points:
image-text and text-text runs, the hash split, duplicates, an edited file, and every bad
file ending in one line that names the file (and line)."""

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from contrastive import config_lib
from contrastive import inference
from contrastive import main as main_lib
from contrastive import train
from contrastive.config_lib import ConfigError
from contrastive.data import pair_batches
from contrastive.data import pairs
from contrastive.workdir import WorkdirError
from tests import xla_flags

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
CONFIG = os.path.join(REPO, 'configs', 'siglip_pairs.py')


def _write(path, records):
  """Writes JSON-lines `records` (a bytes item is written as it is) and returns the path."""
  with open(path, 'wb') as f:
    for r in records:
      f.write((r if isinstance(r, bytes) else json.dumps(r).encode()) + b'\n')
  return str(path)


def _config(jsonl_path, data_dir, **fields):
  config = config_lib.load_config(CONFIG, 'runlocal')
  config.dataset.update(jsonl_path=str(jsonl_path), data_dir=str(data_dir))
  config.update(fields)
  return config


def _run(config, workdir):
  """train_and_evaluate(config, workdir) -> (its metrics, what it printed)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    _, metrics = train.train_and_evaluate(config, str(workdir))
  return metrics, out.getvalue()


def _main(jsonl, workdir, data_dir, *, timeout):
  """`python -m contrastive.main` on siglip_pairs.py:runlocal in its own process."""
  return subprocess.run(
      [sys.executable, '-m', 'contrastive.main', f'--config={CONFIG}:runlocal',
       f'--workdir={workdir}', f'--config.dataset.jsonl_path={jsonl}',
       f'--config.dataset.data_dir={data_dir}'],
      cwd=REPO, capture_output=True, text=True, timeout=timeout,
      env=dict(os.environ, XLA_FLAGS=xla_flags.FAST_COMPILE, JAX_PLATFORMS='cpu',
               PYTHONPATH=REPO))


def _images(folder, n):
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f'{i}.png')


@pytest.fixture(scope='module')
def image_run(tmp_path_factory):
  """60 image-text records without "split" keys (8 held out by the hash of their paths) and 2
  exact duplicates, trained 6 steps with siglip_pairs:runlocal."""
  root = tmp_path_factory.mktemp('image_pairs')
  _images(root / 'img', 60)
  records = [{'image': f'img/{i}.png', 'text': f'picture {i} of a thing'} for i in range(60)]
  jsonl = _write(root / 'pairs.jsonl', records + records[:2])
  config = _config(jsonl, root / 'tfds')
  metrics, out = _run(config, root / 'run')
  return config, metrics, out, root


def test_image_text_trains_on_a_hash_split(image_run):
  config, metrics, out, _ = image_run
  assert ('pairs.jsonl: 62 image_text records (8 test, 54 train; no "split" keys: 10% held out '
          'by a hash of each image path); 2 duplicate record(s)') in out
  assert 'Converting pairs.jsonl (62 records) into array_record under' in out
  assert 'step 6/6' in out
  for key in ('a2b/r@1', 'b2a/r@5', 'alignment'):
    assert np.isfinite(metrics[key]), key
  assert config.model.image.name == 'vit' and 'a' not in config.model


def test_duplicates_share_a_group_id(image_run):
  config, _, _, _ = image_run
  train_rows = pair_batches.get_source(config.dataset, 'train')
  ids = {}
  for r in train_rows.__getitems__(range(len(train_rows))):
    ids.setdefault(r['text'].decode(), []).append(int(r['id']))
  assert ids['picture 0 of a thing'] == [0, 0] and ids['picture 1 of a thing'] == [1, 1]
  assert ids['picture 2 of a thing'] == [2]


@pytest.fixture(scope='module')
def text_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('text_pairs')
  jsonl = _write(root / 'words.jsonl', [{'text_a': f'word {i}', 'text_b': f'the gloss of {i}'}
                                        for i in range(60)])
  config = _config(jsonl, root / 'tfds')
  metrics, out = _run(config, root / 'run')
  return config, metrics, out, root


def test_text_text_gets_two_text_towers(text_run):
  config, metrics, out, root = text_run
  assert 'step 6/6' in out and np.isfinite(metrics['a2b/r@1'])
  assert 'image' not in config.model and config.model.a.name == config.model.text.name == 'text'
  model = inference.load(str(root / 'run'))  # its config.json holds the towers that ran
  assert model.encode_text(['word 3']).shape == (1, config.model.embed_dim)
  with pytest.raises(ValueError, match='no image tower'):
    model.encode_image(np.zeros((1, 8, 8, 3), np.uint8))


def test_edited_file_is_refused_by_the_run_and_converted_again(text_run):
  """An edited file: the workdir trained on it before refuses (one line naming the file and
  the workdir); a new workdir converts it again, without the old cached tokenizer."""
  config, _, _, root = text_run
  jsonl = config.dataset.jsonl_path
  data_dir = pair_batches.builder(config.dataset).data_dir
  cached = [f for f in os.listdir(data_dir) if f.startswith('tokenizer-')]
  with open(os.path.join(data_dir, cached[0]), 'rb') as f:
    old_tokenizer = f.read()
  with open(jsonl, 'a', encoding='utf-8') as f:
    f.write(json.dumps({'text_a': 'word 60', 'text_b': 'a new gloss'}) + '\n')
  config = _config(jsonl, root / 'tfds')
  with pytest.raises(WorkdirError) as e:
    _run(config, root / 'run')
  message = str(e.value)
  assert jsonl in message and str(root / 'run') in message and '\n' not in message
  assert 'its content changed' in message
  _, out = _run(_config(jsonl, root / 'tfds', total_steps=1), root / 'new_run')
  assert 'Converting words.jsonl (61 records) into array_record under' in out
  assert 'again: its content changed' in out
  assert len(pair_batches.get_source(config.dataset, 'train')) + len(
      pair_batches.get_source(config.dataset, 'test')) == 61
  with open(os.path.join(root / 'new_run', pair_batches.TOKENIZER_NAME), 'rb') as f:
    new_tokenizer = f.read()
  assert new_tokenizer != old_tokenizer  # trained on the new file, not read from the old cache
  with open(os.path.join(data_dir, cached[0]), 'rb') as f:
    assert f.read() == new_tokenizer


def _pairs(n, **extra):
  return [{'text_a': f'w{i}', 'text_b': f'g{i}', **extra} for i in range(n)]


BAD_FILES = {  # name: (records, the one-line message)
    'null_caption': ([{'image': 'img/0.png', 'text': None}], r':1: "text" must be a string, '
                     'found null'),
    'number_caption': (_pairs(2) + [{'text_a': 3, 'text_b': 'x'}], r':3: "text_a" must be a'),
    'list_caption': ([{'image': 'img/0.png', 'text': ['a']}], r':1: "text" must be a string'),
    'image_not_a_string': ([{'image': 7, 'text': 'a'}], r':1: "image" must be a non-empty'),
    'missing_image': ([{'image': 'img/gone.png', 'text': 'a'}], r":1: image 'img/gone.png' not "
                      'found'),
    'not_utf8': (_pairs(1) + [b'{"text_a": "\xff", "text_b": "x"}'], r':2: not UTF-8'),
    'not_json': (_pairs(1) + [b'{"text_a": '], r':2: not JSON'),
    'not_an_object': (_pairs(1) + [b'[1, 2]'], r':2: expected a JSON object'),
    'one_record': (_pairs(1), r': 1 training records .* fewer than one batch \(config.batch_size'
                   r'=32\): add records or lower --config.batch_size'),
    'one_train_one_test': ([{'text_a': 'a', 'text_b': 'b', 'split': 'train'},
                            {'text_a': 'c', 'text_b': 'd', 'split': 'test'}],
                           r": 1 training records \(split 'train'; the file has 'test': 1, "
                           r"'train': 1\)"),
    'no_test_rows': (_pairs(40, split='train'), r"evaluation split 'test' \(config.eval.split\) "
                     r'has 0 record\(s\).*mark more records "split": "test"'),
    'tiny_hash_split': ([r for r in _pairs(40) if r['text_a'] not in ('w2', 'w20', 'w29')],
                        r"split 'test' .* has 1 record\(s\).* raise "
                        r'--config.dataset.test_fraction \(now 0.1\)'),
}


@pytest.mark.parametrize('name', sorted(BAD_FILES))
def test_bad_file_is_one_line_naming_file_and_line(name, tmp_path):
  """Checked before any work: a user error (main prints it as one `ERROR:` line)."""
  (tmp_path / 'img').mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'img' / '0.png')
  records, message = BAD_FILES[name]
  jsonl = _write(tmp_path / f'{name}.jsonl', records)
  with pytest.raises(main_lib.USER_ERRORS, match=message) as e:
    _run(_config(jsonl, tmp_path / 'tfds'), tmp_path / 'run')
  assert str(e.value).startswith(jsonl) and '\n' not in str(e.value)
  assert isinstance(e.value, pairs.PairsDataError)
  assert not os.path.exists(tmp_path / 'tfds')  # refused before converting anything


def test_jsonl_path_is_required(tmp_path):
  with pytest.raises(ConfigError, match=r'--config.dataset.jsonl_path=FILE'):
    _run(_config('', tmp_path / 'tfds'), tmp_path / 'run')


def test_unreadable_image_ends_in_one_error_line(tmp_path):
  """`python -m contrastive.main` on a file with a truncated PNG: our conversion line, none of
  tfds' ("Downloading and preparing", dataset_info warnings), then one ERROR line naming the
  file and line, no traceback."""
  _images(tmp_path / 'img', 40)
  with open(tmp_path / 'img' / '0.png', 'rb') as f:
    head = f.read(60)
  with open(tmp_path / 'img' / 'cut.png', 'wb') as f:
    f.write(head)
  records = [{'image': f'img/{i}.png', 'text': f'picture {i}',
              'split': 'test' if i < 4 else 'train'} for i in range(40)]
  jsonl = _write(tmp_path / 'pairs.jsonl', records + [{'image': 'img/cut.png', 'text': 'cut'}])
  out = _main(jsonl, tmp_path / 'run', tmp_path / 'tfds', timeout=300)
  assert out.returncode == 1, out.stderr[-3000:]
  assert 'Converting pairs.jsonl (41 records) into array_record under' in out.stdout
  assert out.stderr.strip().splitlines()[-1].startswith(
      f'ERROR: PairsDataError: {jsonl}:41: image \'img/cut.png\' cannot be read'), out.stderr
  for noise in ('Traceback', 'Downloading and preparing', 'dataset_info', 'Generating'):
    assert noise not in out.stdout + out.stderr, noise


@pytest.mark.slow  # make test-all: the README's command, ~25 s in its own process
def test_readme_command_runs(image_run, tmp_path):
  _, _, _, root = image_run
  out = _main(root / 'pairs.jsonl', tmp_path / 'run', root / 'tfds', timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'step 6/6' in out.stdout and 'a2b/r@1' in out.stdout
