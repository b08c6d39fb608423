"""config.static_negatives (contrastive/negatives/static_bank.py, static_bank_table.py):
SPN4CIR's bank of frozen embeddings as extra negatives of SigLIP's loss, against a NumPy
re-derivation on the dense and blockwise paths and on 1, 2 and 8 devices in float64; the
bank and its mined top-k against a brute force; and the config errors. A second stage through
`python -m contrastive.main`: tests/test_static_negatives_main.py."""

import os
import types

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import ml_collections
import numpy as np
import pytest

from contrastive import checkpoint
from contrastive import config_lib
from contrastive import parallel
from contrastive import step as step_lib
from contrastive import validate
from contrastive.losses import blockwise
from contrastive.losses import sigmoid_loss
from contrastive import objectives
from contrastive.negatives import static_bank
from contrastive.negatives import static_bank_table
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
NO = blockwise.NO_NEGATIVE
TAU, BIAS = 0.5, -1.0


# ---- The loss against NumPy ------------------------------------------------------------------


def softplus(x):
  return np.logaddexp(0.0, x)


def numpy_direction(x, y, extra, row_group, row_set, col_group, col_key, extra_group, extra_key):
  """-(1/B) sum_i [log sig(z_ii) + sum_{kept j != i} log sig(-z_ij) + sum_{kept e}
  log sig(-z_ie)], z = cos / TAU + BIAS; column c (in batch or extra) is kept for row i if its
  group is not NO, differs from g_i and its key (text / item) is not in row i's group's set."""
  unit = lambda v: v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
  x, y = unit(x), unit(y)
  extra = unit(extra)
  total = 0.0
  for i in range(len(x)):  # a reference: plain loops, no shared code with the library
    total += softplus(-(x[i] @ y[i] / TAU + BIAS))
    for j in range(len(y)):
      if j != i and col_group[j] != row_group[i] and col_key[j] not in row_set[i]:
        total += softplus(x[i] @ y[j] / TAU + BIAS)
    for e in range(len(extra)):
      if extra_group[e] not in (NO, row_group[i]) and extra_key[e] not in row_set[i]:
        total += softplus(x[i] @ extra[e] / TAU + BIAS)
  return total / len(x)


def example(topk):
  """8 rows in 4 groups; text 3 belongs to groups 0 and 2; a bank of 9 texts (+ 7 padding
  entries: 16 split over 8 devices) and 7 items (+ 1), entries of several rows' groups among
  them; with topk each row's 2 bank positions (-1: none)."""
  rng = np.random.default_rng(3)
  b, d = 8, 5
  ids = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  text = np.array([0, 3, 4, 5, 3, 6, 7, 8])
  group_texts = np.array([[0, 3], [4, 5], [3, 6], [7, 8]])[ids]
  item = np.array([0, 0, 1, 2, 3, 3, 4, 5])
  group_items = np.array([[0, -1], [1, 2], [3, -1], [4, 5]])[ids]
  bank_texts = np.array([0, 1, 2, 3, 4, 6, 8, 9, 10])  # first groups below
  text_group = {0: 0, 1: 5, 2: 6, 3: 0, 4: 1, 6: 2, 8: 3, 9: 7, 10: 8}
  bank_b_ids = np.array([[text_group[t], t] for t in bank_texts] + [[NO, -2]] * 7)
  bank_items = np.array([0, 1, 3, 5, 6, 7, 8])
  item_group = {0: 0, 1: 1, 3: 2, 5: 3, 6: 4, 7: 5, 8: 9}
  bank_a_ids = np.array([[item_group[t], t] for t in bank_items] + [[NO, -2]])
  bank = {'b': rng.standard_normal((16, d)), 'b_ids': bank_b_ids,
          'a': rng.standard_normal((8, d)), 'a_ids': bank_a_ids}
  bank['b'][9:] = bank['a'][7:] = 0.0  # padding: zero rows
  batch = {'id': ids, 'b_text': text, 'b_group_texts': group_texts, 'a_item': item,
           'a_group_items': group_items}
  if topk:
    batch['static_b'] = rng.integers(-1, 9, (b, topk))
    batch['static_a'] = rng.integers(-1, 7, (b, topk))
  za, zb = rng.standard_normal((2, b, d))
  return za, zb, bank, batch


def numpy_loss(za, zb, bank, batch, sides):
  """The module docstring's formula, side b (and a) from the raw arrays."""
  def extras(side):
    if 'static_' + side not in batch:
      return bank[side], bank[side + '_ids']
    index = batch['static_' + side].reshape(-1)
    ids = np.where(index[:, None] >= 0, bank[side + '_ids'][index], [[NO, -2]])
    return bank[side][index], ids
  g = batch['id']
  emb, ids = extras('b')
  texts = [set(r[r >= 0]) for r in batch['b_group_texts']]
  loss_b = numpy_direction(za, zb, emb, g, texts, g, batch['b_text'], ids[:, 0], ids[:, 1])
  if sides == 'b':
    return loss_b
  emb, ids = extras('a')
  items = [set(r[r >= 0]) for r in batch['a_group_items']]
  loss_a = numpy_direction(zb, za, emb, g, items, g, batch['a_item'], ids[:, 0], ids[:, 1])
  return 0.5 * (loss_b + loss_a)


