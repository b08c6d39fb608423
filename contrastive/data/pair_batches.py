"""Pair datasets as the two-tower step's batches: tokenized text, images, and false-negative ids.

Every pair dataset (emoji ↔ CLDR names, WordNet word ↔ gloss, a user's JSON-lines file) is
read through the same three fields of its `PairSpec`: side a (an image or a text), side b (a
text) and a group id. Rows with the same group id are not negatives of each other (the same
emoji image under several names; synonyms sharing a synset), which the step hands to the loss
as `mask_ids`.

A batch of the two-tower step:
    {'a': [B, H, W, 3] uint8 or [B, L] int32 tokens, 'b': [B, L] int32 tokens,
     'id': [B] int32 group ids, 'truncated': [B] int32 (texts of the row cut at L)}

The tokenizer (contrastive/data/tokenizer.py) is trained once on the training split's texts
and saved in the workdir, so a resumed run and `inference.load` read the same one.
"""

import dataclasses
import hashlib
import json
import os

import grain
import jax
import numpy as np

from contrastive import workdir as workdir_lib
from contrastive.config_lib import ConfigError
from contrastive.data import emoji
from contrastive.data import glyphs
from contrastive.data import jsonl_records
from contrastive.data import pairs
from contrastive.data import tokenizer as tokenizer_lib
from contrastive.data import wordnet
from contrastive.negatives import negclip as negclip_lib

TOKENIZER_NAME = 'tokenizer.model'


@dataclasses.dataclass(frozen=True)
class PairSpec:
  """How a pair dataset's records become (a, b, group id)."""
  a: str  # record field of side a: 'image' or a text field
  b: str  # record field of side b (a text)
  group: str  # record field whose equal values mark false negatives
  a_is_image: bool


SPECS = {
    'emoji_cldr': PairSpec(a='image', b='text', group='image_id', a_is_image=True),
    'wordnet_gloss': PairSpec(a='text_a', b='text_b', group='synset_id', a_is_image=False),
    'jsonl_pairs:image_text': PairSpec(a='image', b='text', group='id', a_is_image=True),
    'jsonl_pairs:text_text': PairSpec(a='text_a', b='text_b', group='id', a_is_image=False),
    'webdataset': PairSpec(a='image', b='text', group='id', a_is_image=True),
}


def builder(cfg):
  """The tfds builder of `cfg` (config.dataset: name, data_dir, and per dataset image_size,
  languages, max_examples, styles or jsonl_path and test_fraction)."""
  data_dir = os.path.expanduser(cfg.get('data_dir') or os.path.join('~', 'tensorflow_datasets'))
  if cfg.name == 'emoji_cldr':
    return emoji.EmojiCldr(data_dir=data_dir, image_size=cfg.image_size,
                           languages=tuple(cfg.get('languages', ('en',))),
                           max_emoji=cfg.get('max_examples', 0), styles=emoji_styles(cfg))
  if cfg.name == 'wordnet_gloss':
    return wordnet.WordnetGloss(data_dir=data_dir, max_synsets=cfg.get('max_examples', 0),
                                config='full' if cfg.get('examples', True) else 'definitions')
  if cfg.name == 'jsonl_pairs':
    return pairs.JsonlPairs(data_dir=data_dir, jsonl_path=jsonl_path(cfg),
                            image_size=cfg.get('image_size', 64),
                            test_fraction=cfg.get('test_fraction', jsonl_records.TEST_FRACTION))
  raise ConfigError(f'config.dataset.name={cfg.name!r} is not a pair dataset; choose one of '
                   "('emoji_cldr', 'wordnet_gloss', 'jsonl_pairs').")


def emoji_styles(cfg):
  """config.dataset.styles of emoji_cldr as a tuple of glyphs.TRAINING_STYLES names (a name or
  a comma-separated string also); ConfigError naming the field for another name."""
  styles = cfg.get('styles', ()) or ()
  styles = tuple(s.strip() for s in styles.split(',') if s.strip()) if isinstance(
      styles, str) else tuple(styles)
  try:
    return glyphs.check_styles(styles)
  except ValueError as e:
    raise ConfigError(f'config.dataset.styles: {e}') from None


