"""Several pair datasets trained in one run (MM-Embed's mixed tasks): `config.dataset.name =
'mixture'`.

  config.dataset = dict(
      name='mixture', data_dir='',
      parts=('emoji_cldr', 'wordnet_gloss'),   # pair datasets (contrastive/data/pair_batches.py)
      fractions=(0.5, 0.5),                    # of every global batch: B f_k rows of part k
      emoji_cldr=dict(image_size=32, languages=('en',), max_examples=0),   # each part's fields
      wordnet_gloss=dict(examples=True, max_examples=0))

The parts share one tokenizer (trained on all their texts) and one model. A row of a mixture
is a row of its part (`pair_batches.TokenizedPairs`) with
  'task': [] int32, its part's index k;
  'id': its group id + k 2^24 (the parts' groups never meet: every id < 2^24);
and, when the parts mix image and text queries (side a), both kinds in every row:
  'a': [S, S, 3] uint8, the image (zeros for a text query);
  'a_text': [L] int32, the text query's tokens (the empty text for an image query);
  'a_is_text': [] bool. The objective embeds a text query with the text tower (tower b, as the
  WordNet recipe's shared tower) and an image with tower a (`objectives.two_tower`): in the
  plan's layout (`query_runs`: each part's rows contiguous) each tower embeds only its own
  rows; under GradCache's micro-batches both towers embed every row and `a_is_text` chooses.

Every global batch holds B f_k rows of part k, each part in its own seeded shuffle (its epochs
independent of the others': the smaller part is seen more often), so the tasks' share of the
loss is fixed by the config, not by the datasets' sizes (`MixturePlan`). Evaluation is per part,
metrics prefixed by the part's name (two_tower_eval.MixtureEvaluator); corpus-mined negatives
keep each query's candidates to its own part's texts (MM-Embed's modality-aware negatives:
contrastive/negatives/corpus_index.py).

Reference: Lin et al. 2024, "MM-Embed: Universal Multimodal Retrieval with Multimodal LLMs".
"""

import grain
import ml_collections
import numpy as np

from contrastive.config_lib import ConfigError

PARTS = ('emoji_cldr', 'wordnet_gloss', 'jsonl_pairs')  # pair_batches.builder's datasets
IMAGE_QUERIES = {'emoji_cldr': True, 'wordnet_gloss': False}  # (a JSON-lines file's: read)
ID_BITS = 24  # part k's group ids become id + k 2^24


def is_mixture(dataset_cfg):
  """True for config.dataset of a mixture (None: a config without a dataset)."""
  return dataset_cfg is not None and dataset_cfg.get('name') == 'mixture'


def part_configs(dataset_cfg):
  """[(name, config.dataset of part k)]: the part's fields with the mixture's data_dir; for
  one dataset (not a mixture) [(its name, dataset_cfg)]."""
  if not is_mixture(dataset_cfg):
    return [(dataset_cfg.name, dataset_cfg)]
  return [(name, ml_collections.ConfigDict(dict(dataset_cfg.get(name, {}), name=name,
                                                data_dir=dataset_cfg.get('data_dir', ''))))
          for name in dataset_cfg.parts]


def image_size(dataset_cfg):
  """S of the image queries: config.dataset.image_size, or a mixture's image parts' (its
  emoji_cldr part's, 32 by default; else the first part with an image_size; else None)."""
  if not is_mixture(dataset_cfg):
    return dataset_cfg.get('image_size')
  parts = dict(part_configs(dataset_cfg))
  if 'emoji_cldr' in parts:
    return parts['emoji_cldr'].get('image_size', 32)
  return next((cfg.image_size for cfg in parts.values() if cfg.get('image_size')), None)


def part_batch_sizes(dataset_cfg, batch_size):
  """[B f_k]: each part's rows in a global batch; ValueError unless they are whole numbers
  >= 1 that sum to B."""
  parts, fractions = tuple(dataset_cfg.get('parts', ())), tuple(dataset_cfg.get('fractions', ()))
  if len(parts) < 2 or len(set(parts)) != len(parts):
    raise ConfigError(f'config.dataset.parts={parts}: a mixture needs >= 2 distinct datasets.')
  if len(fractions) != len(parts):
    raise ConfigError(f'config.dataset.fractions={fractions}: one per part of {parts}.')
  sizes = [f * batch_size for f in fractions]
  if any(s < 1 or abs(s - round(s)) > 1e-9 for s in sizes) or round(sum(sizes)) != batch_size:
    raise ConfigError(f'config.dataset.fractions={fractions}: each part\'s rows per batch '
                      f'(batch_size {batch_size} x fraction = {sizes}) must be a whole number '
                      f'>= 1, and they must sum to the batch.')
  return [int(round(s)) for s in sizes]


