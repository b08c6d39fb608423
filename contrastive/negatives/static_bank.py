"""`config.static_negatives`: SPN4CIR's static negatives on the two-tower recipes: a second
training stage whose loss adds a bank of embeddings, computed once by frozen towers, as extra
negatives of every row.

  config.static_negatives = dict(
      num_static=0,     # M, the bank's entries per side (0: off); the training split's
                        # distinct texts b (side-a items) are all taken when it has <= M,
                        # else M of them drawn with config.seed
      from_workdir='',  # the previous stage's workdir: its latest checkpoint embeds the bank
      topk=0,           # 0: the whole bank joins every row's negatives; k > 0: each row's k
                        # most similar entries (mined once, at the start), shared by the batch
      sides='b')        # 'b': texts b, negatives of the side-a rows; 'ab': also the side-a
                        # items, negatives of the side-b rows

e.g. `--config.static_negatives.num_static=100000 --config.static_negatives.from_workdir=W`.

Before update 1 the loop embeds the bank with this model's towers carrying W's weights (its
latest checkpoint; the same embedding width D, else one ConfigError line), L2-normalised,
without gradient: e_m = f_b^W(t_m) / |f_b^W(t_m)| for the M texts t_m (and e'_m = f_a^W(a_m)
for the items with 'ab'). With z(u, v) = cos(u, v) / tau + b and SigLIP's loss

  L(x, y; E) = -(1/B) sum_i [ log sig(z(x_i, y_i)) + sum_{j != i, keep(i, j)} log sig(-z(x_i, y_j))
                              + sum_{e in E, keep(i, e)} log sig(-z(x_i, e)) ],

the stage trains on L(za, zb; E_b) ('b') or 1/2 [L(za, zb; E_b) + L(zb, za; E_a)] ('ab', as
`objectives.geodesic_mixup_loss` halves both directions). E is the whole bank (topk = 0) or
the union of the batch rows' k most similar entries (topk = k: B k columns, as the corpus-mined
texts join the batch: `corpus_index.py`). keep(i, e) drops an entry of row i's group: its group
id equals g_i or its text (item) is one of group g_i's (`blockwise.distinct_group_texts`; a
text of several groups is no negative of any of them). The mined top-k leaves them out too.

State: the bank ('b' [M', D], 'b_ids' [M', 2] = (first group, text index), and 'a', 'a_ids')
is `TrainState.static_bank`, split along the mesh's batch axes (M' = M padded to the device
count with entries of id `NO_NEGATIVE`), and the [N, k] (or [N, 2k]) top-k table is
`TrainState.static_topk`, replicated: both are saved with each checkpoint, so a resumed run
restores them rather than embedding again. Per device the bank holds M D s / n bytes (s: the state dtype's
size; 1M x 128 float32 over 8 devices: 64 MiB) plus 8 M / n of ids. A large bank needs the
loss's blockwise path (`loss.block_size`): the dense one holds [B / n, B + M] logits per device.
Cost: B M D multiply-adds per matmul pass over the bank (B k D with topk); a step makes three
(similarities, the rows' gradient, and the bank's, computed by the blockwise pass and unused),
twice with 'ab'.

References:
  Feng, Zhang and Nie 2024, "Improving Composed Image Retrieval via Contrastive Learning with
  Scaling Positives and Negatives" (SPN4CIR), arXiv:2404.11317: the second stage's static
  negatives (there the whole bank, or neg_num random entries per query, in InfoNCE).
"""

import dataclasses
import json
import os
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from contrastive import checkpoint
from contrastive import config_lib
from contrastive import parallel
from contrastive.config_lib import ConfigError
from contrastive.data import mixture
from contrastive.losses import blockwise
from contrastive.negatives import corpus_index
from contrastive.negatives import corpus_mining

SIDES = ('b', 'ab')
NO_TEXT = -2  # the text slot of a padded or missing entry: no row's group has it
MINING_BLOCK = 1024  # candidates per tile of the exact top-k


@dataclasses.dataclass(frozen=True)
class StaticNegatives:
  """config.static_negatives (the module docstring); the defaults are those of a config
  without the field: off."""
  num_static: int = 0
  from_workdir: str = ''
  topk: int = 0
  sides: str = 'b'


DEFAULTS = dataclasses.asdict(StaticNegatives())