def spec(cfg, source=None):
  """The PairSpec of `cfg` (a JSON-lines file's kind is read from its records)."""
  if cfg.name != 'jsonl_pairs':
    return SPECS[cfg.name]  # webdataset: contrastive/data/webdataset.py
  record = source[0]
  return SPECS['jsonl_pairs:' + ('image_text' if 'image' in record else 'text_text')]


def jsonl_path(cfg):
  """config.dataset.jsonl_path; ConfigError naming the flag where it is absent or empty."""
  path = cfg.get('jsonl_path')
  if not path or not str(path).strip():
    raise ConfigError('config.dataset.jsonl_path is empty: give your JSON-lines file of pairs '
                      'with --config.dataset.jsonl_path=FILE (configs/siglip_pairs.py).')
  return os.path.expanduser(str(path))


def jsonl_records_of(cfg):
  """The checked records of a jsonl_pairs config (`jsonl_records.read`)."""
  return jsonl_records.read(jsonl_path(cfg),
                            test_fraction=cfg.get('test_fraction', jsonl_records.TEST_FRACTION))


def check_files(cfg, *, batch_size=None, eval_split=None):
  """Raises MissingDatasetError (naming the Debian package or path) before any work; for a
  JSON-lines file also PairsDataError for a bad record or too few records for one batch of
  `batch_size` or for evaluating on `eval_split` (None: not checked), and prints its counts;
  ConfigError for a name that is no pair dataset."""
  if cfg.name not in ('emoji_cldr', 'wordnet_gloss', 'jsonl_pairs'):
    builder(cfg)  # its one-line error
  if cfg.name == 'emoji_cldr':
    emoji.check_files(languages=tuple(cfg.get('languages', ('en',))))
  elif cfg.name == 'wordnet_gloss':
    wordnet.check_files()
  elif cfg.name == 'jsonl_pairs':
    records = jsonl_records_of(cfg)
    jsonl_records.check_counts(records, batch_size=batch_size, eval_split=eval_split)
    print(records.describe(), flush=True)


def get_source(cfg, split):
  """The raw records of `split` (random access), converting on first use (and when the
  source changed) in process 0."""
  b = builder(cfg)
  if not pairs.is_current(b):
    if jax.process_index() == 0:
      pairs.prepare(b)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('prepare_' + cfg.name)
    b = builder(cfg)
  return b.as_data_source(split=split)


SOURCE_RECORD = 'pairs_source.json'  # in the workdir: {JSON-lines path: its fingerprint}


def check_run_source(cfg, workdir, allow_changes=()):
  """Refuses to resume a run on a JSON-lines file that changed since the run started.

  The workdir records the file's `jsonl_records.fingerprint` at the first start. A later start
  whose file differs raises WorkdirError naming the file and the workdir where the workdir
  holds a run trained on it (a checkpoint or its tokenizer), unless `allow_changes`
  (config.allow_config_changes, parsed) names 'dataset' or 'dataset.jsonl_path'; else the
  record is rewritten (process 0). Other datasets: nothing to do.
  """
  if cfg.name != 'jsonl_pairs':
    return
  new = jsonl_records.fingerprint(jsonl_records_of(cfg))
  record_path = os.path.join(workdir, SOURCE_RECORD)
  saved = _read_json(record_path)
  old = saved.get(new['path'])
  if jsonl_records.same_source(old, new):
    return
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  trained = os.path.exists(os.path.join(workdir, TOKENIZER_NAME)) or (
      os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir)))
  allowed = any(rule in ('dataset', 'dataset.jsonl_path') for rule in allow_changes)
  if old and trained and not allowed:
    raise workdir_lib.WorkdirError(
        f'{workdir} holds a run trained on {new["path"]} as it was before '
        f'({jsonl_records.describe_change(old, new)}): use a new --workdir, restore the file, '
        'or resume on the new data with --config.allow_config_changes=dataset.jsonl_path.')
  if old and trained:
    print(f'Resuming on changed data (config.allow_config_changes): '
          f'{jsonl_records.describe_change(old, new)}.', flush=True)
  if jax.process_index() == 0:
    saved[new['path']] = new
    with open(record_path + '.tmp', 'w', encoding='utf-8') as f:
      json.dump(saved, f, indent=1, sort_keys=True)
    os.replace(record_path + '.tmp', record_path)


