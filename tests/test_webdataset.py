"""Webdataset shards: patterns, the cached per-shard index, decoding and cropping, the skip
accounting and the loader's process split, workers and resume (contrastive/data/
shard_index.py, image_decode.py, webdataset.py, webdataset_loader.py, shards.py)."""

import json
import os

import jax
import numpy as np
from PIL import Image
import pytest

from contrastive.config_lib import ConfigError
from contrastive.data import image_decode
from contrastive.data import shard_index
from contrastive.data import shards as shards_cli
from contrastive.data import tokenizer as tokenizer_lib
from contrastive.data import webdataset
from contrastive.data import webdataset_loader
from contrastive.data.fashion_mnist import MissingDatasetError
from tests import webdataset_shards as ws

KEYS = ['jpg', 'jpeg', 'png', 'webp']


def _cfg(**kw):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return webdataset.settings(ml_collections.ConfigDict(dict(
      dict(name='webdataset', image_size=32, group_key='group', worker_count=0), **kw)))


@pytest.fixture(scope='module')
def messy(tmp_path_factory):
  folder = tmp_path_factory.mktemp('messy')
  expected = ws.messy_shard(str(folder / '00000.tar'))
  clean = ws.clean_shards(str(folder / 'clean'), num_shards=2, per_shard=12)
  return str(folder / '00000.tar'), expected, clean


def test_patterns_expand_and_missing_shards_are_named(tmp_path):
  paths = ws.clean_shards(str(tmp_path), num_shards=3, per_shard=1)
  assert shard_index.expand(str(tmp_path / '{00000..00002}.tar')) == paths
  assert shard_index.expand(str(tmp_path / '*.tar')) == paths
  assert shard_index.expand(paths[:2]) == paths[:2]
  assert shard_index.expand(','.join(paths[1:])) == paths[1:]
  listing = tmp_path / 'shards.txt'
  listing.write_text('\n'.join(paths) + '\n')
  assert shard_index.expand(str(listing)) == paths
  with pytest.raises(MissingDatasetError, match=r"shard '.*00003.tar' not found"):
    shard_index.expand(str(tmp_path / '{00000..00003}.tar'))
  with pytest.raises(MissingDatasetError, match='matches no file'):
    shard_index.expand(str(tmp_path / 'nothing*.tar'))
  with pytest.raises(ConfigError, match='no shards given'):
    shard_index.expand('')
  (tmp_path / 'bad.tar').write_bytes(b'this is not a tar file' * 100)
  with pytest.raises(MissingDatasetError, match='not a readable tar file'):
    shard_index.load(str(tmp_path / 'bad.tar'), KEYS, 'txt')


def test_index_marks_each_kind_of_bad_sample(messy):
  path, expected, _ = messy
  records, meta = shard_index.load(path, KEYS, 'txt', 'group')
  assert meta['keys'] == list(expected)  # tar order; unicode keys kept
  assert [shard_index.REASONS[s] for s in records['status']] == list(expected.values())
  both = meta['keys'].index('both')
  assert KEYS[records['image_ext'][both]] == 'jpg'  # the first of image_keys present wins
  assert KEYS[records['image_ext'][1]] == 'png' and KEYS[records['image_ext'][2]] == 'webp'
  one = ws.clean_shards(os.path.join(os.path.dirname(path), 'one'), num_shards=1, per_shard=1)
  assert shard_index.load(one[0], KEYS, 'txt')[1]['num_samples'] == 1


def test_index_is_cached_and_rebuilt_when_the_shard_changes(tmp_path, monkeypatch):
  path = ws.clean_shards(str(tmp_path), num_shards=1, per_shard=3)[0]
  shard_index.load(path, KEYS, 'txt')
  assert len([f for f in os.listdir(tmp_path) if f.endswith('.npy')]) == 1  # beside the shard
  calls = []
  real_build = shard_index.build
  monkeypatch.setattr(shard_index, 'build', lambda *a: calls.append(a) or real_build(*a))
  shard_index.load(path, KEYS, 'txt')
  assert not calls  # read from the cache
  shard_index.load(path, KEYS, 'txt', 'group')
  assert len(calls) == 1  # other options: another index
  ws.write_shard(path, [ws.good('x', 1), ws.good('y', 2)])  # rewritten: size and mtime change
  os.utime(path, ns=(1, 1))
  assert shard_index.load(path, KEYS, 'txt')[1]['keys'] == ['x', 'y']
  assert len(calls) == 2
  cache = tmp_path / 'cache'
  shard_index.load(path, KEYS, 'txt', index_dir=str(cache))
  assert len(calls) == 3 and any(f.endswith('.npy') for f in os.listdir(cache))


