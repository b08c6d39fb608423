"""WordNet 3.0 word <-> gloss pairs: a text-text tfds builder (no download, no TensorFlow).

Source: the Debian package `wordnet-base`, /usr/share/wordnet/data.{noun,verb,adj,adv} (WordNet
licence; format in wndb(5WN)): 117,659 synsets, one line each,

    offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id ...] p_cnt [pointers ...] | gloss

One example per (word, synset): 206,941 pairs, `text_a` the word (underscores -> spaces, adjective
markers such as `(p)` dropped) and `text_b` the synset's gloss (definition; "examples"):

    builder = WordnetGloss(data_dir=tmp)
    train = pairs.load_split(builder, 'train')      # converts on first use
    train[i] -> {'text_a': bytes, 'text_b': bytes, 'synset_id', 'gloss_id', 'lexname', 'pos': int32,
                 'synset': bytes (e.g. b'n02084071')}

Words of one synset share `synset_id` and their gloss: in a batch they are false negatives, which a
loss can mask with `synset_id[:, None] == synset_id[None, :]`. Identical glosses share `gloss_id`.
`lexname` indexes LEXNAMES (45 lexicographer categories, for zero-shot). The split is by word
(case-insensitive): every sense of a held-out word is in 'test'.
"""

import dataclasses
import math
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from contrastive.data import pairs
from contrastive.data.fashion_mnist import MissingDatasetError

WORDNET_DIR = '/usr/share/wordnet'
DEBIAN_PACKAGE = 'wordnet-base'
POS_FILES = ('noun', 'verb', 'adj', 'adv')  # `pos` index; adjective satellites ('s') count as adj
_POS_INDEX = {'n': 0, 'v': 1, 'a': 2, 's': 2, 'r': 3}
_MARKER = re.compile(r'\((a|p|ip)\)$')

# lexnames(5WN) of WordNet 3.0: file number -> lexicographer file. wordnet-base ships the man page
# (/usr/share/man/man5/lexnames.5WN.gz), not the `lexnames` file, so the list lives here.
LEXNAMES = (
    'adj.all', 'adj.pert', 'adv.all', 'noun.Tops', 'noun.act', 'noun.animal', 'noun.artifact',
    'noun.attribute', 'noun.body', 'noun.cognition', 'noun.communication', 'noun.event',
    'noun.feeling', 'noun.food', 'noun.group', 'noun.location', 'noun.motive', 'noun.object',
    'noun.person', 'noun.phenomenon', 'noun.plant', 'noun.possession', 'noun.process',
    'noun.quantity', 'noun.relation', 'noun.shape', 'noun.state', 'noun.substance', 'noun.time',
    'verb.body', 'verb.change', 'verb.cognition', 'verb.communication', 'verb.competition',
    'verb.consumption', 'verb.contact', 'verb.creation', 'verb.emotion', 'verb.motion',
    'verb.perception', 'verb.possession', 'verb.social', 'verb.stative', 'verb.weather', 'adj.ppl')


@dataclasses.dataclass(frozen=True)
class Synset:
  """One line of a data file: `pos` in 'nvasr', `lexname` an index into LEXNAMES."""
  offset: int
  pos: str
  lexname: int
  words: tuple[str, ...]
  gloss: str

  @property
  def wnid(self):
    """'n02084071'-style id (satellite adjectives as 'a'), unique across the four files."""
    return f"{'a' if self.pos == 's' else self.pos}{self.offset:08d}"


def check_files(wordnet_dir=WORDNET_DIR):
  """The paths of the 4 data files; raises MissingDatasetError (one line naming the package and
  path) if one is missing."""
  paths = [os.path.join(wordnet_dir, f'data.{pos}') for pos in POS_FILES]
  for path in paths:
    if not os.path.isfile(path):
      raise MissingDatasetError(f'WordNet file {path!r} not found: install the Debian package '
                                f'`{DEBIAN_PACKAGE}` (apt-get install {DEBIAN_PACKAGE}).')
  return paths


def clean_word(word):
  """'galore(ip)' -> 'galore', 'take_a_breath' -> 'take a breath'."""
  return _MARKER.sub('', word).replace('_', ' ')


