"""A mixture of pair datasets in one run (contrastive/data/mixture.py, MM-Embed): its rows and
group ids, its batch plan (fixed rows per part, every part's rows once per part-epoch, exact
resume), text queries through tower b in the objective, corpus-mined negatives kept to each
row's own part against a NumPy brute force, and the config errors. The step on 1 and 8
devices with mixed rows is in tests/test_two_tower.py; the recipe through main in
tests/test_two_tower_main.py."""

import types

import jax
import ml_collections
import numpy as np
import pytest

from contrastive import objectives
from contrastive import parallel
from contrastive import step as step_lib
from contrastive.batching import loader as loader_lib
from contrastive.batching.mixture_plan import MixturePlan
from contrastive.config_lib import ConfigError
from contrastive.data import mixture
from contrastive.data import pair_batches
from contrastive.models import two_tower as two_tower_lib
from contrastive.negatives import corpus_index
from contrastive.recipes import two_tower
from contrastive.recipes import two_tower_checks
from tests import float64
from tests import test_two_tower as tt
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)


class Tokenizer:
  """Text 't<j>' -> tokens [j, 1, 0, ...]; '' -> [1, 0, ...] (a stand-in for SentencePiece)."""

  def encode(self, texts, length):
    ids = np.zeros((len(texts), length), np.int32)
    for n, t in enumerate(texts):
      ids[n, :2] = (int(t[1:]), 1) if t else (1, 0)
    return ids, 0


class Records:
  """A raw pair source: a list of records with `__getitems__`."""

  def __init__(self, records):
    self.records = records

  def __len__(self):
    return len(self.records)

  def __getitems__(self, indices):
    return [self.records[int(i)] for i in indices]