def test_jpeg_crop_matches_pillow_and_decodes_downscaled(monkeypatch):
  image = ws.picture(3, height=480, width=640)
  data = ws.encode(image, 'jpg')
  ours = image_decode.crop(data, 64).astype(np.float64)
  full = Image.open(__import__('io').BytesIO(data)).convert('RGB')
  reference = np.asarray(full.crop((80, 0, 560, 480)).resize((64, 64), Image.Resampling.BILINEAR),
                         np.float64)
  assert np.abs(ours - reference).mean() < 4  # DCT downscale vs full decode + resize
  shapes = []
  real = image_decode.simplejpeg.decode_jpeg
  monkeypatch.setattr(image_decode.simplejpeg, 'decode_jpeg',
                      lambda *a, **k: shapes.append(real(*a, **k).shape) or real(*a, **k))
  image_decode.crop(data, 64)
  assert shapes == [(120, 160, 3)]  # decoded at 1/4 of each side, not 480 x 640


def test_random_box_and_formats():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = image_decode.random_box(300, 400, (0.3, 1.0), rng)
    assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
    assert 0.3 * 120000 * 0.95 <= h * w <= 120000
  same = [image_decode.crop(ws.encode(ws.picture(1), 'jpg'), 24, scale=(0.5, 1.0),
                            rng=np.random.default_rng(5)) for _ in range(2)]
  np.testing.assert_array_equal(*same)
  for fmt in ('png', 'webp'):
    assert image_decode.crop(ws.encode(ws.picture(2), fmt), 24).shape == (24, 24, 3)
  cmyk = __import__('io').BytesIO()
  Image.fromarray(ws.picture(4)).convert('CMYK').save(cmyk, format='JPEG')
  assert image_decode.crop(cmyk.getvalue(), 16).shape == (16, 16, 3)  # Pillow's fallback
  with pytest.raises(image_decode.DecodeError):
    image_decode.crop(b'\xff\xd8\xff' + b'junk' * 50, 16)


def _rows(paths, tok=None, **kw):
  cfg = _cfg(**kw)
  shards = webdataset.Shards(paths, cfg)
  tok = tok or tokenizer_lib.train([f'picture number {i}' for i in range(50)] + ['cut short'],
                                   300, hard_vocab_limit=False)
  return webdataset_loader.TrainRows(shards, tok, 8, cfg)


def test_bad_samples_are_replaced_by_the_next_usable_and_flagged(messy):
  path, expected, _ = messy
  rows = _rows([path])
  keys = list(expected)
  batch = rows.batch(np.arange(len(keys)), step=0, seed=0, first_row=0)
  bad = {'no_image', 'no_text', 'empty_caption', 'corrupt', 'garbage', 'last'}
  assert [keys[i] for i in np.flatnonzero(batch['skipped'])] == [k for k in keys if k in bad]
  groups = rows.shards.records(0)['group']
  # 'no_image'..'garbage' are replaced by the next usable sample ('café_猫'); 'last' (the
  # shard's end) by the shard's first.
  assert batch['id'][keys.index('garbage')] == groups[keys.index('caf\u00e9_\u732b')]
  assert batch['id'][keys.index('last')] == groups[0]
  again = rows.batch(np.arange(len(keys)), step=0, seed=0, first_row=0)
  for k in batch:
    np.testing.assert_array_equal(batch[k], again[k])  # a function of the data and seed


def test_index_check_and_run_check_name_the_worst_shards(messy):
  path, _, clean = messy
  rows = _rows([path] + clean)
  with pytest.raises(webdataset_loader.SkippedSamplesError, match=r'00000.tar \(4\)'):
    webdataset_loader.check_index(rows.shards, 0.05)
  webdataset_loader.check_index(rows.shards, 0.5)
  it = webdataset_loader.GuardedIterator(iter([]), rows, 4)
  it.check(1, {'skipped_samples': 0})
  limit = 0.01 * len(rows)  # within the first epoch: a share of the epoch's samples
  it.check(1, {'skipped_samples': int(limit)})
  with pytest.raises(webdataset_loader.SkippedSamplesError, match='max_skipped_fraction'):
    it.check(1, {'skipped_samples': int(limit) + 1})


def _batches(rows, steps, workers=0, state=None, global_batch_size=8):
  loader = webdataset_loader.train_loader(rows, global_batch_size=global_batch_size, seed=3,
                                          workers=workers)
  it = iter(loader)
  if state is not None:
    it.set_state(state)
  out = [next(it) for _ in range(steps)]
  state = it.get_state()
  it.close()
  return out, state


