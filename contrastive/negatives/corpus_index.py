"""`config.hard_negatives`: corpus-mined hard negatives refreshed during training (ANCE, STAR,
ADORE) on the two-tower recipes.

  config.hard_negatives = dict(
      num_hard=0,         # K mined text-b negatives per training row (0: off)
      refresh_every=0,    # R: re-embed the corpus and re-mine before steps R, 2R, ...
      from_start=False,   # also before step 1, with the starting towers (a previous stage's)
      block_size=1024,    # candidates per tile of the exact top-k
      same_part=True)     # a mixture (data/mixture.py): only the row's own part's texts

e.g. `--config.hard_negatives.num_hard=4 --config.hard_negatives.refresh_every=300`.

The corpus is the training split's distinct texts b (the candidate side: captions, glosses).
Before update R + 1, 2R + 1, ... (and 1 with `from_start`; the rows have no mined negatives
until then: random-init towers would mine random texts) the loop embeds every distinct side-a item
and every candidate with the current towers (sharded and jitted, `TwoTowerEvaluator.embed`)
and mines each training row i's K hardest candidates (`corpus_mining.mine_hard_negatives`,
an exact tiled top-k: never an N x M matrix):

  hard(i) = top-K_j  s(za_i, zb_j)  over  j not in texts(group(i))

(the positive text and every text of the row's group — same emoji, same synset — are left
out; identical texts are one candidate, and a text of several groups, such as the emoji
names "face" or "light skin tone", is left out for each of them). The [N, K] table is a field of the train state
(`TrainState.mined`), so it is saved with each checkpoint and a resumed run reads the same
negatives: resume stays exact. Each batch row then carries its K mined texts as tokens
('b_hard' [B, K, L], 'b_hard_valid', 'b_hard_id'); the objective embeds them with tower b and
adds all B K of them to SigLIP's global loss as extra negatives of every row, beside the
random in-batch ones (STAR's mix; DPR shares mined negatives across the batch the same way),
each masked from the rows of every group that has its text (`objectives.text_negatives`:
each row carries its group's texts, each column its text, `blockwise.distinct_group_texts`;
the same rule then also keeps an in-batch text of the row's group from being its negative).

A mixture of datasets (contrastive/data/mixture.py): with `same_part` (default) a row's
candidates are its own dataset's texts only (an emoji's names, a word's glosses: MM-Embed's
modality-aware hard negatives, Lin et al. 2024); False mines from every part's texts.

ADORE (Zhan et al. 2021): lock the document tower (`--config.lit.locked_tower=text`, or `b`) and
the candidate embeddings are computed once; each refresh re-embeds only the queries, so the
query tower is trained against hard negatives of a fixed index. (ADORE re-retrieves at every
step; here it is every R steps.)

References:
  Xiong et al. 2021, "Approximate Nearest Neighbor Negative Contrastive Learning for Dense
  Text Retrieval" (ANCE), ICLR.
  Zhan et al. 2021, "Optimizing Dense Retrieval Model Training with Hard Negatives"
  (STAR / ADORE), SIGIR.
"""

import dataclasses

import jax
import numpy as np

from contrastive import parallel
from contrastive.config_lib import ConfigError
from contrastive.negatives import corpus_mining

@dataclasses.dataclass(frozen=True)
class HardNegatives:
  """config.hard_negatives (the module docstring); the defaults are those of a config without
  the field: off."""
  num_hard: int = 0
  refresh_every: int = 0
  from_start: bool = False
  block_size: int = 1024
  same_part: bool = True


DEFAULTS = dataclasses.asdict(HardNegatives())


def check(hard, loss_name):
  """Raises ConfigError naming the field of `hard` (a HardNegatives), before any data is read
  or anything compiled; loss_name: config.loss.name."""
  k, every, block = hard.num_hard, hard.refresh_every, hard.block_size
  if k < 0:
    raise ConfigError(f'config.hard_negatives.num_hard={k} must be >= 0 (0: off).')
  if k and every < 1:
    raise ConfigError(f'config.hard_negatives.refresh_every={every}: mining {k} negatives '
                      'needs a refresh interval >= 1 step.')
  if k and block < 1:
    raise ConfigError(f'config.hard_negatives.block_size={block} must be >= 1.')
  if k and loss_name != 'sigmoid_loss':
    raise ConfigError(f'config.hard_negatives.num_hard={k}: the mined text negatives join the '
                      f'loss as extra negatives, which need sigmoid_loss (got {loss_name!r}).')