def image_part(n, with_row=False):
  """n emoji-like rows: a 4x4 image (its value the row number), text 't<i>', group i // 2."""
  records = [{'image': np.full((4, 4, 3), i, np.uint8), 'text': f't{i}', 'image_id': i // 2}
             for i in range(n)]
  return pair_batches.TokenizedPairs(Records(records), pair_batches.SPECS['emoji_cldr'],
                                     Tokenizer(), 4, with_row=with_row)


def text_part(n, with_row=False):
  """n WordNet-like rows: word 't<100 + i>', gloss 't<10 + i>', group i."""
  records = [{'text_a': f't{100 + i}', 'text_b': f't{10 + i}', 'synset_id': i} for i in range(n)]
  return pair_batches.TokenizedPairs(Records(records), pair_batches.SPECS['wordnet_gloss'],
                                     Tokenizer(), 4, with_row=with_row)


def test_rows_keep_their_part_and_carry_both_query_kinds():
  source = mixture.MixturePairs(['emoji_cldr', 'wordnet_gloss'],
                                [image_part(6, True), text_part(5, True)], (4, 4, 3))
  assert len(source) == 11 and source.mixed
  rows = source.__getitems__([7, 2, 10, 0])  # interleaved parts, in the asked order
  assert [int(r['task']) for r in rows] == [1, 0, 1, 0]
  assert [int(r['row']) for r in rows] == [7, 2, 10, 0]
  assert [int(r['id']) for r in rows] == [(1 << 24) + 1, 1, (1 << 24) + 4, 0]
  word, image = rows[0], rows[1]
  assert word['a_is_text'] and not image['a_is_text']
  np.testing.assert_array_equal(word['a_text'], [101, 1, 0, 0])  # the word's tokens
  np.testing.assert_array_equal(word['a'], np.zeros((4, 4, 3)))  # no image
  np.testing.assert_array_equal(word['b'], [11, 1, 0, 0])
  np.testing.assert_array_equal(image['a'], np.full((4, 4, 3), 2))
  np.testing.assert_array_equal(image['a_text'], [1, 0, 0, 0])  # the empty text
  # Text-only parts: no a_text, side a stays tokens (the model's tower a embeds them).
  plain = mixture.MixturePairs(['a', 'b'], [text_part(3), text_part(2)])
  assert not plain.mixed and 'a_text' not in plain[4]


def test_plan_fixes_each_parts_rows_and_covers_each_part_per_epoch():
  plan = MixturePlan([10, 30], [2, 6])
  batches = loader_lib.global_rows(plan, seed=3, steps=5)  # one epoch of each part
  assert batches.shape == (5, 8)
  assert (batches[:, :2] < 10).all() and (batches[:, 2:] >= 10).all()
  np.testing.assert_array_equal(np.sort(batches[:, :2].ravel()), np.arange(10))
  np.testing.assert_array_equal(np.sort(batches[:, 2:].ravel()), np.arange(10, 40))
  np.testing.assert_array_equal(batches, loader_lib.global_rows(plan, seed=3, steps=5))
  assert not np.array_equal(batches, loader_lib.global_rows(plan, seed=4, steps=5))
  # The smaller part starts its next epoch with another order.
  assert not np.array_equal(plan.rows(0, 3)[:2], plan.rows(5, 3)[:2])


def test_loader_resumes_exactly():
  source = mixture.MixturePairs(['emoji_cldr', 'wordnet_gloss'], [image_part(6), text_part(9)],
                                (4, 4, 3))
  plan = MixturePlan(source.sizes, [2, 4])
  stream = iter(loader_lib.composed_loader(source, plan, global_batch_size=6, seed=1))
  for _ in range(3):
    next(stream)
  state = stream.get_state()
  want = [next(stream) for _ in range(4)]
  resumed = iter(loader_lib.composed_loader(source, plan, global_batch_size=6, seed=1))
  resumed.set_state(state)
  for w in want:
    got = next(resumed)
    assert set(got) == set(w)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k], err_msg=k)
  assert want[0]['a_is_text'].tolist() == [False] * 2 + [True] * 4
  config = ml_collections.ConfigDict(dict(batch_size=6, dataset=dict(
      name='mixture', parts=('emoji_cldr', 'wordnet_gloss'), fractions=(1 / 3, 2 / 3))))
  # The objective's static layout is the loader's.
  runs = mixture.query_runs(config.dataset, config.batch_size)
  assert runs == ((0, 2, False), (2, 6, True))
  for batch in want:
    mask = np.concatenate([np.full(stop - start, text) for start, stop, text in runs])
    np.testing.assert_array_equal(batch['a_is_text'], mask)


def test_objective_embeds_text_queries_with_tower_b():
  """za of a text row is tower b's embedding of its a_text, of an image row tower a's of its
  image (float64: the rows are computed in one batched call; the same per row)."""
  config = tt._config()
  model = two_tower_lib.build_two_tower(two_tower.model_config(config))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (tt.B, tt.S, tt.S, 3), dtype=np.uint8)
  is_text = np.arange(tt.B) % 3 == 0
  images[is_text] = 0
  a_text, b = tt._tokens(rng, tt.B), tt._tokens(rng, tt.B)
  params = float64.cast(model.init(jax.random.key(0), images[:2], b[:2])['params'])
  state = types.SimpleNamespace(batch_stats={})
  embed = lambda objective: jax.jit(  # rows -> (za, zb)
      lambda rows: objective.embed(params, state, rows, jax.random.key(1))[0])
  where = embed(objectives.two_tower(model=model, loss_name='sigmoid_loss'))
  encode = jax.jit(lambda x, method: model.apply({'params': params}, x, method=method),
                   static_argnames='method')
  rows = dict(a=images, b=b, a_text=a_text, a_is_text=is_text,
              id=np.arange(tt.B, dtype=np.int32), truncated=np.zeros(tt.B, np.int32))
  za, zb = where(rows)
  from_image, from_text = encode(images, 'encode_a'), encode(a_text, 'encode_b')
  float64.assert_close(za[~is_text], from_image[~is_text])
  float64.assert_close(za[is_text], from_text[is_text])
  float64.assert_close(zb, encode(b, 'encode_b'))
  assert np.min(np.abs(from_image[is_text] - from_text[is_text]).max(1)) > 1e-3  # differ
  # The plan's layout (parts contiguous): each tower on its own rows only, the same za.
  runs = ((0, 8, False), (8, 20, True), (20, tt.B, False))
  in_runs = dict(rows, a_is_text=(np.arange(tt.B) >= 8) & (np.arange(tt.B) < 20))
  split = embed(objectives.two_tower(model=model, loss_name='sigmoid_loss', query_runs=runs))
  za_split, zb_split = split(in_runs)
  za_where, zb_where = where(in_runs)
  float64.assert_close(za_split, za_where)
  float64.assert_close(zb_split, zb_where)
  za_wrong, _ = split(dict(in_runs, a_is_text=~in_runs['a_is_text']))  # the runs decide
  float64.assert_close(za_wrong, za_split)
  # The loss reads those embeddings: without the text queries it differs.
  loss = jax.jit(lambda rows: objectives.two_tower(model=model, loss_name='sigmoid_loss')(
      params, state, rows, jax.random.key(1))[0])
  plain = {k: v for k, v in rows.items() if k not in ('a_text', 'a_is_text')}
  assert np.isfinite(loss(rows)) and abs(float(loss(rows)) - float(loss(plain))) > 1e-3


