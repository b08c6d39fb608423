"""The static bank as a table the loop fills once (`StaticBank`): SPN4CIR's second stage
(`static_bank.py` has the config, the formula and the loss).

Before update 1 the loop calls `refresh`: the bank's texts b (and side-a items) go through
this model's towers carrying the weights of `config.static_negatives.from_workdir` (its latest
checkpoint), and with topk = k each training row's k most similar entries are mined by the
exact tiled top-k of `corpus_mining.py` (sharded over the mesh): for the texts the queries are
the rows' side-a items, for the items ('ab') the rows' texts, both through the frozen towers,
and an entry of the row's group is never mined. Bank and table go into the train state, so a
resumed run restores them rather than embedding again. Each host batch then carries its rows'
text and group's texts (the masks), and their mined entries.
"""

import jax
import numpy as np

from contrastive import parallel
from contrastive.losses import blockwise
from contrastive.negatives import corpus_mining
from contrastive.negatives import static_bank


class StaticBank:
  """The training split's layout, the bank's entries and the mined top-k table.

  Args:
    source: the training rows (`pair_batches.TokenizedPairs`, with `side_a` and `tokenizer`).
    mesh: the step's mesh (the mining splits the rows over its batch devices).
    static: `static_bank.StaticNegatives`.
    seed: config.seed (which entries a bank smaller than the split takes).
  """

  metric = 'static_negatives'  # the loop's refresh-time metric prefix
  field = 'static_bank'  # the TrainState field holding the bank (the table: static_topk)

  def __init__(self, source, mesh, static, *, seed=0):
    self.static, self.mesh = static, parallel.batch_mesh(mesh)
    self.layout, texts, self.a_rows = static_bank.layout_of_source(source)
    sizes = static_bank.bank_sizes(static, self.layout)
    counts = {'b': len(texts), 'a': len(self.layout.item_ids)}
    self.entries = {side: static_bank.entries(counts[side], m, seed + i)
                    for i, (side, m) in enumerate(sizes.items())}
    self.tokens = source.tokenizer.encode(list(texts), source.context)[0]  # [T, L]
    self.table = None

  def describe(self):
    """A line for the log."""
    what = ' and '.join(f'{len(self.entries[side])} ' + ('texts b' if side == 'b' else
                                                         'side-a items')
                        for side in self.static.sides)
    use = ('the whole bank' if not self.static.topk else
           f'each row\'s {self.static.topk} most similar entries (mined once)')
    return (f'{what} embedded once by the towers of {self.static.from_workdir}; {use} as extra '
            'negatives of every row')

  def due(self, step):
    """Once, before update 1 (a resumed run restores the bank)."""
    return step == 0

  def _items(self, index):
    return self.a_rows[self.layout.item_rows[index]]

  def refresh(self, embed, state, step):
    """The state with the bank (and the top-k table) from the frozen towers; embed:
    fn(variables, side, items) -> L2-normalised [n, D]."""
    del step
    frozen = static_bank.frozen_towers(self.static.from_workdir, state.params,
                                       state.batch_stats)
    lay, topk = self.layout, self.static.topk
    all_texts = topk and 'a' in self.static.sides  # the rows' texts are queries too
    zt = embed(frozen, 'b', self.tokens if all_texts else self.tokens[self.entries['b']])
    banks = {'b': zt[self.entries['b']] if all_texts else zt}
    zi = None
    if 'a' in self.static.sides or topk:  # items: the bank's, or queries of the texts
      zi = embed(frozen, 'a', self._items(np.arange(len(lay.item_ids)) if topk else
                                          self.entries['a']))
      if 'a' in self.static.sides:
        banks['a'] = zi[self.entries['a']] if topk else zi
    new = {}
    for side, emb in banks.items():
      ids = np.stack([(lay.text_ids if side == 'b' else lay.item_ids)[self.entries[side]],
                      self.entries[side]], axis=1)
      old_emb, old_ids = state.static_bank[side], state.static_bank[side + '_ids']
      pad = old_emb.shape[0] - len(emb)
      ids = np.concatenate([ids, np.tile([[blockwise.NO_NEGATIVE, static_bank.NO_TEXT]],
                                         (pad, 1))])
      emb = np.concatenate([emb, np.zeros((pad, emb.shape[1]), emb.dtype)])
      new[side] = jax.device_put(np.asarray(emb, old_emb.dtype), old_emb.sharding)
      new[side + '_ids'] = jax.device_put(ids.astype(np.int32), old_ids.sharding)
    state = state.replace(static_bank=new)
    if topk:
      tables = {'b': lambda: self._mine('b', zi[lay.item_of_row], banks['b'], lay.group_texts),
                'a': lambda: self._mine('a', zt[lay.text_of_row], banks['a'], lay.group_items)}
      self.table = np.concatenate([tables[side]() for side in self.static.sides], axis=1)
      state = state.replace(static_topk=jax.device_put(self.table, state.static_topk.sharding))
    return state

  def _mine(self, side, queries, bank, group_entries):
    """[N, k] bank positions: each row's k most similar entries, none of its group's."""
    lay, entries = self.layout, self.entries[side]
    count = len(lay.text_ids if side == 'b' else lay.item_ids)
    position = np.full(count + 1, -1, np.int64)  # a text (item) -> its bank position, or -1
    position[entries] = np.arange(len(entries))
    excluded = position[group_entries[lay.group_of_row]]  # [N, E]; -1 padding -> -1
    n = len(queries)
    pad = -n % self.mesh.size
    padded = lambda x, value: np.concatenate([x, np.full((pad, *x.shape[1:]), value, x.dtype)])
    ids = (lay.text_ids if side == 'b' else lay.item_ids)[entries]
    table, _ = corpus_mining.mine_hard_negatives(
        padded(queries, 0), bank, num_hard=self.static.topk, positive=padded(excluded, -1),
        query_ids=padded(lay.ids, -1), candidate_ids=ids,
        block_size=static_bank.MINING_BLOCK, mesh=self.mesh)
    return np.asarray(jax.device_get(table))[:n].astype(np.int32)

  def sync(self, state, step=None):
    """Reads the top-k table of `state` (after a restore) for `attach`."""
    del step
    if self.static.topk:
      self.table = np.asarray(state.static_topk.addressable_data(0))

  def attach(self, batch):
    """This process's batch rows with the bank's fields; 'row' is removed.

    batch: host arrays with 'row' [b] int32. Adds 'b_text' [b] and 'b_group_texts' [b, E]
    int32 (the row's text and its group's texts, -1 padded), with side a 'a_item' [b] and
    'a_group_items' [b, Ea], and with topk 'static_b' (and 'static_a') [b, k] int32: the
    row's mined bank positions (-1: none)."""
    batch, lay = dict(batch), self.layout
    row = np.asarray(batch.pop('row'))
    group = lay.group_of_row[row]
    batch['b_text'] = lay.text_of_row[row].astype(np.int32)
    batch['b_group_texts'] = lay.group_texts[group]
    if 'a' in self.static.sides:
      batch['a_item'] = lay.item_of_row[row].astype(np.int32)
      batch['a_group_items'] = lay.group_items[group]
    k = self.static.topk
    for i, side in enumerate(self.static.sides if k else ()):
      batch['static_' + side] = self.table[row, i * k:(i + 1) * k]
    return batch
