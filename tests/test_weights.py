"""Public checkpoints in and out (`python -m contrastive.weights`): open_clip's own outputs on
tiny CLIPs (tests/data/, written by benchmarks/make_parity_fixtures.py in a venv with
open_clip 3.3.0) against the imported workdir's `inference.load`, from raw images of several
sizes through the recorded preprocessing; export back bit for bit; one-line errors that leave
nothing behind; LiT from an imported workdir.

Tolerance: the fixtures' embeddings are float32 computations (2 blocks per tower, widths 32);
ours reorder the same float32 sums, which moves each value by a few ulp per stage (observed
max |diff| 1.3e-6 on values up to 3.6). The checks ask |diff| <= 1e-5 max|ref| and cosine >=
0.99999; a swapped LayerNorm gamma/beta, a missing bias or the other GELU moves the outputs
by 0.01 to 4 (the fixture script's perturbation check), far outside both.
"""

import json
import os

import jax
import numpy as np
import pytest

from contrastive import inference
from contrastive.weights import __main__ as cli
from contrastive.weights import importer

DATA = os.path.join(os.path.dirname(__file__), 'data')
FIXTURES = ('vit_b_32', 'vit_b_16', 'vit_l_14_quickgelu')


def fixture(name):
  """(npz, arch, overrides, safetensors path) of a tiny open_clip CLIP."""
  f = np.load(os.path.join(DATA, f'open_clip_{name}.npz'))
  c = json.loads(str(f['config']))
  v, t = c['vision_cfg'], c['text_cfg']
  overrides = dict(
      image=dict(patch=v['patch_size'], width=v['width'], depth=v['layers'],
                 heads=v['width'] // v['head_width'], mlp_dim=int(v['width'] * v['mlp_ratio'])),
      text=dict(width=t['width'], depth=t['layers'], heads=t['heads'], mlp_dim=4 * t['width']),
      embed_dim=c['embed_dim'], image_size=v['image_size'], vocab_size=t['vocab_size'])
  arch = c['mirrors'] + ('-quickgelu' if c['quick_gelu'] else '')
  return f, arch, overrides, os.path.join(DATA, f'open_clip_{name}.safetensors')


def _import(name, workdir, **changes):
  f, arch, overrides, path = fixture(name)
  args = dict(format='open_clip', arch=arch, checkpoint=path, workdir=str(workdir),
              overrides=json.dumps(overrides))
  args.update(changes)
  cli.main(['import'] + [f'--{k}={v}' for k, v in args.items()])
  return f


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _close(got, ref):
  assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
  assert np.all(np.sum(_unit(got) * _unit(ref), axis=1) >= 0.99999)


@pytest.mark.parametrize('name', FIXTURES)
def test_imported_workdir_embeds_as_open_clip(name, tmp_path):
  f = _import(name, tmp_path / 'w')
  model = inference.load(str(tmp_path / 'w'))
  images = [f[f'images_uint8_{i}'] for i in range(3)]  # 40x57, 64x48, 32x32: resized, cropped
  _close(model.encode_image(images), _unit(f['image_embeddings']))
  tokens = f['tokens'].astype(np.int32)  # the fixture's vocabulary of 512: ids, not texts
  _close(model._batched('encode_b', tokens, 8), _unit(f['text_embeddings']))  # pylint: disable=protected-access
  assert model.tokenize(['a photo of a cat'])[0, :7].tolist() == [
      49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's BPE ids


def test_export_gives_back_the_checkpoint_bit_for_bit(tmp_path):
  _import('vit_b_16', tmp_path / 'w')
  out = tmp_path / 'back.safetensors'
  cli.main(['export', f'--workdir={tmp_path / "w"}', '--format=open_clip', f'--out={out}'])
  original = importer.read_state(fixture('vit_b_16')[3])
  exported = importer.read_state(str(out))
  assert set(exported) == set(original)
  for key, value in original.items():
    assert exported[key].dtype == np.float32 and np.array_equal(exported[key], value), key


def _error(capsys, args):
  with pytest.raises(SystemExit) as e:
    cli.main(args)
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('ERROR: '), err
  return err[0]


def test_wrong_architecture_is_one_line_and_writes_nothing(tmp_path, capsys):
  _, _, b16, _ = fixture('vit_b_16')
  workdir = tmp_path / 'w'
  line = _error(capsys, ['import', '--format=open_clip', '--arch=ViT-B-16',
                         f'--checkpoint={fixture("vit_b_32")[3]}', f'--workdir={workdir}',
                         f'--overrides={json.dumps(b16)}'])
  # The first tensor, in the file's (sorted) order, whose shape differs: patch 8 against 4
  # (the position table, also different, comes later).
  assert "'visual.conv1.weight' has shape [32, 3, 8, 8]" in line and '[32, 3, 4, 4]' in line
  assert not workdir.exists() and os.listdir(tmp_path) == []


def test_missing_extra_and_unknown_inputs_are_one_line(tmp_path, capsys):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  _, arch, overrides, path = fixture('vit_b_32')
  state = importer.read_state(path)
  base = ['import', '--format=open_clip', f'--overrides={json.dumps(overrides)}']
  missing = dict(state)
  del missing['ln_final.bias']
  save_file(missing, str(tmp_path / 'missing.safetensors'))
  save_file(dict(state, extra=np.zeros(3, np.float32)), str(tmp_path / 'extra.safetensors'))
  for ckpt, match in (('missing', "lacks 1 tensor(s) of the architecture, e.g. ['ln_final.bias']"),
                      ('extra', "a tensor the architecture does not: 'extra' [3]")):
    line = _error(capsys, base + [f'--arch={arch}', f'--checkpoint={tmp_path / ckpt}.safetensors',
                                  f'--workdir={tmp_path / ckpt}'])
    assert match in line, line
  assert 'unknown open_clip architecture' in _error(capsys, base + [
      '--arch=ViT-H-99', f'--checkpoint={path}', f'--workdir={tmp_path / "u"}'])
  assert 'unknown format' in _error(capsys, ['import', '--format=timm', f'--arch={arch}',
                                             f'--checkpoint={path}', f'--workdir={tmp_path / "f"}'])
  (tmp_path / 'vocab.txt').write_bytes(os.urandom(2000))
  assert 'is not a clip_bpe tokenizer file' in _error(capsys, base + [
      f'--arch={arch}', f'--checkpoint={path}', f'--tokenizer={tmp_path / "vocab.txt"}',
      f'--workdir={tmp_path / "t"}'])
  (tmp_path / 'model.pt').write_bytes(b'PK not read')
  assert 'pickled torch file' in _error(capsys, base + [
      f'--arch={arch}', f'--checkpoint={tmp_path / "model.pt"}', f'--workdir={tmp_path / "p"}'])
  assert sorted(os.listdir(tmp_path)) == ['extra.safetensors', 'missing.safetensors',
                                          'model.pt', 'vocab.txt']


def test_lit_from_an_imported_workdir_keeps_the_image_tower(tmp_path):
  """configs/clip_emoji.py:runlocal,lit with the imported tiny CLIP's image tower: the locked
  tower and its projection end bitwise equal to the import, the text tower trains."""
  from contrastive import checkpoint  # pylint: disable=g-import-not-at-top
  from contrastive import config_lib  # pylint: disable=g-import-not-at-top
  from contrastive import train  # pylint: disable=g-import-not-at-top
  imported = tmp_path / 'imported'
  _import('vit_b_32', imported)
  model = inference.load_config(str(imported)).model
  config = config_lib.load_config(os.path.join(DATA, '..', '..', 'configs', 'clip_emoji.py'),
                                  'runlocal,lit')
  with config.unlocked():
    config.model.image = model.image.to_dict()
    config.model.embed_dim = model.embed_dim
    config.model_init.update(workdir=str(imported), mapping='tower_a:tower_a,proj_a:proj_a')
    config.eval.every = 0
  run = str(tmp_path / 'run')
  train.train_and_evaluate(config, run)
  start = checkpoint.read_state(checkpoint.latest_step_dir(str(imported)))['params']
  saved = [checkpoint.read_state(checkpoint.latest_step_dir(run, step=s))['params']
           for s in checkpoint.saved_steps(os.path.join(run, 'checkpoints'))]
  assert len(saved) == 2  # steps 3 and 6
  for params in saved:
    for group in ('tower_a', 'proj_a'):
      assert all(jax.tree.leaves(jax.tree.map(np.array_equal, start[group], params[group])))
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, saved[0]['tower_b'],
                                              saved[1]['tower_b'])))


