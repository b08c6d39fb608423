"""config.hard_negatives (contrastive/negatives/corpus_index.py): the refreshed corpus index of
the two-tower recipes against a NumPy brute force, the batch's mined texts, their place in
SigLIP's loss, and the config errors. The tiled top-k itself is tested on 1, 2 and 8 devices
in tests/test_corpus_mining.py; the SIGKILL resume of a run with mined negatives in
tests/test_two_tower_main.py (slow)."""

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import ml_collections
import numpy as np
import pytest

from contrastive import objectives
from contrastive import parallel
from contrastive import step as step_lib
from contrastive.data import pair_batches
from contrastive.losses import blockwise
from contrastive.losses import sigmoid_loss
from contrastive.negatives import corpus_index
from contrastive.recipes import two_tower_checks
from tests import reference
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)


class Tokenizer:
  """Text 't<j>' -> tokens [j, 1, 0] (a stand-in for the SentencePiece tokenizer)."""

  def encode(self, texts, length):
    ids = np.zeros((len(texts), length), np.int32)
    ids[:, 0] = [int(t[1:]) for t in texts]
    ids[:, 1] = 1
    return ids, 0


class Rows:
  """N training rows: side a a 3-vector, text b 't<j>', a group id."""

  def __init__(self, a, texts, ids):
    self.a, self.texts, self.ids = a, texts, ids
    self.tokenizer, self.context = Tokenizer(), 3

  def __len__(self):
    return len(self.ids)

  def side_a(self, indices, texts_b=False):
    indices = np.asarray(list(indices))
    out = {'a': self.a[indices], 'id': self.ids[indices].astype(np.int32)}
    if texts_b:
      out['text_b'] = [self.texts[i] for i in indices]
    return out


def data():
  """22 rows over 12 texts: rows 13..20 repeat the texts (and side-a items) of rows 0 and
  6..12 in the same groups, rows 3 and 4 share a text and an item; texts 0 / 9, 1 / 10 and
  2 / 11 share a group (ids modulo 9); text embeddings with an exact tie (2 and 7). Side a is
  near its own text, as in a trained model, so the exclusions decide the top of the ranking."""
  rng = np.random.default_rng(0)
  text_of_row = np.array([0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 5, 6, 7, 8, 9, 10, 11, 4])
  ids = np.append(text_of_row[:-1] % 9, 7)  # the last row: text 4 in group 7 (text 4's own
  # candidate id is group 4, its first row's: only `positive` keeps it from this row)
  text_emb = rng.standard_normal((12, 3))
  text_emb[7] = text_emb[2]  # a tie
  a = (text_emb + 0.1 * rng.standard_normal((12, 3)))[text_of_row]
  return Rows(a, [f't{j}' for j in text_of_row], ids), text_of_row, text_emb


def embed_fn(text_emb):
  def embed(state, side, items):
    del state
    x = items if side == 'a' else text_emb[items[:, 0]]
    return x / np.linalg.norm(x, axis=1, keepdims=True)
  return embed


def brute_force(rows, text_of_row, text_emb, k, first_group_only=False):
  """Each row's k highest-cosine texts (sorted by text name, as np.unique does: 't0', 't1',
  't10', 't11', 't2', ...) that are not a text of its group (its own text included). With
  `first_group_only` (the counterexample) a text counts only for the group of its first row."""
  names = sorted(set(rows.texts))
  emb = text_emb[[int(n[1:]) for n in names]]
  emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  groups_of_text = {}
  for t, g in zip(rows.texts, rows.ids):
    groups = groups_of_text.setdefault(names.index(t), [])
    if not (first_group_only and groups):
      groups.append(g)
  out = []
  for i in range(len(rows)):
    q = rows.a[i] / np.linalg.norm(rows.a[i])
    keep = [j for j in range(len(names)) if names[j] != rows.texts[i]
            and rows.ids[i] not in groups_of_text[j]]
    scores = emb[keep] @ q
    order = np.argsort(-scores, kind='stable')[:k]
    out.append([keep[o] for o in order] + [-1] * (k - len(order)))
  return np.array(out), names


def hard(**fields):
  return corpus_index.HardNegatives(**fields)