def check(dataset_cfg, *, batch_size, total_steps):
  """Raises ConfigError naming the field (before any data is read) for a mixture's
  config.dataset, with the run's config.batch_size and config.total_steps."""
  part_batch_sizes(dataset_cfg, batch_size)
  unknown = [p for p in dataset_cfg.parts if p not in PARTS]
  if unknown:
    raise ConfigError(f'config.dataset.parts: {unknown} are not pair datasets; choose from '
                      f'{PARTS}.')
  if not total_steps:
    raise ConfigError('config.total_steps: a mixture has no common epoch; give the run\'s '
                      'length in steps.')


def mixed_queries(dataset_cfg):
  """True for a mixture whose parts' kinds of queries (images, texts) are known from their
  names (IMAGE_QUERIES) and differ; a JSON-lines part's is known once read
  (`MixturePairs.mixed`)."""
  kinds = {IMAGE_QUERIES[p] for p in dataset_cfg.parts if p in IMAGE_QUERIES}
  return len(kinds) == 2


def query_runs(dataset_cfg, batch_size):
  """((start, stop, is_text), ...): the global batch's rows of each part (`MixturePlan`'s
  layout), for a mixture of image and text queries whose kinds the config names; else None
  (the objective then runs both towers on every row: `objectives.two_tower`)."""
  if not is_mixture(dataset_cfg) or any(p not in IMAGE_QUERIES for p in dataset_cfg.parts):
    return None
  is_text = [not IMAGE_QUERIES[p] for p in dataset_cfg.parts]
  if len(set(is_text)) < 2:
    return None
  sizes = part_batch_sizes(dataset_cfg, batch_size)
  return tuple((int(end - size), int(end), text) for end, size, text in
               zip(np.cumsum(sizes), sizes, is_text))


class MixturePairs(grain.sources.RandomAccessDataSource):
  """The parts' rows one after the other (part k: rows starts[k] ... starts[k + 1] - 1).

  Args:
    names: the parts' dataset names.
    parts: their `pair_batches.TokenizedPairs`, one tokenizer and context for all.
    image_shape: (S, S, 3) of the image parts' images (None: no image part).
  """

  def __init__(self, names, parts, image_shape=None):
    self.names, self.parts = list(names), list(parts)
    self.sizes = [len(p) for p in parts]
    self.starts = np.cumsum([0] + self.sizes)
    self.tokenizer, self.context = parts[0].tokenizer, parts[0].context
    kinds = {p.spec.a_is_image for p in parts}
    self.mixed = len(kinds) == 2  # image and text queries: both fields in every row
    self.spec = parts[0].spec if not self.mixed else next(p.spec for p in parts
                                                          if p.spec.a_is_image)
    self.with_row = parts[0].with_row
    self._blank_image = np.zeros(image_shape or (1, 1, 3), np.uint8)
    self._blank_text = self.tokenizer.encode([''], self.context)[0][0]

  def __len__(self):
    return int(self.starts[-1])

  def __getitem__(self, index):
    return self.__getitems__([index])[0]

  def part_of(self, indices):
    """[n] part index of each mixture row."""
    return np.searchsorted(self.starts, np.asarray(indices, np.int64), side='right') - 1

  def _adapt(self, row, k):
    """Part k's row as a mixture row (the module doc)."""
    row = dict(row, id=np.int32(int(row['id']) + (k << ID_BITS)), task=np.int32(k))
    if int(row['id']) >> ID_BITS != k:
      raise ValueError(f'part {self.names[k]!r} has a group id >= 2^{ID_BITS}.')
    if 'row' in row:
      row['row'] = np.int32(row['row'] + self.starts[k])
    if self.mixed:
      if self.parts[k].spec.a_is_image:
        row['a_text'], row['a_is_text'] = self._blank_text, np.bool_(False)
      else:
        row['a_text'], row['a'], row['a_is_text'] = row['a'], self._blank_image, np.bool_(True)
    return row

  def __getitems__(self, indices):
    indices = np.asarray([int(i) for i in indices], np.int64)
    part = self.part_of(indices)
    rows = [None] * len(indices)
    for k in np.unique(part):  # a few parts: not a loop over rows of the loss
      where = np.flatnonzero(part == k)
      local = self.parts[k].__getitems__(indices[where] - self.starts[k])
      for n, row in zip(where, local):
        rows[n] = self._adapt(row, int(k))
    return rows

  def query_parts(self):
    """[(side, rows, side_a)] per part: the tower that embeds its queries ('a'; 'b' for text
    queries of a mixed mixture), its mixture rows, and `TokenizedPairs.side_a` of them with
    texts b and the mixture's group ids (what corpus mining reads)."""
    out = []
    for k, part in enumerate(self.parts):
      side_a = part.side_a(range(len(part)), texts_b=True)
      side_a['id'] = side_a['id'] + np.int32(k << ID_BITS)
      side = 'b' if self.mixed and not part.spec.a_is_image else 'a'
      out.append((side, self.starts[k] + np.arange(len(part)), side_a))
    return out