BIG_VISION = {'b16': 'siglip-B/16', 'l16': 'siglip-L/16', 'so400m14': 'siglip-So400m/14'}


@pytest.fixture(scope='module')
def sentencepiece_model(tmp_path_factory):
  """A small SentencePiece model with c4_en's special ids (0 pad, 1 EOS, 2 unk)."""
  import io  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  model = io.BytesIO()
  texts = ['a photo of a cat', 'a dog on the beach', 'two birds in a tree'] * 20
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model,
                                 vocab_size=60, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 hard_vocab_limit=False, minloglevel=2)
  path = tmp_path_factory.mktemp('spm') / 'c4_like.model'
  path.write_bytes(model.getvalue())
  return str(path)


def big_vision_fixture(name):
  """(io npz, arch, overrides, checkpoint path) of a tiny big_vision SigLIP."""
  g = np.load(os.path.join(DATA, f'big_vision_siglip_{name}_io.npz'))
  m = json.loads(str(g['config']))['model']
  image, text = m['image'], m['text']
  overrides = dict(
      image=dict(patch=image['patch_size'][0], width=image['width'], depth=image['depth'],
                 heads=image['num_heads'], mlp_dim=image['mlp_dim']),
      text=dict(width=text['width'], depth=text['depth'], heads=text['num_heads'],
                mlp_dim=text['mlp_dim']),
      embed_dim=m['out_dim'][1], image_size=32, vocab_size=text['vocab_size'],
      context=g['tokens'].shape[1])
  return g, BIG_VISION[name], overrides, os.path.join(DATA, f'big_vision_siglip_{name}.npz')