def test_mined_table_equals_a_brute_force_and_the_batch_carries_its_texts():
  rows, text_of_row, text_emb = data()
  mesh = parallel.make_mesh([('data', -1)])
  index = corpus_index.CorpusIndex(rows, mesh, hard(num_hard=4, refresh_every=3, block_size=5))
  assert len(index.a_parts[0][1]) == 12 and len(index.tokens) == 12
  state = step_lib.TrainState(step=0, params={}, batch_stats={}, opt_state=(), skipped_steps=0,
                              mined=jax.device_put(index.empty(), parallel.replicated(mesh)))
  index.sync(state)
  batch = {'row': np.array([4, 13]), 'id': rows.ids[[4, 13]]}
  before = index.attach(batch)  # no refresh yet: every entry invalid, the row's own text
  assert 'row' not in before and not before['b_hard_valid'].any()
  np.testing.assert_array_equal(before['b_hard'][:, :, 0], [[3] * 4, [0] * 4])
  np.testing.assert_array_equal(before['b_hard_id'], [[3] * 4, [0] * 4])

  state = index.refresh(embed_fn(text_emb), state, 0)  # no plan: every row
  want, names = brute_force(rows, text_of_row, text_emb, 4)
  np.testing.assert_array_equal(index.table, want)
  np.testing.assert_array_equal(np.asarray(state.mined), want)
  assert [index.due(s) for s in range(7)] == [False, False, False, True, False, False, True]
  index.from_start = True  # config.hard_negatives.from_start: also before the first update
  assert [index.due(s) for s in range(4)] == [True, False, False, True]
  after = index.attach(batch)
  assert after['b_hard_valid'].all()
  np.testing.assert_array_equal(after['b_hard'][:, :, 0],
                                [[int(names[j][1:]) for j in want[r]] for r in (4, 13)])
  for r in range(len(rows)):  # never the row's own text or a text of its group
    assert index.text_of_row[r] not in want[r]
    assert rows.ids[r] not in index.candidate_ids[want[r]]
  # A text of two groups: text 4 is in groups 4 and 7. Mined deep enough (9 of 12 texts),
  # group 7's rows would get it if a text counted only for its first row's group.
  deep = corpus_index.CorpusIndex(rows, mesh, hard(num_hard=9, refresh_every=3, block_size=5))
  assert deep.width == 2  # group 7: texts 7 and 4
  raw = [{'image_id': g, 'text': t.encode()} for g, t in zip(rows.ids, rows.texts)]
  raw_source = type('Raw', (), dict(__len__=lambda self: len(raw),
                                    __getitems__=lambda self, i: [raw[j] for j in i]))()
  spec = pair_batches.SPECS['emoji_cldr']  # the AOT batch's width, from the records alone
  assert corpus_index.group_width([raw_source], [spec]) == 2
  deep.sync(state.replace(mined=jax.device_put(deep.empty(), parallel.replicated(mesh))))
  deep.refresh(embed_fn(text_emb), state.replace(mined=jnp.asarray(deep.empty())), 0)
  want9, _ = brute_force(rows, text_of_row, text_emb, 9)
  np.testing.assert_array_equal(deep.table, want9)
  old, _ = brute_force(rows, text_of_row, text_emb, 9, first_group_only=True)
  shared, group7 = names.index('t4'), np.flatnonzero(rows.ids == 7)  # rows 8, 16 and 21
  assert [r for r in group7 if shared in old[r]] == [8, 16]
  assert not any(shared in deep.table[r] for r in group7)
  shared_rows = deep.attach({'row': np.array([8, 21, 5]), 'id': rows.ids[[8, 21, 5]]})
  np.testing.assert_array_equal(shared_rows['b_group_texts'],
                                [sorted([names.index('t4'), names.index('t7')])] * 2
                                + [[names.index('t4'), -1]])
  np.testing.assert_array_equal(shared_rows['b_text'], [names.index(n) for n in
                                                        ('t7', 't4', 't4')])
  # Counterexample: ranking by similarity alone puts the own text first for most rows.
  za = embed_fn(text_emb)(None, 'a', rows.a)
  top1 = np.argmax(za @ embed_fn(text_emb)(None, 'b', index.tokens).T, axis=1)
  assert np.mean(top1 == index.text_of_row) > 0.7


def test_adore_embeds_the_candidates_once():
  rows, _, text_emb = data()
  mesh = parallel.make_mesh([('data', -1)])
  calls = []

  def counting(state, side, items):
    calls.append(side)
    return embed_fn(text_emb)(state, side, items)
  index = corpus_index.CorpusIndex(rows, mesh, hard(num_hard=2, refresh_every=1), fixed_b=True)
  index.mine(counting, None, np.arange(5))
  index.mine(counting, None, np.arange(5))
  assert calls == ['a', 'b', 'a'] and 'ADORE' in index.describe()


class Plan:
  """The loader's batches: batch s is rows [2 s, 2 s + 1] (mod 22)."""

  def rows(self, step, seed):
    assert seed == 0
    return np.array([2 * step, 2 * step + 1]) % 22