class CorpusIndex:
  """The training rows, their distinct side-a items and candidate texts, and the mined table.

  Args:
    source: the training rows (`pair_batches.TokenizedPairs`, with `side_a`).
    mesh: the step's mesh (the mining splits the queries over its batch devices).
    hard: `HardNegatives`.
    seed: the loader's seed (its plan's batches).
    fixed_b: tower b is locked (LiT on the text tower: ADORE): the candidates are embedded once.
    plan: the loader's plan (`batching.from_config.train_loader(with_plan=True)`): a refresh
      before update s + 1 mines only the rows of the loader's batches s ... s + R - 1, the
      ones used before the next refresh (the others keep their last negatives), which is the
      same as mining every row for every batch that uses them; None: every row.
    total_steps: the run's length (no batch after it is mined for).
  """

  metric = 'hard_negatives'  # the loop's refresh-time metric prefix
  field = 'mined'  # the TrainState field holding the table

  def __init__(self, source, mesh, hard, *, seed=0, fixed_b=False, plan=None,
               total_steps=None):
    self.k, self.every, self.block = (int(v) for v in (hard.num_hard, hard.refresh_every,
                                                       hard.block_size))
    self.mesh = parallel.batch_mesh(mesh)
    self.plan, self.seed, self.total = plan, seed, total_steps
    self.from_start = bool(hard.from_start)
    n = len(source)
    parts = (source.query_parts() if hasattr(source, 'query_parts') else
             [('a', np.arange(n), source.side_a(range(n), texts_b=True))])
    self.a_parts = []  # (tower, distinct side-a items, first item index) per part
    self.a_of_row, self.row_ids = np.empty(n, np.int64), np.empty(n, np.int32)
    self.task, keys = np.empty(n, np.int32), np.empty(n, object)
    for k, (side, rows, part) in enumerate(parts):  # a few parts (a mixture's datasets)
      items, item_of_row = np.unique(part['a'].reshape(len(rows), -1), axis=0,
                                     return_inverse=True)
      start = sum(len(p[1]) for p in self.a_parts)
      self.a_parts.append((side, items.reshape(-1, *part['a'].shape[1:]), start))
      self.a_of_row[rows] = start + item_of_row.reshape(-1)
      self.row_ids[rows], self.task[rows] = part['id'], k
      keys[rows] = part['text_b'] if len(parts) == 1 else [f'{k}:{t}' for t in part['text_b']]
    keys, self.text_of_row = np.unique(keys, return_inverse=True)  # one candidate per text
    self.text_of_row = self.text_of_row.reshape(-1)  # (per part: MM-Embed's modalities)
    texts = keys if len(parts) == 1 else [key.split(':', 1)[1] for key in keys]
    self.candidate_task = (None if len(parts) == 1 or not hard.same_part else
                           np.array([int(key.split(':', 1)[0]) for key in keys], np.int32))
    if self.k > len(texts) - 1:
      raise ConfigError(f'config.hard_negatives.num_hard={self.k} is more than the corpus has '
                        f'besides a row\'s own text ({len(texts)} distinct texts b).')
    self.tokens = source.tokenizer.encode(list(texts), source.context)[0]  # [M, L]
    self.candidate_ids = np.empty(len(texts), np.int32)  # the group of a text's first row
    self.candidate_ids[self.text_of_row[::-1]] = self.row_ids[::-1]
    self.group_of_row, self.group_texts = group_texts(self.task, self.row_ids,
                                                      self.text_of_row)
    self.fixed_b = fixed_b  # ADORE
    self._zb = None
    self.table = None

  def describe(self):
    """A line for the log."""
    what = 'queries only (tower b locked: ADORE)' if self.fixed_b else 'both towers'
    per_part = '' if self.candidate_task is None else ', each from its own part\'s (MM-Embed)'
    return (f'{self.k} mined negatives per row from {len(self.tokens)} distinct texts b'
            f'{per_part}, {sum(len(p[1]) for p in self.a_parts)} side-a items; refreshed '
            f'every {self.every} steps ({what})')

  def empty(self):
    """The table before the first refresh: [N, K] int32 of -1 (no negative)."""
    return np.full((len(self.row_ids), self.k), -1, np.int32)

  def due(self, step):
    """True if the table is re-mined before update `step + 1`: steps R, 2R, ... (and 0 with
    `from_start`: mining with the starting towers, e.g. a previous stage's via model_init)."""
    return step % self.every == 0 and (step > 0 or self.from_start)

  def rows_until_next_refresh(self, step):
    """The distinct rows of the loader's batches step ... step + R - 1 (all rows without a
    plan, or with a plan recomputed every period, whose next period is not known yet)."""
    if self.plan is None or getattr(self.plan, 'periodic', None) is not None:
      return np.arange(len(self.row_ids))
    end = step + self.every if self.total is None else min(step + self.every, self.total)
    return np.unique(np.concatenate([self.plan.rows(s, self.seed)
                                     for s in range(step, max(end, step + 1))]))

  def _embed_items(self, embed, state, items):
    """[n, D]: the side-a items `items` (sorted indices) through their parts' towers."""
    out = []
    for side, part_items, start in self.a_parts:  # a few parts (a mixture's datasets)
      mine = items[(items >= start) & (items < start + len(part_items))] - start
      if len(mine):
        out.append(embed(state, side, part_items[mine]))
    return np.concatenate(out)

  def mine(self, embed, state, rows):
    """[n, K] int32: the hard negatives (indices into the candidates) of training rows `rows`
    [n], from the towers of `state`. embed: fn(state, side, items) -> L2-normalised [m, D]."""
    items, item_of_row = np.unique(self.a_of_row[rows], return_inverse=True)
    za = self._embed_items(embed, state, items)[item_of_row.reshape(-1)]
    if self._zb is None or not self.fixed_b:
      self._zb = embed(state, 'b', self.tokens)
    n = len(rows)
    pad = -n % self.mesh.size
    padded = lambda x: np.concatenate([x, np.full(pad, -1, x.dtype)])
    modality = {} if self.candidate_task is None else dict(  # each row's own part's texts
        query_modality=padded(self.task[rows]), candidate_modality=self.candidate_task)
    queries = np.concatenate([za, np.zeros((pad, za.shape[1]), za.dtype)])
    excluded = self.group_texts[self.group_of_row[rows]]  # [n, E]: every text of the group
    excluded = np.concatenate([excluded, np.full((pad, excluded.shape[1]), -1, np.int32)])
    table, _ = corpus_mining.mine_hard_negatives(
        queries, self._zb, num_hard=self.k, positive=excluded,
        query_ids=padded(self.row_ids[rows]), candidate_ids=self.candidate_ids,
        block_size=self.block, mesh=self.mesh, **modality)
    return np.asarray(jax.device_get(table))[:n]

  def refresh(self, embed, state, step):
    """The state with the table re-mined for the rows used before the next refresh
    (`rows_until_next_refresh(step)`; the others unchanged), replicated over the mesh."""
    rows = self.rows_until_next_refresh(step)
    table = np.array(self.table)
    table[rows] = self.mine(embed, state, rows)
    self.table = table
    return state.replace(mined=jax.device_put(table, state.mined.sharding))

  def sync(self, state, step=None):
    """Reads the table of `state` (after a restore) for `attach`."""
    del step
    self.table = np.asarray(state.mined.addressable_data(0))

  def attach(self, batch):
    """This process's batch rows with their mined texts; 'row' is removed.

    batch: host arrays with 'row' [b] int32. Adds 'b_hard' [b, K, L] int32 tokens,
    'b_hard_valid' [b, K] bool (False: no negative yet; the token row is the row's own text,
    which `objectives.text_negatives` makes a negative of no row), 'b_hard_id' [b, K] int32
    (each candidate's first group) and 'b_hard_text' [b, K] int32 (its text index); and for
    the mask of texts shared by groups, 'b_text' [b] int32 (the row's own text index) and
    'b_group_texts' [b, E] int32 (its group's texts, -1 padded; E = `width`).
    """
    batch = dict(batch)
    row = np.asarray(batch.pop('row'))
    mined = self.table[row]  # [b, K]
    valid = mined >= 0
    text = np.where(valid, mined, self.text_of_row[row][:, None])
    batch['b_hard'] = self.tokens[text]
    batch['b_hard_valid'] = valid
    batch['b_hard_id'] = np.where(valid, self.candidate_ids[text], self.row_ids[row][:, None])
    batch['b_hard_text'] = text.astype(np.int32)
    batch['b_text'] = self.text_of_row[row].astype(np.int32)
    batch['b_group_texts'] = self.group_texts[self.group_of_row[row]]
    return batch

  @property
  def width(self):
    """E: the most distinct texts b of one group (the width of 'b_group_texts')."""
    return self.group_texts.shape[1]