class MixedRows:
  """A mixture's training rows for the corpus index: part 0 images (3-vectors) with texts
  t0..t5, part 1 words (tokens of t100..t105, embedded by tower b) with glosses t10..t15."""

  def __init__(self):
    rng = np.random.default_rng(0)
    self.emb = rng.standard_normal((120, 3))
    self.emb[:6] = self.emb[10:16] + 0.05 * rng.standard_normal((6, 3))  # names ~ glosses:
    self.emb[100:106] = self.emb[10:16] + 0.1 * rng.standard_normal((6, 3))  # the nearest
    self.images = self.emb[:6] + 0.1 * rng.standard_normal((6, 3))  # foreign texts are hard
    self.tokenizer, self.context = Tokenizer(), 3
    self.texts = [f't{i}' for i in range(6)] + [f't{10 + i}' for i in range(6)]
    self.ids = np.array(list(range(6)) + [(1 << 24) + i for i in range(6)], np.int32)

  def __len__(self):
    return 12

  def query_parts(self):
    words = Tokenizer().encode([f't{100 + i}' for i in range(6)], 3)[0]
    return [('a', np.arange(6), dict(a=self.images, id=self.ids[:6], text_b=self.texts[:6])),
            ('b', np.arange(6, 12), dict(a=words, id=self.ids[6:], text_b=self.texts[6:]))]

  def embed(self, state, side, items):
    del state
    x = items if side == 'a' else self.emb[items[:, 0]]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(rows, k, same_part):
  """Each row's k highest-cosine texts (as text numbers) other than its own; with
  `same_part` only its own part's."""
  queries = np.concatenate([rows.embed(None, 'a', rows.images),
                            rows.embed(None, 'b', np.array([[100 + i] for i in range(6)]))])
  numbers = np.array([int(t[1:]) for t in rows.texts])
  texts = rows.embed(None, 'b', numbers[:, None])
  out = []
  for r in range(12):
    keep = [j for j in range(12) if j != r and (not same_part or j // 6 == r // 6)]
    order = np.argsort(-(texts[keep] @ queries[r]))[:k]
    out.append(sorted(numbers[keep][order]))
  return np.array(out)


@pytest.mark.parametrize('same_part', [True, False])
def test_mined_negatives_come_from_the_rows_own_part(same_part):
  rows = MixedRows()
  mesh = parallel.make_mesh([('data', -1)])
  index = corpus_index.CorpusIndex(rows, mesh, corpus_index.HardNegatives(
      num_hard=2, refresh_every=1, block_size=4, same_part=same_part))
  state = step_lib.TrainState(step=0, params={}, batch_stats={}, opt_state=(), skipped_steps=0,
                              mined=jax.device_put(index.empty(), parallel.replicated(mesh)))
  index.sync(state)
  index.refresh(rows.embed, state, 0)
  mined = np.sort(index.tokens[index.table, 0], axis=1)  # text numbers
  np.testing.assert_array_equal(mined, brute_force(rows, 2, same_part))
  own_part = (mined >= 10) == (np.arange(12) >= 6)[:, None]
  if same_part:  # MM-Embed: an image's negatives are names, a word's glosses
    assert own_part.all()
  else:  # counterexample: the nearest texts are the other part's
    assert (~own_part).mean() > 0.5


def _config(**dataset):
  from contrastive import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config('configs/siglip_emoji_wordnet.py', 'runlocal')
  config.dataset.update(dataset)
  return config


@pytest.mark.parametrize('changes, match', [
    (dict(fractions=(0.5, 0.4)), r'must be a whole number >= 1, and they must sum'),
    (dict(fractions=(0.3, 0.7)), r'must be a whole number'),
    (dict(parts=('emoji_cldr',), fractions=(1.0,)), r'needs >= 2 distinct datasets'),
    (dict(parts=('emoji_cldr', 'imagenet')), r"\['imagenet'\] are not pair datasets"),
    ({'lit.locked_tower': 'text'}, r'the text tower \(tower b\) also embeds the mixture'),
    ({'model.share': True}, r'cannot be shared with the image tower'),
])
def test_bad_mixtures_fail_before_reading_data(changes, match):
  config = _config(**{k: v for k, v in changes.items() if '.' not in k})
  for field, value in changes.items():
    if '.' in field:
      section, name = field.split('.')
      config[section][name] = value
  with pytest.raises(ConfigError, match=match):
    two_tower_checks.validate(config)


def test_mixture_needs_steps_and_its_own_batches():
  config = _config()
  config.total_steps = 0
  with pytest.raises(ConfigError, match='no common epoch'):
    two_tower_checks.validate(config)
  config = _config()
  config.batching.method = 'tas_b'
  config.batching.num_topics = 4
  with pytest.raises(ConfigError, match='composes its batches'):
    two_tower_checks.validate(config)


def test_aot_batch_has_the_loaders_fields():
  """The batch the TPU compile (aot_report) lowers the step with has the fields, per-row shapes
  and dtypes of a real batch of the mixture with NegCLIP and mined negatives (the loader's
  rows stacked, the mined texts attached): the compiled memory counts every input."""
  from contrastive.data import pipeline  # pylint: disable=g-import-not-at-top
  parts = [image_part(6, True), text_part(5, True)]
  for part in parts:
    part.negclip = 2
  source = mixture.MixturePairs(['emoji_cldr', 'wordnet_gloss'], parts, (4, 4, 3))
  config = ml_collections.ConfigDict(dict(
      loss=dict(name='sigmoid_loss'), lit=dict(locked_tower=''), negclip=dict(num_negatives=2), model={},
      hard_negatives=dict(corpus_index.DEFAULTS, num_hard=2, refresh_every=1)))
  index = corpus_index.CorpusIndex(source, parallel.make_mesh([('data', -1)]),
                                   two_tower_checks.hard_negatives(config))
  index.table = index.empty()
  batch = index.attach(pipeline._stack(source.__getitems__([0, 7, 3])))  # pylint: disable=protected-access
  inputs = (np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 4), np.int32))
  fields = two_tower.batch_fields(two_tower.settings(config), inputs, [p.spec for p in parts],
                                  index.width)
  assert set(fields) == set(batch)
  for name, (shape, dtype) in fields.items():
    assert batch[name].shape[1:] == tuple(shape) and batch[name].dtype == dtype, name