@pytest.mark.parametrize('name', BIG_VISION)
def test_imported_big_vision_siglip_embeds_as_big_vision(name, tmp_path, sentencepiece_model):
  g, arch, overrides, path = big_vision_fixture(name)
  cli.main(['import', '--format=big_vision', f'--arch={arch}', f'--checkpoint={path}',
            f'--tokenizer={sentencepiece_model}', f'--workdir={tmp_path / "w"}',
            f'--overrides={json.dumps(overrides)}'])
  model = inference.load(str(tmp_path / 'w'))
  images = [g[f'images_uint8_{i}'] for i in range(3)]  # 45x61, 24x40, 32x32: squashed to 32
  _close(model.encode_image(images), g['zimg'])
  _close(model._batched('encode_b', g['tokens'].astype(np.int32), 8), g['ztxt'])  # pylint: disable=protected-access
  logit = model.variables['params']['logit']
  np.testing.assert_allclose(np.exp(logit['log_scale']), g['t'].reshape(()), rtol=1e-6)
  np.testing.assert_allclose(logit['bias'], g['b'].reshape(()), rtol=1e-6)
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  pieces = spm.SentencePieceProcessor(model_file=sentencepiece_model).encode('a cat')
  rows = model.tokenize(['A CAT', 'a cat ' * 20])  # lowercased; padded with EOS (1); cut: EOS last
  assert rows[0].tolist() == pieces + [1] * (16 - len(pieces))
  assert rows[1][-1] == 1 and 1 not in rows[1][:-1].tolist()
  out = tmp_path / 'back.npz'
  cli.main(['export', f'--workdir={tmp_path / "w"}', '--format=big_vision', f'--out={out}'])
  original, exported = importer.read_state(path), importer.read_state(str(out))
  assert set(exported) == set(original)
  for key, value in original.items():
    assert np.array_equal(exported[key], value), key


def test_scanned_big_vision_blocks_are_unstacked():
  from contrastive.weights import big_vision_format  # pylint: disable=g-import-not-at-top
  state = {'params/img/Transformer/encoderblock/LayerNorm_0/scale': np.arange(6.).reshape(3, 2),
           'params/t': np.zeros(1, np.float32)}
  out = big_vision_format.normalize_state(state)
  assert list(out) == [f'img/Transformer/encoderblock_{i}/LayerNorm_0/scale' for i in range(3)
                       ] + ['t']
  np.testing.assert_array_equal(out['img/Transformer/encoderblock_2/LayerNorm_0/scale'], [4, 5])
  bf16 = np.array([0x3F80, 0xC000], np.uint16).view('V2')  # bfloat16 1.0 and -2.0 as voids
  np.testing.assert_array_equal(big_vision_format.normalize_state({'b': bf16})['b'], [1, -2])


def test_encode_image_takes_floats_in_0_1_and_encode_text_a_string(tmp_path):
  _import('vit_b_32', tmp_path / 'w')
  model = inference.load(str(tmp_path / 'w'))
  images = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3)).astype(np.uint8)
  np.testing.assert_array_equal(model.encode_image(images / 255.0), model.encode_image(images))
  with pytest.raises(ValueError, match=r'float images must be in \[0, 1\]'):
    model.encode_image(images.astype(np.float32))  # 0..255 floats: not silently clipped
  with pytest.raises(ValueError, match='uint8 or float'):
    model.encode_image(images.astype(np.int64))
  np.testing.assert_array_equal(model.tokenize('a cat'), model.tokenize(['a cat']))
  with pytest.raises(TypeError, match='texts must be strings'):
    model.encode_text(['a cat', 3])
