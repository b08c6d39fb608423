"""The standard zero-shot and retrieval tasks (`python -m contrastive.evaluate`,
contrastive/eval_tasks/): metrics against a NumPy re-derivation (ties, duplicate captions,
classes of very different sizes), template averaging, the CLI on a generated ImageFolder equal
to a direct computation with `inference.load`, one-line errors before any model work, 1 and 8
devices, and the periodic evaluation inside a :runlocal run."""

import json
import os

import jax
import numpy as np
from PIL import Image
import pytest

from contrastive import inference
from contrastive import retrieval
from contrastive.eval_tasks import metrics
from contrastive.eval_tasks import runner
from contrastive.eval_tasks import sources
from tests import test_weights


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_zero_shot(image_emb, class_emb, labels):
  """acc1, acc5 and mean per-class recall, written out (stable sort: ties -> lower class)."""
  order = np.argsort(-(image_emb @ class_emb.T), axis=1, kind='stable')
  top1 = order[:, 0] == labels
  top5 = np.array([labels[i] in order[i, :5] for i in range(len(labels))])
  recalls = [top1[labels == c].mean() for c in np.unique(labels)]
  return {'acc1': top1.mean(), 'acc5': top5.mean(), 'mean_per_class_recall': np.mean(recalls)}


def test_zero_shot_streamed_equals_the_reference():
  rng = np.random.default_rng(0)
  class_emb = _unit(rng.normal(size=(8, 16)))
  class_emb[5] = class_emb[2]  # a tie: class 2 wins
  labels = np.concatenate([np.zeros(60, int), np.arange(1, 8).repeat(3)])  # 60 vs 3 each
  image_emb = _unit(class_emb[labels] + rng.normal(scale=0.9, size=(len(labels), 16)))
  acc = metrics.ZeroShot(class_emb, block_size=3)
  for start in range(0, len(labels), 7):  # streamed in uneven batches
    acc.add(image_emb[start:start + 7], labels[start:start + 7])
  got, want = acc.result(), reference_zero_shot(image_emb, class_emb, labels)
  assert metrics.ZeroShot(class_emb[:4]).result()['acc5'] is None  # < 5 classes
  assert got.keys() == want.keys()
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-12), k
  assert got['mean_per_class_recall'] != pytest.approx(got['acc1'])  # imbalance matters


def reference_retrieval(image_emb, text_emb, text_image, k):
  s = text_emb @ image_emb.T
  t2i = np.mean([text_image[t] in np.argsort(-s[t], kind='stable')[:k] for t in range(len(s))])
  i2t = np.mean([any(text_image[j] == i for j in np.argsort(-s[:, i], kind='stable')[:k])
                 for i in range(len(image_emb))])
  return t2i, i2t


def test_retrieval_recalls_equal_the_reference():
  rng = np.random.default_rng(1)
  image_emb = _unit(rng.normal(size=(12, 8)))
  text_image = np.array([0, 0, 0, 0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11])
  text_emb = _unit(image_emb[text_image] + rng.normal(scale=0.8, size=(len(text_image), 8)))
  text_emb[6] = text_emb[5]  # a duplicate caption of two images
  got = metrics.retrieval_recalls(image_emb, text_emb, text_image, ks=(1, 5, 10), block_size=4)
  for k in (1, 5, 10):
    t2i, i2t = reference_retrieval(image_emb, text_emb, text_image, k)
    assert got[f'image_retrieval_recall@{k}'] == pytest.approx(t2i, abs=1e-12)
    assert got[f'text_retrieval_recall@{k}'] == pytest.approx(i2t, abs=1e-12)


def test_class_embedding_is_the_normalised_mean_of_normalised_templates():
  rng = np.random.default_rng(2)
  table = {}
  encode = lambda texts: np.stack([table.setdefault(t, rng.normal(size=4)) for t in texts])
  got = np.asarray(retrieval.class_embeddings(encode, ['cat', 'dog'], ['a {}', '{}!'], list))
  for row, name in zip(got, ('cat', 'dog')):
    want = _unit(np.mean([_unit(table[t]) for t in (f'a {name}', f'{name}!')], axis=0))
    np.testing.assert_allclose(row, want, rtol=1e-6)