def settings(config):
  """config.static_negatives as `StaticNegatives`; ConfigError for an unknown field."""
  return StaticNegatives(**config_lib.section(config, 'static_negatives', DEFAULTS))


def check(static, config):
  """One-line ConfigErrors for `static` (a StaticNegatives) of `config`, before any data is
  read or anything compiled (the bank's size and topk are checked against the data by
  `Layout.bank_sizes`, its towers by `frozen_towers`)."""
  n, k, sides, workdir = static.num_static, static.topk, static.sides, static.from_workdir
  if n < 0 or k < 0:
    raise ConfigError(f'config.static_negatives: num_static={n} and topk={k} must be >= 0 '
                      '(num_static=0: off; topk=0: the whole bank).')
  if sides not in SIDES:
    raise ConfigError(f'config.static_negatives.sides={sides!r}: choose one of {SIDES}.')
  if not n:
    return
  others = [name for name, on in (
      ('loss.name != sigmoid_loss', config.loss.name != 'sigmoid_loss'),
      ('hard_negatives', (config.get('hard_negatives') or {}).get('num_hard', 0)),
      ('geodesic_mixup', (config.get('geodesic_mixup') or {}).get('alpha', 0.0)),
      ('a mixture of datasets', mixture.is_mixture(config.get('dataset'))),
      ('webdataset shards', (config.get('dataset') or {}).get('name') == 'webdataset')) if on]
  if others:
    raise ConfigError(f'config.static_negatives.num_static={n}: the bank joins sigmoid_loss as '
                      f'extra negatives of one dataset\'s rows, not with {", ".join(others)}.')
  if not workdir:
    raise ConfigError(f'config.static_negatives.num_static={n} needs from_workdir: the workdir '
                      'of a finished run whose towers embed the bank.')
  if not os.path.isdir(workdir):
    raise ConfigError(f'config.static_negatives.from_workdir={workdir!r} does not exist.')
  if not checkpoint.saved_steps(os.path.join(workdir, 'checkpoints')):
    raise ConfigError(f'config.static_negatives.from_workdir={workdir!r} has no checkpoint '
                      '(checkpoints/<step>).')
  theirs = _embed_dim(workdir)
  if theirs is not None and theirs != config.model.embed_dim:
    raise ConfigError(_width_error(workdir, theirs, config.model.embed_dim))