def library_loss(za, zb, bank, batch, sides, **args):
  bank = {k: v for k, v in bank.items() if k[0] in sides}
  z = (za, zb)
  return static_bank.loss(sigmoid_loss, z, batch, bank, objectives.text_negatives(z, batch),
                          dict(temperature=TAU, bias=BIAS), args)[0]


def _mesh_args(block_size, devices):
  args = {} if block_size is None else dict(block_size=block_size)
  if devices > 1:
    args['mesh'] = parallel.make_mesh([('data', -1)], devices=jax.devices()[:devices])
  return args


@pytest.mark.parametrize('sides', ['b', 'ab'])
@pytest.mark.parametrize('topk', [0, 2])
@pytest.mark.parametrize('block_size', [None, 3])
def test_the_bank_loss_matches_numpy_and_its_gradients(sides, topk, block_size):
  za, zb, bank, batch = example(topk)
  jbank = {k: jnp.asarray(v) for k, v in bank.items()}
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  fn = lambda za, zb: library_loss(za, zb, jbank, jbatch, sides,
                                   **_mesh_args(block_size, 1))
  want = numpy_loss(za, zb, bank, batch, sides)
  np.testing.assert_allclose(fn(jnp.asarray(za), jnp.asarray(zb)), want, rtol=1e-12)
  check_grads(fn, (jnp.asarray(za), jnp.asarray(zb)), order=1, modes=['rev'])
  # Counterexample: without the bank's ids its entries of a row's group are negatives.
  blind = dict(jbank, b_ids=jnp.stack([jnp.full(16, 99), jnp.full(16, -5)], axis=1))
  bad = library_loss(za, zb, blind, jbatch, sides, **_mesh_args(block_size, 1))
  assert abs(float(bad) - want) > 0.05


@pytest.mark.parametrize('sides, topk', [('b', 0), ('ab', 2)])
def test_one_two_and_eight_devices_agree_in_float64(sides, topk):
  za, zb, bank, batch = example(topk)
  mesh8 = parallel.make_mesh([('data', -1)], devices=jax.devices()[:8])
  data = parallel.data_sharding(mesh8)
  jbank = {k: jax.device_put(v, data) for k, v in bank.items()}  # split as in the state
  results = []
  for block_size, devices in ((None, 1), (2, 2), (1, 8), (None, 8)):
    args = _mesh_args(block_size, devices) if block_size else {}  # dense: XLA partitions it
    put = (lambda x: jax.device_put(x, data)) if devices == 8 else jnp.asarray
    fn = jax.jit(jax.value_and_grad(lambda za, zb, rows, a=args: library_loss(
        za, zb, jbank, rows, sides, **a), argnums=(0, 1)))
    results.append(fn(put(za), put(zb), {k: put(v) for k, v in batch.items()}))
  np.testing.assert_allclose(results[0][0], numpy_loss(za, zb, bank, batch, sides), rtol=1e-12)
  for value, grads in results[1:]:
    np.testing.assert_allclose(value, results[0][0], rtol=1e-12)
    for g, g0 in zip(grads, results[0][1]):
      np.testing.assert_allclose(g, g0, rtol=1e-10, atol=1e-13)


# ---- The bank and its table -------------------------------------------------------------------


class Tokenizer:
  """Text 't<j>' -> tokens [j + 1, 0, 0]."""

  def encode(self, texts, length):
    ids = np.zeros((len(texts), length), np.int32)
    ids[:, 0] = [int(t[1:]) + 1 for t in texts]
    return ids, 0


class Rows:
  """12 training rows: side a a 2-vector item (rows 0/1 and 6/7 share one), text b 't<j>'
  (text 2 in groups 1 and 3), a group id."""

  tokenizer, context = Tokenizer(), 3

  def __init__(self):
    self.texts = ['t0', 't1', 't2', 't3', 't4', 't5', 't2', 't6', 't7', 't8', 't9', 't1']
    self.ids = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    rng = np.random.default_rng(5)
    self.items = rng.standard_normal((10, 2))
    self.item_of_row = np.array([0, 0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9])

  def __len__(self):
    return len(self.ids)

  def side_a(self, indices, texts_b=False):
    indices = np.asarray(list(indices))
    out = {'a': self.items[self.item_of_row[indices]], 'id': self.ids[indices].astype(np.int32)}
    if texts_b:
      out['text_b'] = [self.texts[i] for i in indices]
    return out


