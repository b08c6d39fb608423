"""CLIP's BPE tokenizer against open_clip's ids (tests/data/clip_bpe_tokens.json, made by
benchmarks/make_clip_bpe_fixture.py with open_clip 3.3 and ftfy 6.3)."""

import gzip
import json
import os
import pickle
import re

import numpy as np
import pytest

from contrastive.data import clip_tokenizer
from contrastive.data import tokenizer as sentencepiece_lib

FIXTURE = os.path.join(os.path.dirname(__file__), 'data', 'clip_bpe_tokens.json')


@pytest.fixture(scope='module')
def tok():
  return clip_tokenizer.ClipTokenizer.load()


@pytest.fixture(scope='module')
def fixture():
  with open(FIXTURE) as f:
    return json.load(f)


def _check_rows(tok, fixture, length, indices):
  texts = [fixture['texts'][i] for i in indices]
  ids, flags = tok.encode(texts, length, per_row=True)
  assert ids.shape == (len(texts), length) and ids.dtype == np.int32
  for row, i in zip(ids, indices):
    assert row.tolist() == fixture['ids'][str(length)][i], (i, fixture['texts'][i])
  num_pieces = np.array([fixture['num_pieces'][i] for i in indices])
  np.testing.assert_array_equal(flags, (num_pieces + 2 > length).astype(np.int32))
  assert tok.encode(texts, length)[1] == int((num_pieces + 2 > length).sum())
  assert [len(tok.pieces(t)) for t in texts] == num_pieces.tolist()


@pytest.mark.parametrize('length', [77, 16])
def test_ids_equal_open_clip(tok, fixture, length):
  _check_rows(tok, fixture, length, range(len(fixture['texts'])))
  assert sum(n + 2 > length for n in fixture['num_pieces']) >= 2  # the fixture truncates rows


def test_cleaning_as_open_clip():
  assert clip_tokenizer.clean('caf\u00c3\u00a9') == 'caf\u00e9'  # ftfy's mojibake repair
  assert clip_tokenizer.clean(' It\u2019s  &amp;amp; \ufb01ne\n') == "it's & fine"


def test_vocabulary_and_special_ids(tok):
  assert (tok.vocab_size, tok.pad_id, tok.sot_id, tok.eos_id) == (49408, 0, 49406, 49407)
  assert tok.pieces('A photo of a CAT!') == ['a</w>', 'photo</w>', 'of</w>', 'a</w>', 'cat</w>',
                                             '!</w>']
  assert tok.pieces('<start_of_text>') == ['<start_of_text>']


def test_layout_and_length_check(tok):
  ids, num_truncated = tok.encode(['a photo of a cat', b'hello world'], 8)  # UTF-8 bytes too
  np.testing.assert_array_equal(ids, [[49406, 320, 1125, 539, 320, 2368, 49407, 0],
                                      [49406, 3306, 1002, 49407, 0, 0, 0, 0]])
  assert num_truncated == 0
  assert tok.encode(['a photo of a cat'], 4)[0].tolist() == [[49406, 320, 1125, 49407]]
  with pytest.raises(ValueError, match='length'):
    tok.encode(['x'], 1)


def test_decode_round_trip(tok):
  texts = ['a photo of a cat', 'two dogs playing in the snow', 'the quick brown fox', 'x', '']
  ids, _ = tok.encode(texts, 16)
  assert tok.decode(ids) == texts
  assert tok.decode(ids[1]) == texts[1]
  assert tok.decode(tok.encode(['Hello, World!'], 16)[0][0]) == 'hello , world !'
  row = tok.encode(['one two three four five six'], 5)[0][0]  # truncated: three pieces kept
  assert tok.decode(row) == 'one two three'
  assert tok.decode([49406, 3306, 1002, 0, 0]) == 'hello world'  # no EOT: trailing pad dropped


def test_pickle_and_save_round_trip(tok, tmp_path):
  texts = ['a photo of a cat', 'caf\u00e9 \u732b \U0001F600']
  copy = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(copy.encode(texts, 16)[0], tok.encode(texts, 16)[0])
  path = tmp_path / 'workdir' / 'tokenizer_clip_bpe.txt.gz'
  tok.save(path)
  with open(clip_tokenizer.DEFAULT_VOCAB, 'rb') as f:
    assert path.read_bytes() == f.read()
  np.testing.assert_array_equal(clip_tokenizer.ClipTokenizer.load(path).encode(texts, 16)[0],
                                tok.encode(texts, 16)[0])
  unzipped = tmp_path / 'vocab.txt'  # open_clip's file unzipped reads the same
  unzipped.write_bytes(gzip.decompress(path.read_bytes()))
  assert clip_tokenizer.ClipTokenizer.load(unzipped).pieces(texts[1]) == tok.pieces(texts[1])


def test_wrong_vocabulary_file_is_a_one_line_error(tmp_path):
  sp = sentencepiece_lib.train(['a photo of a cat', 'a dog on the beach'] * 10, vocab_size=300,
                               hard_vocab_limit=False)
  files = {'tokenizer.model': sp.model_proto,
           'random.bin': np.random.default_rng(0).bytes(4096),
           'words.txt.gz': gzip.compress(b'#version: 0.2\nhello world\n'),
           'empty.txt': b''}
  for name, data in files.items():
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(str(path))) as error:
      clip_tokenizer.ClipTokenizer.load(path)
    assert 'not a CLIP BPE vocabulary' in str(error.value) and '\n' not in str(error.value)