@pytest.fixture(scope='module')
def imported(tmp_path_factory, sentencepiece_model):
  """A tiny big_vision SigLIP imported as a workdir, and a generated ImageFolder + captions."""
  root = tmp_path_factory.mktemp('eval')
  _, arch, overrides, path = test_weights.big_vision_fixture('b16')
  workdir = root / 'w'
  test_weights.cli.main(['import', '--format=big_vision', f'--arch={arch}',
                         f'--checkpoint={path}', f'--tokenizer={sentencepiece_model}',
                         f'--workdir={workdir}', f'--overrides={json.dumps(overrides)}'])
  rng, lines = np.random.default_rng(3), []
  for c, (name, count) in enumerate((('tabby_cat', 9), ('dog', 2), ('bird', 4))):
    os.makedirs(root / 'folder' / name)
    for i in range(count):
      size = (24 + 8 * (i % 3), 40 - 4 * c)
      Image.fromarray(rng.integers(0, 256, (*size, 3), np.uint8)).save(
          root / 'folder' / name / f'{i}.png')
      lines += [json.dumps({'image': f'folder/{name}/{i}.png', 'text': t})
                for t in (f'a {name}', f'picture {i}')]
  (root / 'folder' / 'dog' / 'broken.jpg').write_bytes(b'\xff\xd8\xff not a jpeg')
  (root / 'captions.jsonl').write_text('\n'.join(lines) + '\n')
  (root / 'templates.txt').write_text('a photo of a {}.\n{}\n')
  return root


sentencepiece_model = test_weights.sentencepiece_model


def test_cli_equals_a_direct_computation(imported, capsys):
  root = imported
  out = root / 'results.jsonl'
  runner.main(['--workdir', str(root / 'w'), '--tasks',
               f'zeroshot:imagefolder:{root / "folder"},retrieval:jsonl:{root / "captions.jsonl"}',
               '--templates', str(root / 'templates.txt'), '--out', str(out), '--batch_size', '4'])
  zero, ret = [json.loads(line) for line in out.read_text().splitlines()]
  assert zero['task'] == 'zeroshot_classification' and zero['skipped_images'] == 1
  model = inference.load(str(root / 'w'))
  task = sources.parse(f'zeroshot:imagefolder:{root / "folder"}')
  assert task.class_names == ['bird', 'dog', 'tabby cat']
  good = [(p, c) for p, c in task.images if not p.endswith('broken.jpg')]
  image_emb = model.encode_image([np.asarray(Image.open(p).convert('RGB')) for p, _ in good])
  templates = ['a photo of a {}.', '{}']
  class_emb = _unit(np.stack([np.mean(model.encode_text([t.format(c) for t in templates]), 0)
                              for c in task.class_names]))
  scores = np.sort(image_emb.astype(np.float64) @ class_emb.T.astype(np.float64), axis=1)
  assert np.min(scores[:, -1] - scores[:, -2]) > 1e-4  # no near-tie a float32 sum could flip
  want = reference_zero_shot(image_emb, class_emb, np.array([c for _, c in good]))
  assert zero['metrics']['acc5'] is None  # 3 classes
  for k in ('acc1', 'mean_per_class_recall'):
    assert zero['metrics'][k] == pytest.approx(want[k], abs=1e-9), k
  assert set(ret['metrics']) == {f'{d}_retrieval_recall@{k}' for d in ('image', 'text')
                                 for k in (1, 5, 10)}
  assert 'mean_per_class_recall' in capsys.readouterr().out  # the summary table


@pytest.mark.parametrize('make, match', [
    (lambda r: 'zeroshot:nosuch_dataset_xyz', 'not prepared as array_record'),
    (lambda r: 'classify:x', 'unknown task'),
    (lambda r: f'zeroshot:imagefolder:{r / "empty"}', 'has no images'),
    (lambda r: f'retrieval:jsonl:{r / "missing.jsonl"}', 'not found'),
])
def test_bad_tasks_are_one_line_before_any_model_work(imported, tmp_path, capsys, make, match):
  (imported / 'empty' / 'cls').mkdir(parents=True, exist_ok=True)
  with pytest.raises(SystemExit) as e:
    runner.main(['--workdir', str(tmp_path / 'no_workdir'), '--tasks', make(imported),
                 '--data_dir', str(tmp_path)])
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and match in err[0], err
  (tmp_path / 't.txt').write_text('a photo\n')
  with pytest.raises(sources.EvalDataError, match="'{}' once"):
    runner.load_templates(str(tmp_path / 't.txt'))