def _embed_dim(workdir):
  """config.model.embed_dim of a workdir's config.json (None without one)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return None
  with open(path, encoding='utf-8') as f:
    return (json.load(f).get('model') or {}).get('embed_dim')


def _width_error(workdir, theirs, ours):
  return (f'config.static_negatives.from_workdir={workdir!r} embeds in {theirs} dimensions, '
          f'this model in {ours}: its bank cannot be this model\'s negatives.')


class Layout(NamedTuple):
  """The training split's rows, distinct texts b and side-a items, and their groups.

  Attributes:
    ids: [N] int32 group id of each row.
    text_of_row, item_of_row: [N] its text's index (into the sorted distinct texts) and its
      side-a item's (by value).
    text_ids, item_ids: [T], [I] each text's (item's) first row's group id.
    group_of_row: [N] its group's index (`corpus_index.group_texts`).
    group_texts, group_items: [G, E], [G, Ea] each group's distinct texts (items), -1 padded.
    item_rows: [I] a row of each item (where its value is read).
  """
  ids: np.ndarray
  text_of_row: np.ndarray
  item_of_row: np.ndarray
  text_ids: np.ndarray
  item_ids: np.ndarray
  group_of_row: np.ndarray
  group_texts: np.ndarray
  group_items: np.ndarray
  item_rows: np.ndarray


def layout(ids, texts, item_keys):
  """`Layout` of N rows: ids [N] group ids, texts [N] str (texts b), item_keys [N] bytes (a
  side-a item's value: equal keys, one item)."""
  ids = np.asarray(ids, np.int32)
  text_of_row = np.unique(np.asarray(texts, object), return_inverse=True)[1].reshape(-1)
  _, item_rows, item_of_row = np.unique(np.asarray(item_keys, object), return_index=True,
                                        return_inverse=True)
  item_of_row = item_of_row.reshape(-1)
  first = lambda of_row: np.asarray(ids[np.unique(of_row, return_index=True)[1]], np.int32)
  part = np.zeros(len(ids), np.int32)
  group_of_row, group_texts = corpus_index.group_texts(part, ids, text_of_row)
  group_items = corpus_index.group_texts(part, ids, item_of_row)[1]
  return Layout(ids, text_of_row, item_of_row, first(text_of_row), first(item_of_row),
                group_of_row, group_texts, group_items, item_rows)


def layout_of_source(source):
  """(`Layout`, distinct texts [T] str, the rows' side-a arrays [N, ...]) of the training rows
  (`pair_batches.TokenizedPairs`)."""
  part = source.side_a(range(len(source)), texts_b=True)
  keys = [np.ascontiguousarray(x).tobytes() for x in part['a']]
  out = layout(part['id'], part['text_b'], keys)
  return out, np.unique(np.asarray(part['text_b'], object)), part['a']


def layout_of_records(raw, spec):
  """`Layout` of a raw pair source's records (the AOT compile's shapes, no tokenizer)."""
  records = raw.__getitems__(range(len(raw)))
  key = lambda v: v if isinstance(v, (bytes, str)) else np.ascontiguousarray(v).tobytes()
  return layout([int(r[spec.group]) for r in records],
                [r[spec.b].decode() if isinstance(r[spec.b], bytes) else r[spec.b]
                 for r in records], [key(r[spec.a]) for r in records])


def entries(count, num_static, seed):
  """The bank's entries: every index below `count` if num_static >= count, else num_static of
  them drawn with `seed`, sorted."""
  if num_static >= count:
    return np.arange(count)
  return np.sort(np.random.default_rng(seed).choice(count, num_static, replace=False))


def bank_sizes(static, lay):
  """{side: M} of the bank; ConfigError if topk is not below M (a row's k most similar
  entries besides its own)."""
  counts = {'b': len(lay.text_ids), 'a': len(lay.item_ids)}
  sizes = {side: min(static.num_static, counts[side]) for side in static.sides}
  for side, m in sizes.items():
    if static.topk >= m:
      what = 'distinct texts b' if side == 'b' else 'distinct side-a items'
      raise ConfigError(f'config.static_negatives.topk={static.topk} must be below the bank\'s '
                        f'{m} entries of side {side} (num_static={static.num_static}, '
                        f'{counts[side]} {what}).')
  return sizes


def state_shapes(static, lay, *, width, num_devices, dtype):
  """{'static_bank': {leaf: (shape, dtype)}, 'static_topk': (N, k per side)} of the state's
  fields ({} when off)."""
  if not static.num_static:
    return {}
  bank = {}
  for side, m in bank_sizes(static, lay).items():
    padded = -(-m // num_devices) * num_devices
    bank.update({side: ((padded, width), np.dtype(dtype)), side + '_ids': ((padded, 2),
                                                                           np.dtype(np.int32))})
  out = {'static_bank': bank}
  if static.topk:
    out['static_topk'] = (len(lay.ids), static.topk * len(static.sides))
  return out


def with_bank(state, shapes, mesh, *, abstract=False):
  """`state` with its `static_bank` as zeros of `shapes` ({leaf: (shape, dtype)}), split along
  the mesh's batch axes (ShapeDtypeStructs if abstract); `state` itself when shapes is None."""
  if not shapes:
    return state
  data = parallel.data_sharding(mesh)
  zeros = lambda shape, dtype: (
      jax.ShapeDtypeStruct(shape, dtype, sharding=data) if abstract else
      jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=data)())
  return state.replace(static_bank={k: zeros(*v) for k, v in shapes.items()})


def batch_fields(static, lay):
  """{field: (per-row shape, dtype)} the bank adds to the step's batch ({} when off)."""
  if not static.num_static:
    return {}
  fields = {'b_text': ((), np.int32), 'b_group_texts': ((lay.group_texts.shape[1],), np.int32)}
  if 'a' in static.sides:
    fields.update(a_item=((), np.int32), a_group_items=((lay.group_items.shape[1],), np.int32))
  if static.topk:
    fields.update({'static_' + side: ((static.topk,), np.int32) for side in static.sides})
  return fields


def frozen_towers(workdir, params, batch_stats):
  """The variables `embed` reads (params, batch_stats) with this model's structure (`params`:
  its tree, shapes suffice) and the latest checkpoint's values of `workdir`; one-line
  ConfigErrors for another embedding width or other towers."""
  try:
    step_dir = checkpoint.latest_step_dir(workdir)
  except checkpoint.CheckpointError as e:
    raise ConfigError(f'config.static_negatives.from_workdir: {e}') from None
  saved = checkpoint.read_state(step_dir)
  width = lambda tree: jax.tree.leaves(tree.get('proj_b', tree.get('proj_a')))[-1].shape[-1]
  if width(saved['params']) != width(params):
    raise ConfigError(_width_error(workdir, width(saved['params']), width(params)))
  ours = jax.tree.map(np.shape, dict(params))
  theirs = jax.tree.map(np.shape, {k: v for k, v in saved['params'].items() if k in ours})
  if ours != theirs:
    raise ConfigError(f'config.static_negatives.from_workdir={workdir!r}: its towers differ '
                      'from this model\'s (the bank is embedded by this model with its weights).')
  cast = lambda tree, like: jax.tree.map(lambda s, t: np.asarray(s, t.dtype), tree, like)
  stats = {k: v for k, v in (saved.get('batch_stats') or {}).items() if k in batch_stats}
  return types.SimpleNamespace(params=cast({k: saved['params'][k] for k in ours}, params),
                               batch_stats=cast(stats, {k: batch_stats[k] for k in stats}))


def gathered(bank, batch, side):
  """(embeddings [M', D], ids [M', 2]) of the bank entries of `side` this step: the whole
  bank, or with topk the batch rows' mined entries (batch['static_<side>'] [B, k], -1:
  none, which takes the id (NO_NEGATIVE, NO_TEXT): no row's negative)."""
  emb, ids = bank[side], bank[side + '_ids']
  if 'static_' + side not in batch:
    return emb, ids
  index = batch['static_' + side].reshape(-1)  # [B k]
  safe = jnp.maximum(index, 0)  # a sharded gather: each device its entries, then one sum
  none = jnp.asarray([blockwise.NO_NEGATIVE, NO_TEXT], ids.dtype)
  return (jnp.take(emb, safe, axis=0),
          jnp.where((index >= 0)[:, None], jnp.take(ids, safe, axis=0), none))


def loss(loss_fn, z, batch, bank, negatives, logit, blockwise_args):
  """SigLIP with the bank's negatives (the module docstring's formula) -> (loss, metrics).

  Args:
    loss_fn: `losses.sigmoid_loss`.
    z: (za [B, D], zb [B, D], ...) the batch's embeddings.
    batch: with 'id' [B], 'b_text' [B], 'b_group_texts' [B, E] (and 'a_item' [B],
      'a_group_items' [B, Ea] with side a; 'static_b' / 'static_a' [B, k] with topk).
    bank: `TrainState.static_bank`.
    negatives: `objectives.text_negatives(z, batch)`: the other extra texts and their masks.
    logit: the model's temperature and bias; blockwise_args: the loss's blockwise path.
  """
  za, zb = z[0], z[1]
  if 'b_group_texts' not in batch:
    raise ValueError('The static bank\'s masks need the batch\'s b_text and b_group_texts.')
  emb, ids = gathered(bank, batch, 'b')
  row_ids, col_ids = negatives['mask_ids']
  extra = [negatives['extra_negatives']] if 'extra_negatives' in negatives else []
  value, metrics = loss_fn(za, zb, **logit, **blockwise_args,
                           extra_negatives=jnp.concatenate(extra + [emb.astype(zb.dtype)]),
                           mask_ids=(row_ids, jnp.concatenate([col_ids, ids])),
                           negative_mask=negatives['negative_mask'])
  if 'a' not in bank:
    return value, metrics
  emb_a, ids_a = gathered(bank, batch, 'a')
  group = batch['id']
  rows = jnp.concatenate([group[:, None], batch['a_group_items']], axis=1)  # [B, 1 + Ea]
  cols = jnp.concatenate([jnp.stack([group, batch['a_item']], axis=1), ids_a])  # [B + M, 2]
  value_a, _ = loss_fn(zb, za, **logit, **blockwise_args, extra_negatives=emb_a.astype(za.dtype),
                       mask_ids=(rows, cols), negative_mask=blockwise.distinct_group_texts)
  return 0.5 * (value + value_a), dict(metrics, static_loss_b=value, static_loss_a=value_a)