def group_texts(part, group, text):
  """Each row's group and every group's distinct texts.

  Args:
    part, group, text: [N] ints per row: its dataset part, group id and text index.

  Returns:
    (group_of_row [N] int64 into the groups, texts [G, E] int32: group g's distinct text
    indices in increasing order, -1 padded; E the most of any group).
  """
  keys = np.stack([np.asarray(part, np.int64), np.asarray(group, np.int64)], axis=1)
  _, group_of_row = np.unique(keys, axis=0, return_inverse=True)
  group_of_row = group_of_row.reshape(-1)
  pairs = np.unique(np.stack([group_of_row, np.asarray(text, np.int64)], axis=1), axis=0)
  starts = np.searchsorted(pairs[:, 0], np.arange(group_of_row.max() + 1))
  slot = np.arange(len(pairs)) - starts[pairs[:, 0]]  # each text's place in its group
  out = np.full((len(starts), slot.max() + 1), -1, np.int32)
  out[pairs[:, 0], slot] = pairs[:, 1]
  return group_of_row, out


def group_width(sources, specs):
  """E of a training set without building its index (the AOT compile's batch): the most
  distinct texts b of one group. sources: raw pair sources (records); specs: their PairSpecs."""
  part, group, text = [], [], []
  for k, (source, spec) in enumerate(zip(sources, specs)):
    records = source.__getitems__(range(len(source)))
    part += [k] * len(records)
    group += [int(r[spec.group]) for r in records]
    text += [(k, r[spec.b]) for r in records]
  _, text_index = np.unique(np.array([f'{k}:{t!r}' for k, t in text]), return_inverse=True)
  return group_texts(np.array(part), np.array(group), text_index.reshape(-1))[1].shape[1]
