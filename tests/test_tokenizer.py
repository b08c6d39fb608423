"""The SentencePiece tokenizer: trained on the CLDR English emoji texts (~17k, < 1 s)."""

import numpy as np
import pytest

from contrastive.data import emoji
from contrastive.data import tokenizer


@pytest.fixture(scope='module')
def texts():
  table = emoji.read_annotations(emoji.CLDR_DIR, 'en')
  return [t for e in emoji.read_emoji_test()[0] for t in emoji.emoji_texts(e, table)[0]]


@pytest.fixture(scope='module')
def tok(texts):
  return tokenizer.train(texts, vocab_size=1000)


def test_vocab_size_and_special_ids(tok):
  assert tok.vocab_size == 1000
  assert (tok.pad_id, tok.eos_id) == (tokenizer.PAD_ID, tokenizer.EOS_ID) == (0, 2)
  assert len(tok.pieces('waving hand: medium skin tone')) < len('waving hand: medium skin tone')


@pytest.mark.parametrize('model_type', ['unigram', 'bpe'])
def test_training_is_deterministic(texts, model_type):
  first = tokenizer.train(texts[::3], vocab_size=600, model_type=model_type)
  second = tokenizer.train(texts[::3], vocab_size=600, model_type=model_type)
  assert first.model_proto == second.model_proto


def test_round_trip_with_unseen_characters(tok):
  samples = ['waving hand: medium skin tone', '\u6f22\u5b57 and \U0001F44B',  # CJK, emoji: bytes
             'tab\tand  two spaces ', 'caf\u00e9', '']
  ids, num_truncated = tok.encode(samples, length=48)
  assert num_truncated == 0
  assert tok.decode(ids) == samples
  assert tok.decode(ids[1]) == samples[1]
  assert tokenizer.UNK_ID not in ids  # byte fallback: nothing maps to unk
  byte_ids, _ = tok.encode([samples[1].encode('utf-8')], length=48)  # UTF-8 bytes accepted too
  np.testing.assert_array_equal(byte_ids[0], ids[1])


def test_fixed_length_layout_and_truncation_count(tok, texts):
  length = 6
  ids, num_truncated = tok.encode(texts, length=length)
  assert ids.shape == (len(texts), length) and ids.dtype == np.int32
  num_pieces = np.array([len(tok.pieces(t)) for t in texts])
  assert num_truncated == int((num_pieces > length - 1).sum()) > 0
  for row, n in zip(ids, num_pieces):
    kept = min(n, length - 1)
    assert (row[:kept] > tokenizer.EOS_ID).all()  # pieces, then one EOS, then padding
    assert row[kept] == tokenizer.EOS_ID and (row[kept + 1:] == tokenizer.PAD_ID).all()
  long_text = 'people holding hands: medium-light skin tone, dark skin tone'
  row = tok.encode([long_text], length=4)[0][0]
  assert row[-1] == tokenizer.EOS_ID and tok.decode(row) == ''.join(tok.pieces(long_text)[:3]).replace(
      '\u2581', ' ').lstrip()
  with pytest.raises(ValueError, match='length'):
    tok.encode(['a'], length=1)


def test_save_and_load(tok, tmp_path, texts):
  path = str(tmp_path / 'sub' / 'tokenizer.model')
  tok.save(path)
  loaded = tokenizer.Tokenizer.load(path)
  assert loaded.model_proto == tok.model_proto
  np.testing.assert_array_equal(loaded.encode(texts[:50], 16)[0], tok.encode(texts[:50], 16)[0])


class _Records:
  """A random-access source of text records, counting reads."""

  def __init__(self, texts):
    self.records, self.reads = [{'text': t} for t in texts], 0

  def __len__(self):
    return len(self.records)

  def __getitems__(self, indices):
    self.reads += 1
    return [self.records[i] for i in indices]


def test_tokenizer_saved_in_workdir_and_dataset_dir(texts, tmp_path):
  """The first run trains and saves both copies; a new workdir on the same dataset reads the
  dataset directory's (no training: the records are not read), other options train anew."""
  from contrastive.data import pair_batches  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  spec = pair_batches.SPECS['emoji_cldr']
  cfg = ml_collections.ConfigDict(dict(vocab_size=600, model_type='unigram',
                                       character_coverage=0.9995))
  source, dataset_dir = _Records(texts[:3000]), tmp_path / 'dataset'
  dataset_dir.mkdir()
  first = pair_batches.load_or_train_tokenizer(str(tmp_path / 'w1'), source, spec, cfg,
                                               dataset_dir=str(dataset_dir))
  assert source.reads == 1
  assert (tmp_path / 'w1' / pair_batches.TOKENIZER_NAME).read_bytes() == first.model_proto
  assert [p.name for p in dataset_dir.iterdir()] == [pair_batches.tokenizer_cache_name(cfg)]
  second = pair_batches.load_or_train_tokenizer(str(tmp_path / 'w2'), source, spec, cfg,
                                                dataset_dir=str(dataset_dir))
  assert source.reads == 1 and second.model_proto == first.model_proto
  assert (tmp_path / 'w2' / pair_batches.TOKENIZER_NAME).exists()
  cfg.vocab_size = 700
  third = pair_batches.load_or_train_tokenizer(str(tmp_path / 'w3'), source, spec, cfg,
                                               dataset_dir=str(dataset_dir))
  assert source.reads == 2 and third.vocab_size != first.vocab_size
  assert len(list(dataset_dir.iterdir())) == 2