TEXT_EMB = np.random.default_rng(6).standard_normal((10, 2))


def embed(variables, side, items):
  assert variables.params == 'W'  # the frozen towers, not the state's
  x = items if side == 'a' else TEXT_EMB[items[:, 0] - 1]
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_topk(queries, bank, bank_group, bank_key, row_group, row_set, k):
  """Each row's k highest-cosine bank positions whose group and key are not its group's."""
  out = []
  for q, g, keys in zip(queries, row_group, row_set):
    keep = [m for m in range(len(bank)) if bank_group[m] != g and bank_key[m] not in keys]
    order = np.argsort(-(bank[keep] @ q), kind='stable')[:k]
    out.append([keep[o] for o in order])
  return np.array(out)


@pytest.mark.parametrize('sides, num_static', [('b', 100), ('ab', 6)])
def test_the_bank_and_its_topk_equal_a_brute_force(monkeypatch, sides, num_static):
  rows, k = Rows(), 2
  mesh = parallel.make_mesh([('data', -1)], devices=jax.devices()[:8])
  static = static_bank.StaticNegatives(num_static=num_static, from_workdir='W', topk=k,
                                       sides=sides)
  table = static_bank_table.StaticBank(rows, mesh, static, seed=0)
  lay = table.layout
  shapes = static_bank.state_shapes(static, lay, width=2, num_devices=8, dtype=np.float64)
  state = step_lib.TrainState(step=0, params={}, batch_stats={}, opt_state=(), skipped_steps=0)
  state = static_bank.with_bank(state, shapes['static_bank'], mesh)
  state = state.replace(static_topk=jax.device_put(np.full(shapes['static_topk'], -1, np.int32),
                                                   parallel.replicated(mesh)))
  monkeypatch.setattr(static_bank, 'frozen_towers',
                      lambda *a: types.SimpleNamespace(params='W', batch_stats={}))
  assert table.due(0) and not table.due(1) and 'mined once' in table.describe()
  state = table.refresh(embed, state, 0)
  unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)
  texts = unit(TEXT_EMB)  # the distinct texts 't0' ... 't9' sort as their numbers
  entries_b = table.entries['b']
  assert len(entries_b) == min(num_static, 10) and shapes['static_bank']['b'][0][0] % 8 == 0
  got = np.asarray(state.static_bank['b'])
  np.testing.assert_allclose(got[:len(entries_b)], texts[entries_b], rtol=1e-12)
  assert not got[len(entries_b):].any()
  ids = np.asarray(state.static_bank['b_ids'])
  first_group = {int(t[1:]): g for t, g in reversed(list(zip(rows.texts, rows.ids)))}
  np.testing.assert_array_equal(ids[:len(entries_b)], [[first_group[t], t] for t in entries_b])
  assert (ids[len(entries_b):] == [NO, -2]).all()
  group_sets = {g: {int(t[1:]) for t, h in zip(rows.texts, rows.ids) if h == g}
                for g in set(rows.ids)}
  row_sets = [group_sets[g] for g in rows.ids]
  want_b = brute_topk(unit(rows.items)[rows.item_of_row], texts[entries_b], ids[:, 0],
                      ids[:, 1], rows.ids, row_sets, k)
  np.testing.assert_array_equal(table.table[:, -k:], want_b)
  np.testing.assert_array_equal(np.asarray(state.static_topk), table.table)
  batch = table.attach({'row': np.array([2, 7]), 'id': rows.ids[[2, 7]]})
  assert 'row' not in batch
  np.testing.assert_array_equal(batch['static_b'], want_b[[2, 7]])
  np.testing.assert_array_equal(batch['b_text'], [2, 6])
  np.testing.assert_array_equal(batch['b_group_texts'], [[2, 3], [2, 6]])  # text 2: 2 groups
  if sides == 'ab':  # the layout numbers the items by value: item i is row item_rows[i]'s
    item = lay.item_of_row
    assert len(set(zip(item, rows.item_of_row))) == 10 == len(lay.item_rows)
    entries_a = table.entries['a']
    assert len(entries_a) == 6  # of 10 items, drawn with the seed
    emb_a = unit(rows.items[rows.item_of_row[lay.item_rows[entries_a]]])
    np.testing.assert_allclose(np.asarray(state.static_bank['a'])[:6], emb_a, rtol=1e-12)
    a_ids = np.asarray(state.static_bank['a_ids'])[:6]
    np.testing.assert_array_equal(a_ids[:, 1], entries_a)
    np.testing.assert_array_equal(a_ids[:, 0], rows.ids[lay.item_rows[entries_a]])
    item_sets = [{item[r] for r in np.flatnonzero(rows.ids == g)} for g in rows.ids]
    want_a = brute_topk(texts[[int(t[1:]) for t in rows.texts]], emb_a, a_ids[:, 0],
                        a_ids[:, 1], rows.ids, item_sets, k)
    np.testing.assert_array_equal(table.table[:, :k], want_a)
    np.testing.assert_array_equal(batch['a_item'], item[[2, 7]])
    np.testing.assert_array_equal(batch['static_a'], want_a[[2, 7]])
  fresh = static_bank_table.StaticBank(rows, mesh, static, seed=0)
  fresh.sync(state)  # a resumed run reads the table of its checkpoint
  np.testing.assert_array_equal(fresh.table, table.table)
  for name in ('field', 'metric', 'due', 'refresh', 'sync', 'attach', 'describe'):
    assert hasattr(fresh, name), name  # base.RefreshedTable