def _read_json(path):
  """The JSON object of `path`, or {} (absent or unreadable)."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def texts(source, fields):
  """All texts of `fields` in `source` (str), in record order."""
  records = source.__getitems__(range(len(source)))
  return [tokenizer_lib._as_str(r[f]) for r in records for f in fields]  # pylint: disable=protected-access


def tokenizer_cache_name(cfg):
  """The file name of a tokenizer trained with config.tokenizer `cfg`, in a dataset directory."""
  options = dict(vocab_size=cfg.vocab_size, model_type=cfg.get('model_type', 'unigram'),
                 character_coverage=cfg.get('character_coverage', 0.9995))
  digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
  return f'tokenizer-{digest}.model'


def load_or_train_tokenizer(workdir, train_source, pair_spec, cfg, dataset_dir=None):
  """The workdir's tokenizer; else the dataset directory's one for the same options; else one
  trained on the training texts. Saved in the workdir and (where writable) `dataset_dir`.

  cfg: config.tokenizer (vocab_size, model_type, character_coverage). Training is
  deterministic, so every process of a multi-process job trains (or reads) the same one;
  process 0 writes it. A mixture (contrastive/data/mixture.py) passes lists of sources and
  specs: one tokenizer for all their texts.
  """
  path = os.path.join(workdir, TOKENIZER_NAME)
  if os.path.exists(path):
    return tokenizer_lib.Tokenizer.load(path)
  cached = dataset_dir and os.path.join(dataset_dir, tokenizer_cache_name(cfg))
  if cached and os.path.exists(cached):
    tok = tokenizer_lib.Tokenizer.load(cached)
  else:
    sources, specs = ((train_source, pair_spec) if isinstance(train_source, list) else
                      ([train_source], [pair_spec]))
    corpus = set()
    for source, part_spec in zip(sources, specs):
      corpus.update(texts(source, [part_spec.b] + ([] if part_spec.a_is_image else
                                                   [part_spec.a])))
    # hard_vocab_limit=False: a small dataset may fill fewer pieces than vocab_size (ids stay
    # below it, the embedding table keeps vocab_size rows).
    tok = tokenizer_lib.train(sorted(corpus), cfg.vocab_size,
                              model_type=cfg.get('model_type', 'unigram'),
                              hard_vocab_limit=False,
                              character_coverage=cfg.get('character_coverage', 0.9995))
    if cached and jax.process_index() == 0:
      try:  # a cache only: a read-only dataset directory is fine
        tok.save(cached + '.tmp')
        os.replace(cached + '.tmp', cached)
      except OSError:
        pass
  if jax.process_index() == 0:
    tok.save(path)
  return tok


class TokenizedPairs(grain.sources.RandomAccessDataSource):
  """A pair source as the step's rows: {'a', 'b', 'id', 'truncated'} (see the module doc).

  With `with_row` a row also has 'row': its index in the source (the training loop looks up
  its corpus-mined negatives, contrastive/negatives/corpus_index.py, and removes the field).
  With `negclip` = P > 0 a row also has 'b_neg': [P, L] int32, P word-order perturbations of
  its text b (`negatives.negclip.negative_captions`, drawn from (negclip_seed, row index): the
  same on resume), and 'b_neg_valid': [P] bool (False where b has < 2 distinct words).
  """

  def __init__(self, source, pair_spec, tok, context, negclip=0, negclip_seed=0,
               with_row=False):
    self._source, self.spec, self.tokenizer, self.context = source, pair_spec, tok, context
    self.negclip, self.negclip_seed = int(negclip), int(negclip_seed)
    self.with_row = with_row  # each row carries 'row': its index (corpus-mined negatives)

  def __len__(self):
    return len(self._source)

  def _encode(self, text):
    ids, truncated = self.tokenizer.encode([text], self.context)
    return ids[0], truncated

  def __getitem__(self, index):
    return self.__getitems__([index])[0]

  def _side_a(self, record):
    """(a, texts cut): the record's image, or its text a tokenized."""
    if self.spec.a_is_image:
      return np.asarray(record[self.spec.a], np.uint8), 0
    return self._encode(record[self.spec.a])

  def side_a(self, indices, texts_b=False):
    """{'a': [n, ...], 'id': [n] int32} of rows `indices` (texts a tokenized in one call),
    and with `texts_b` 'text_b': their texts b (str): what batch composition and corpus
    mining read of every row (contrastive/batching/from_config.py,
    contrastive/negatives/corpus_index.py), in one pass over the records."""
    records = self._source.__getitems__([int(i) for i in indices])
    if self.spec.a_is_image:
      a = np.stack([np.asarray(r[self.spec.a], np.uint8) for r in records])
    else:
      a = self.tokenizer.encode([tokenizer_lib._as_str(r[self.spec.a]) for r in records],  # pylint: disable=protected-access
                                self.context)[0]
    out = {'a': a, 'id': np.array([r[self.spec.group] for r in records], np.int32)}
    if texts_b:
      out['text_b'] = [tokenizer_lib._as_str(r[self.spec.b]) for r in records]  # pylint: disable=protected-access
    return out

  def __getitems__(self, indices):
    records = self._source.__getitems__([int(i) for i in indices])
    rows = []
    for r in records:
      b, cut_b = self._encode(r[self.spec.b])
      a, cut_a = self._side_a(r)
      rows.append({'a': a, 'b': b, 'id': np.int32(r[self.spec.group]),
                   'truncated': np.int32(cut_a + cut_b)})
    if self.with_row:
      for row, index in zip(rows, indices):
        row['row'] = np.int32(index)
    if self.negclip:
      captions = [tokenizer_lib._as_str(r[self.spec.b]) for r in records]  # pylint: disable=protected-access
      negatives, valid = negclip_lib.negative_captions(captions, self.negclip, self.negclip_seed,
                                                       indices=indices)
      tokens = self.tokenizer.encode([t for row in negatives for t in row], self.context)[0]
      for row, row_tokens, ok in zip(rows, tokens.reshape(len(rows), self.negclip, -1), valid):
        row['b_neg'], row['b_neg_valid'] = row_tokens, ok
    return rows