def parse_line(line):
  """One data-file line -> Synset (see the module docstring for the layout)."""
  head, _, gloss = line.partition(' | ')
  fields = head.split()
  count = int(fields[3], 16)
  words = tuple(clean_word(w) for w in fields[4:4 + 2 * count:2])
  return Synset(int(fields[0]), fields[2], int(fields[1]), words, gloss.strip())


def read_synsets(wordnet_dir=WORDNET_DIR):
  """All synsets of data.{noun,verb,adj,adv}, in that order (the licence header lines skipped)."""
  synsets = []
  for pos in POS_FILES:
    with open(os.path.join(wordnet_dir, f'data.{pos}'), encoding='utf-8') as f:
      synsets += [parse_line(line) for line in f if not line.startswith('  ')]
  return synsets


def definition(gloss):
  """The gloss without its quoted example sentences: 'draw air into ...; "I can breathe"' ->
  'draw air into ...'."""
  return gloss.split('; "', 1)[0].strip()


@dataclasses.dataclass
class WordnetGlossConfig(tfds.core.BuilderConfig):
  """examples: keep the gloss's example sentences in `text_b`; test_fraction: share of (distinct,
  lower-cased) words held out; max_synsets: if > 0, every k-th synset (~ that many), for tests."""
  examples: bool = True
  test_fraction: float = 0.1
  max_synsets: int = 0


class WordnetGloss(tfds.core.GeneratorBasedBuilder):
  """WordNet 3.0 word <-> gloss pairs with synset, gloss and lexname ids (train/test by word)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Parsed from the data files of the Debian package.'}
  BUILDER_CONFIGS = [WordnetGlossConfig(name='full'),
                     WordnetGlossConfig(name='definitions', examples=False)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'apt-get install {DEBIAN_PACKAGE} (files in {WORDNET_DIR})'

  def __init__(self, *, max_synsets=0, wordnet_dir=WORDNET_DIR, **kwargs):
    if max_synsets:
      base = kwargs.get('config') or 'full'
      base = self.builder_configs[base] if isinstance(base, str) else base
      kwargs['config'] = dataclasses.replace(base, name=f'{base.name}_sub{max_synsets}',
                                             max_synsets=max_synsets)
    self._wordnet_dir = wordnet_dir
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)
    self._original_state.update(wordnet_dir=wordnet_dir, file_format=kwargs['file_format'])

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'text_a': tfds.features.Text(),
            'text_b': tfds.features.Text(),
            'synset': tfds.features.Text(),
            'synset_id': tfds.features.Scalar(dtype=np.int32),
            'gloss_id': tfds.features.Scalar(dtype=np.int32),
            'lexname': tfds.features.Scalar(dtype=np.int32),
            'pos': tfds.features.Scalar(dtype=np.int32),
        }),
        metadata=tfds.core.MetadataDict(),
        homepage='https://wordnet.princeton.edu/',
    )

  def download_and_prepare(self, *args, **kwargs):
    if not self.is_prepared():  # before tfds creates any folder
      check_files(self._wordnet_dir)
    return super().download_and_prepare(*args, **kwargs)

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    check_files(self._wordnet_dir)
    synsets = read_synsets(self._wordnet_dir)
    glosses = [s.gloss if cfg.examples else definition(s.gloss) for s in synsets]
    gloss_ids = {g: i for i, g in enumerate(dict.fromkeys(glosses))}
    stride = math.ceil(len(synsets) / cfg.max_synsets) if cfg.max_synsets else 1
    rows = [(i, s, k, word, glosses[i], gloss_ids[glosses[i]])
            for i, s in enumerate(synsets) if i % stride == 0 for k, word in enumerate(s.words)]
    self.info.metadata.update(lexnames=list(LEXNAMES), pos=list(POS_FILES),
                              num_synsets=len(synsets[::stride]), num_glosses=len(gloss_ids))
    is_test = {w: pairs.in_test_split(w, cfg.test_fraction) for w in {r[3].lower() for r in rows}}
    return {split: self._generate_examples(
        [r for r in rows if is_test[r[3].lower()] == (split == 'test')]) for split in ('train', 'test')}

  def _generate_examples(self, rows):
    for synset_id, s, k, word, gloss, gloss_id in rows:
      yield f'{s.wnid}_{k}', {
          'text_a': word, 'text_b': gloss, 'synset': s.wnid, 'synset_id': synset_id,
          'gloss_id': gloss_id, 'lexname': s.lexname, 'pos': _POS_INDEX[s.pos]}