# ---- Config errors ----------------------------------------------------------------------------


def _config(**static):
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'siglip_emoji.py'), 'runlocal')
  config.static_negatives.update(static)
  return config


def _one_line(config, match):
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    static_bank.check(static_bank.settings(config), config)
  assert '\n' not in str(e.value)


def _saved_run(path, embed_dim):
  """A workdir with a checkpoint of projections to embed_dim and its config.json."""
  os.makedirs(path)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    f.write(f'{{"model": {{"embed_dim": {embed_dim}}}}}')
  params = {'proj_a': {'kernel': np.zeros((4, embed_dim))},
            'proj_b': {'kernel': np.zeros((4, embed_dim))}}
  ckpt = checkpoint.Checkpointer(os.path.join(path, 'checkpoints'), save_every=1, keep=1)
  ckpt.save(1, {'params': params}, None, force=True)
  ckpt.close()
  return params


def test_bad_settings_are_one_line_config_errors(tmp_path):
  config = ml_collections.ConfigDict(dict(static_negatives=dict(static_bank.DEFAULTS, size=3)))
  with pytest.raises(config_lib.ConfigError, match=r"unknown field\(s\) \['size'\]"):
    static_bank.settings(config)
  _one_line(_config(num_static=-1), r'num_static=-1 and topk=0 must be >= 0')
  _one_line(_config(num_static=4, sides='a'), r"sides='a': choose one of \('b', 'ab'\)")
  _one_line(_config(num_static=4), r'needs from_workdir')
  _one_line(_config(num_static=4, from_workdir=str(tmp_path / 'none')), r'does not exist')
  os.makedirs(tmp_path / 'empty' / 'checkpoints')
  _one_line(_config(num_static=4, from_workdir=str(tmp_path / 'empty')), 'has no checkpoint')
  config = _config(num_static=4, from_workdir=str(tmp_path / 'empty'))
  config.hard_negatives.num_hard = 2
  _one_line(config, r'not with hard_negatives')
  wide = str(tmp_path / 'wide')
  _saved_run(wide, 64)
  _one_line(_config(num_static=4, from_workdir=wide), r'embeds in 64 dimensions, this model '
            r'in 32')
  # Through the recipe's validation, before anything is read or compiled.
  with pytest.raises(config_lib.ConfigError, match='embeds in 64 dimensions') as e:
    validate.validate_config(_config(num_static=4, from_workdir=wide), num_devices=8,
                             num_processes=1)
  assert '\n' not in str(e.value)
  # The checkpoint itself (a workdir without config.json): checked when the bank is embedded.
  os.remove(os.path.join(wide, 'config.json'))
  ours = {'proj_a': {'kernel': np.zeros((4, 32))}, 'proj_b': {'kernel': np.zeros((4, 32))}}
  with pytest.raises(config_lib.ConfigError, match='embeds in 64 dimensions, this model in 32'):
    static_bank.frozen_towers(wide, ours, {})
  with pytest.raises(config_lib.ConfigError, match='its towers differ'):
    static_bank.frozen_towers(wide, {'proj_a': {'kernel': np.zeros((5, 64))},
                                     'proj_b': {'kernel': np.zeros((4, 64))}}, {})
  frozen = static_bank.frozen_towers(wide, {k: {'kernel': np.zeros((4, 64), np.float32)}
                                            for k in ('proj_a', 'proj_b')}, {})
  assert frozen.params['proj_b']['kernel'].dtype == np.float32


def test_topk_beyond_the_bank_is_an_error():
  lay = static_bank.layout(Rows().ids, Rows().texts, [bytes([i]) for i in Rows().item_of_row])
  static = static_bank.StaticNegatives(num_static=4, from_workdir='W', topk=4)
  with pytest.raises(config_lib.ConfigError, match=r"topk=4 must be below the bank's 4 entries "
                     r'of side b \(num_static=4, 10 distinct texts b\)'):
    static_bank.bank_sizes(static, lay)
  assert static_bank.bank_sizes(static_bank.StaticNegatives(4, 'W', 3, 'ab'), lay) == {
      'a': 4, 'b': 4}