def eval_pairs(source, pair_spec):
  """The held-out split as distinct items and the relation between them, for retrieval.

  Returns a dict:
    a_items: distinct side-a values (images [Na, H, W, 3] uint8, or texts) — an image is
      identified by its group id, a text by its string;
    b_items: distinct side-b texts [Nb];
    pairs: [P, 2] int (a index, b index) of every record: the correct answers both ways
      (identical texts of different records are one item, so any of them counts as correct);
    a_group / b_group: a record field per item (for zero-shot labels: e.g. 'group').
    records: the records (for labels).
  """
  records = source.__getitems__(range(len(source)))
  key_a = (lambda r: int(r[pair_spec.group])) if pair_spec.a_is_image else (
      lambda r: tokenizer_lib._as_str(r[pair_spec.a]))  # pylint: disable=protected-access
  a_index, b_index, a_first, b_first, links = {}, {}, [], [], []
  for n, r in enumerate(records):
    ka, kb = key_a(r), tokenizer_lib._as_str(r[pair_spec.b])  # pylint: disable=protected-access
    if ka not in a_index:
      a_index[ka] = len(a_index)
      a_first.append(n)
    if kb not in b_index:
      b_index[kb] = len(b_index)
      b_first.append(n)
    links.append((a_index[ka], b_index[kb]))
  a_items = (np.stack([np.asarray(records[n][pair_spec.a], np.uint8) for n in a_first])
             if pair_spec.a_is_image else list(a_index))
  return dict(a_items=a_items, b_items=list(b_index), pairs=np.unique(np.array(links), axis=0),
              a_records=[records[n] for n in a_first], b_records=[records[n] for n in b_first])