def test_one_and_eight_devices_give_the_same_embeddings(imported, monkeypatch):
  """The towers run in float64 (the parameters cast), where splitting a batch over devices
  moves a value by ~1e-15; `encode_image` returns float32, so the two results may differ by
  the rounding of that cast: at most one float32 ulp of each value, on any CPU."""
  from tests import float64  # pylint: disable=g-import-not-at-top
  model = inference.load(str(imported / 'w'))
  images = [np.full((30, 20, 3), i * 20, np.uint8) for i in range(11)]
  with float64.enabled():
    model.variables = float64.cast(model.variables)
    eight = model.encode_image(images, batch_size=16)
    assert len(jax.local_devices()) == 8
    monkeypatch.setattr(jax, 'local_devices', lambda: jax.devices()[:1])
    one = model.encode_image(images, batch_size=16)
  assert np.all(np.abs(eight - one) <= np.spacing(np.abs(one)))


def test_periodic_evaluation_runs_the_tasks(imported, tmp_path):
  """configs/siglip_emoji.py:runlocal with config.eval.tasks: the final evaluation (and the
  metrics file) hold the tasks' metrics; unusable task data is a ConfigError before
  compiling."""
  from contrastive import config_lib  # pylint: disable=g-import-not-at-top
  from contrastive import train  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(os.path.join(os.path.dirname(__file__), '..', 'configs',
                                               'siglip_emoji.py'), 'runlocal')
  config.eval.tasks = f'zeroshot:imagefolder:{imported / "folder"}'
  config.eval.templates = str(imported / 'templates.txt')
  _, final = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 0 <= final['imagefolder:folder/acc1'] <= 1
  assert 'imagefolder:folder/acc5' not in final  # 3 classes: no top-5 (CLIP_benchmark: NaN)
  config.eval.tasks = 'zeroshot:imagefolder:/no/such/folder'
  with pytest.raises(config_lib.ConfigError, match='config.eval.tasks: image folder'):
    train.train_and_evaluate(config, str(tmp_path / 'run2'))


def test_webdataset_linear_probe_and_class_names(imported, tmp_path, capsys):
  from tests import webdataset_shards as ws  # pylint: disable=g-import-not-at-top
  root = imported
  ws.clean_shards(str(tmp_path / 'shards'), num_shards=2, per_shard=6)  # labels red/green/blue
  (tmp_path / 'colours.txt').write_text('red\ngreen\nblue\n')
  for split in ('train', 'test'):
    for name in ('a', 'b'):
      os.makedirs(tmp_path / 'probe' / split / name)
      for i in range(4):
        value = 40 if name == 'a' else 200
        Image.fromarray(np.full((20 + i, 24, 3), value + i, np.uint8)).save(
            tmp_path / 'probe' / split / name / f'{i}.png')
  out = tmp_path / 'r.jsonl'
  runner.main(['--workdir', str(root / 'w'), '--tasks',
               f'zeroshot:wds:{tmp_path}/shards/*.tar,linear:imagefolder:{tmp_path / "probe"}',
               '--classnames', str(tmp_path / 'colours.txt'), '--out', str(out)])
  wds, probe = [json.loads(line) for line in out.read_text().splitlines()]
  assert wds['task'] == 'zeroshot_classification' and wds['skipped_images'] == 0
  assert probe['task'] == 'linear_probe' and probe['metrics']['lp_acc1'] == 1.0  # separable
  assert len(sources.parse(f'zeroshot:wds:{tmp_path}/shards/*.tar', '',
                           str(tmp_path / 'colours.txt')).images) == 12
  (tmp_path / 'two.txt').write_text('x\ny\n')
  with pytest.raises(sources.EvalDataError, match='has 3 classes; .*names 2'):
    sources.parse(f'zeroshot:imagefolder:{root / "folder"}', '', str(tmp_path / 'two.txt'))
  capsys.readouterr()


def test_templates_read_clip_benchmark_placeholders(tmp_path):
  (tmp_path / 't.txt').write_text('a photo of a {c}.\n{}\n')
  assert runner.load_templates(str(tmp_path / 't.txt')) == ['a photo of a {}.', '{}']
  assert len(runner.load_templates()) == 80  # CLIP's ImageNet templates