def test_two_processes_read_the_one_process_batches(messy, monkeypatch):
  _, _, clean = messy
  rows = _rows(clean)
  one, _ = _batches(rows, 3)
  parts = []
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  for p in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda p=p: p)
    parts.append(_batches(rows, 3)[0])
  for step in range(3):
    for k in one[step]:
      np.testing.assert_array_equal(np.concatenate([parts[0][step][k], parts[1][step][k]]),
                                    one[step][k])


def test_worker_processes_and_resume_give_the_same_batches(messy):
  path, _, clean = messy
  rows = _rows([path] + clean)
  plain, _ = _batches(rows, 5)
  first, state = _batches(rows, 2, workers=2)
  rest, _ = _batches(rows, 3, workers=2, state=json.loads(json.dumps(state)))
  assert sum(int(b['skipped'].sum()) for b in plain) > 0  # the messy shard was drawn
  for a, b in zip(plain, first + rest):
    assert set(a) == set(b) == {'a', 'b', 'id', 'truncated', 'skipped'}
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_cli_writes_and_indexes_shards(tmp_path, capsys):
  images = tmp_path / 'imgs'
  images.mkdir()
  lines = []
  for i in range(5):
    Image.fromarray(ws.picture(i)).save(images / f'{i}.png')
    lines.append(json.dumps({'image': f'imgs/{i}.png', 'text': f'picture {i}'}))
  (tmp_path / 'pairs.jsonl').write_text('\n'.join(lines) + '\n')
  shards_cli.main(['write', '--from', 'jsonl', str(tmp_path / 'pairs.jsonl'), '--out',
                   str(tmp_path / 'out'), '--per_shard', '2'])
  assert json.loads(capsys.readouterr().out)['shards'] == 3
  shards_cli.main(['index', str(tmp_path / 'out' / '{00000..00002}.tar'), '--verify'])
  assert json.loads(capsys.readouterr().out) == {'shards': 3, 'samples': 5}
  rows = _rows(shard_index.expand(str(tmp_path / 'out' / '*.tar')))
  batch = rows.batch(np.arange(5), step=0, seed=0, first_row=0)
  assert batch['a'].shape == (5, 32, 32, 3) and not batch['skipped'].any()


def test_workers_exit_when_the_main_process_is_killed(messy, tmp_path):
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  psutil = pytest.importorskip('psutil')
  _, _, clean = messy
  script = tmp_path / 'loader.py'
  script.write_text(f'''
import psutil, time
from tests import test_webdataset as t
if __name__ == '__main__':  # grain's workers are spawned: they import this file
  it = iter(t.webdataset_loader.train_loader(t._rows({clean!r}), global_batch_size=8, seed=0,
                                             workers=1))
  next(it)
  print(' '.join(str(c.pid) for c in psutil.Process().children(recursive=True)), flush=True)
  time.sleep(600)
''')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                          cwd=root, env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS='cpu'))
  children = [psutil.Process(int(p)) for p in proc.stdout.readline().split()]
  assert children
  proc.send_signal(signal.SIGKILL)  # the main process alone: no cleanup runs
  proc.wait(timeout=30)
  deadline = time.time() + 15
  while time.time() < deadline and any(c.is_running() and c.status() != 'zombie'
                                       for c in children):
    time.sleep(0.2)
  assert not any(c.is_running() and c.status() != 'zombie' for c in children)


@pytest.mark.parametrize('override, error, match', [
    (dict(crop_scale=(0.0, 1.0)), ConfigError, 'crop_scale'),
    (dict(max_skipped_fraction=1.5), ConfigError, 'max_skipped_fraction'),
    (dict(image_keys=''), ConfigError, 'image_keys'),
    (dict(eval_shards=''), ConfigError, 'eval_shards'),
    (dict(class_names='/no/such/classes.txt'), ConfigError, 'class_names'),
    (dict(shard_pattern='x'), ConfigError, 'unknown field'),
    (dict(train_shards='/no/such/{00000..00001}.tar'), MissingDatasetError, '00000.tar'),
    (dict(batching='tas_b'), ConfigError, 'random shuffle only'),
])
def test_bad_config_is_refused_before_compiling(messy, override, error, match):
  from contrastive import validate  # pylint: disable=g-import-not-at-top
  from tests.test_configs import load_config  # pylint: disable=g-import-not-at-top
  _, _, clean = messy
  config = load_config(os.path.join(os.path.dirname(__file__), '..', 'configs',
                                    'siglip_webdataset.py'), 'runlocal')
  with config.unlocked():
    config.dataset.update(train_shards=clean[0], eval_shards=clean[1])
    if override.pop('batching', None):
      config.batching.update(method='tas_b', num_topics=2)
    for k, v in override.items():
      config.dataset[k] = v
  with pytest.raises(error, match=match):
    validate.validate_config(config, num_devices=1, num_processes=1)