def test_a_refresh_mines_the_rows_of_the_batches_before_the_next_one():
  rows, text_of_row, text_emb = data()
  mesh = parallel.make_mesh([('data', -1)])
  index = corpus_index.CorpusIndex(rows, mesh, hard(num_hard=3, refresh_every=3), plan=Plan(),
                                   total_steps=4)
  state = step_lib.TrainState(step=0, params={}, batch_stats={}, opt_state=(), skipped_steps=0,
                              mined=jax.device_put(index.empty(), parallel.replicated(mesh)))
  index.sync(state)
  want, _ = brute_force(rows, text_of_row, text_emb, 3)
  np.testing.assert_array_equal(index.rows_until_next_refresh(0), np.arange(6))  # batches 0-2
  np.testing.assert_array_equal(index.rows_until_next_refresh(3), [6, 7])  # batch 3: the last
  state = index.refresh(embed_fn(text_emb), state, 0)
  np.testing.assert_array_equal(index.table[:6], want[:6])
  assert (index.table[6:] == -1).all()  # not used before the next refresh: not mined
  state = index.refresh(embed_fn(text_emb), state, 3)
  np.testing.assert_array_equal(np.asarray(state.mined)[:8], want[:8])
  assert (np.asarray(state.mined)[8:] == -1).all()
  index.plan.periodic = object()  # a plan recomputed every period (NGAME): every row
  np.testing.assert_array_equal(index.rows_until_next_refresh(0), np.arange(len(rows)))


def siglip_with_mined_numpy(za, zb, zhard, valid, hard_ids, ids, t, bias):
  """-(1/B) sum_i sum_j log sigmoid(y_ij (s_ij / t + b)) over the columns zb_1..zb_B and the
  B K mined texts; y = +1 only for (i, i). Dropped: in-batch j != i with ids_j = ids_i; a
  mined text of group g for every row of group g; an invalid one (row k's own text, before a
  refresh) for every row."""
  b, k, _ = zhard.shape
  col_id = np.concatenate([ids, hard_ids.reshape(-1)])
  keep = col_id[None, :] != ids[:, None]
  keep[:, b:] &= valid.reshape(1, -1)
  return reference.sigmoid_loss(za, zb, t, bias, extra=zhard.reshape(b * k, -1), mask=keep)


@pytest.mark.parametrize('block_size', [None, 4])
def test_mined_negatives_in_sigmoid_loss_match_numpy(block_size):
  rng = np.random.default_rng(2)
  b, k, d = 6, 2, 5
  za, zb = rng.standard_normal((2, b, d))
  zhard = rng.standard_normal((b, k, d))
  ids = np.array([0, 1, 1, 2, 3, 4])
  hard_ids = np.array([[5, 1], [2, 6], [0, 0], [7, 8], [4, 9], [3, 3]])  # some rows' groups
  valid = np.array([[1, 1], [1, 1], [0, 1], [1, 1], [1, 0], [1, 1]], bool)
  batch = {'id': jnp.asarray(ids), 'b_hard_valid': jnp.asarray(valid),
           'b_hard_id': jnp.asarray(hard_ids)}
  z = (jnp.asarray(za), jnp.asarray(zb), {'b_hard': jnp.asarray(zhard)})
  args = {} if block_size is None else dict(block_size=block_size)
  loss, _ = sigmoid_loss(za, zb, temperature=0.5, bias=-1.0,
                         **objectives.text_negatives(z, batch), **args)
  want = siglip_with_mined_numpy(za, zb, zhard, valid, hard_ids, ids, 0.5, -1.0)
  np.testing.assert_allclose(loss, want, rtol=1e-12)
  # Counterexample: without their group ids the mined texts of a row's group stay negatives.
  wrong = dict(batch)
  del wrong['b_hard_id']
  bad, _ = sigmoid_loss(za, zb, temperature=0.5, bias=-1.0,
                        **objectives.text_negatives(z, wrong), **args)
  assert abs(float(bad) - want) > 0.1


def siglip_shared_texts_numpy(za, zb, zhard, valid, text, hard_text, group_texts, ids, t, bias):
  """The same loss when texts belong to several groups: column j (an in-batch text b_j or a
  mined one, of text index text_j) is a negative of row i only if it is not i's positive, its
  text is none of the texts of i's group, its (first) group differs and it is valid."""
  b, k, _ = zhard.shape
  col_text = np.concatenate([text, hard_text.reshape(-1)])
  keep = np.array([[col_text[j] not in group_texts[i] for j in range(b + b * k)]
                   for i in range(b)])
  keep[:, :b] &= ids[None, :] != ids[:, None]
  keep[:, b:] &= valid.reshape(1, -1)
  return reference.sigmoid_loss(za, zb, t, bias, extra=zhard.reshape(b * k, -1), mask=keep)


@pytest.mark.parametrize('block_size, devices', [(None, 1), (4, 1), (2, 2), (1, 8)])
def test_texts_of_several_groups_are_no_negative_of_any_of_them(block_size, devices):
  # 8 rows, 4 groups; text 3 ("face") belongs to groups 0 and 2, text 5 to groups 1 and 3.
  rng = np.random.default_rng(4)
  b, k, d = 8, 2, 5
  za, zb = rng.standard_normal((2, b, d))
  zhard = rng.standard_normal((b, k, d))
  ids = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  text = np.array([0, 3, 4, 5, 3, 6, 5, 7])
  group_texts = np.array([[0, 3], [4, 5], [3, 6], [5, 7]])[ids]
  hard_text = np.array([[4, 3], [6, 7], [3, 0], [7, 1], [5, 1], [2, 0], [3, 4], [0, 6]])
  first_group = {0: 0, 3: 0, 4: 1, 5: 1, 6: 2, 7: 3, 1: 4, 2: 5}  # 1, 2: texts of no row
  hard_ids = np.vectorize(first_group.get)(hard_text)
  valid = np.ones((b, k), bool)
  valid[6, 1] = False
  batch = {'id': ids, 'b_hard_valid': valid, 'b_hard_id': hard_ids, 'b_hard_text': hard_text,
           'b_text': text, 'b_group_texts': group_texts}
  batch = {key: jnp.asarray(v) for key, v in batch.items()}
  z = (jnp.asarray(za), jnp.asarray(zb), {'b_hard': jnp.asarray(zhard)})
  args = {} if block_size is None else dict(block_size=block_size)
  if devices > 1:
    args['mesh'] = parallel.make_mesh([('data', -1)], devices=jax.devices()[:devices])
  negatives = objectives.text_negatives(z, batch)
  assert negatives['negative_mask'] is blockwise.distinct_group_texts
  loss_fn = lambda za, zb, extra: sigmoid_loss(
      za, zb, temperature=0.5, bias=-1.0, **dict(negatives, extra_negatives=extra), **args)[0]
  want = siglip_shared_texts_numpy(za, zb, zhard, valid, text, hard_text, group_texts, ids,
                                   0.5, -1.0)
  extra = negatives['extra_negatives']
  np.testing.assert_allclose(loss_fn(z[0], z[1], extra), want, rtol=1e-12)
  check_grads(loss_fn, (z[0], z[1], extra), order=1, modes=['rev'])
  # Counterexample: one group id per text keeps "face" a negative of group 2's rows.
  first_only = {key: v for key, v in batch.items() if key not in ('b_group_texts', 'b_text')}
  bad, _ = sigmoid_loss(za, zb, temperature=0.5, bias=-1.0,
                        **objectives.text_negatives(z, first_only), **args)
  assert abs(float(bad) - want) > 0.1


@pytest.mark.parametrize('fields, message', [
    (dict(num_hard=2), r'refresh_every=0: mining 2 negatives needs a refresh interval >= 1'),
    (dict(num_hard=-1), r'num_hard=-1 must be >= 0'),
    (dict(num_hard=2, refresh_every=5, block_size=0), r'block_size=0 must be >= 1'),
])
def test_bad_fields_are_one_line_errors(fields, message):
  with pytest.raises(ValueError, match=message) as e:
    corpus_index.check(hard(**fields), 'sigmoid_loss')
  assert '\n' not in str(e.value)


def test_clip_loss_and_unknown_fields_are_refused():
  with pytest.raises(ValueError, match=r"need sigmoid_loss \(got 'clip_loss'\)"):
    corpus_index.check(hard(num_hard=2, refresh_every=5), 'clip_loss')
  cfg = ml_collections.ConfigDict(dict(hard_negatives=dict(corpus_index.DEFAULTS, every=3)))
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['every'\]"):
    two_tower_checks.hard_negatives(cfg)


def test_more_negatives_than_the_corpus_is_an_error():
  rows, _, _ = data()
  mesh = parallel.make_mesh([('data', -1)])
  with pytest.raises(ValueError, match=r'num_hard=12 is more than the corpus has besides a '
                     r'row\'s own text \(12 distinct texts b\)'):
    corpus_index.CorpusIndex(rows, mesh, hard(num_hard=12, refresh_every=1))


def test_refresh_interval_zero_through_the_recipe_is_a_config_error():
  import os  # pylint: disable=g-import-not-at-top
  from contrastive import config_lib  # pylint: disable=g-import-not-at-top
  from contrastive import validate  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), '..', 'configs', 'siglip_emoji.py')
  cfg = config_lib.load_config(path, 'runlocal')
  cfg.hard_negatives.num_hard = 4
  cfg.hard_negatives.refresh_every = 0
  with pytest.raises(validate.ConfigError, match='refresh_every=0') as e:
    validate.validate_config(cfg, num_devices=8, num_processes=1)
  assert '\n' not in str(e.value)
