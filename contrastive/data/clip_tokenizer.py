r"""CLIP's byte-level BPE tokenizer on Hugging Face `tokenizers`: open_clip's `SimpleTokenizer` ids.

Radford et al. 2021 (CLIP) tokenize with byte-pair encoding (Sennrich et al. 2016) over UTF-8 bytes
mapped to printable characters (GPT-2's `bytes_to_unicode`), with `</w>` marking a word's last
piece: 49,408 ids = 256 bytes + 256 bytes with `</w>` + 48,894 merges + `<start_of_text>` (49406)
and `<end_of_text>` (49407). The vocabulary is OpenAI's bpe_simple_vocab_16e6.txt.gz (MIT License,
Copyright (c) 2021 OpenAI; as open_clip ships it), bundled in assets/.

    tok = ClipTokenizer.load()                          # the bundled vocabulary
    ids, num_truncated = tok.encode(texts, length=77)   # [N, 77] int32: SOT, pieces, EOT, then 0

How it matches `open_clip.tokenize(texts, context_length=L)` (open_clip 3.3, tested id for id on
tests/data/clip_bpe_tokens.json): the text is cleaned in Python as open_clip's `basic_clean`,
`whitespace_clean` and `str.lower()` do; `tokenizers` splits it with open_clip's regex (a `Split`
pre-tokenizer that keeps the matches), maps its bytes to characters (`ByteLevel`) and merges each
word (`models.BPE` with end_of_word_suffix '</w>'). A literal '<start_of_text>' or '<end_of_text>'
that the regex matches as a word becomes that special id, as in open_clip. A row longer than L
keeps its first L ids with the last one set to EOT, as open_clip does.

What can differ: letters and digits new in Unicode after 16.0. Oniguruma's `\p{L}`/`\p{N}` in
tokenizers 0.23.3 do not have them; open_clip's `regex` module may (its own ids for them change
with its version).
"""

import gzip
import html
import os

import ftfy
import numpy as np
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from contrastive.data import tokenizer as tokenizer_lib

PAD_ID, SOT_ID, EOT_ID, VOCAB_SIZE, NUM_MERGES = 0, 49406, 49407, 49408, 48894
SPECIALS = ('<start_of_text>', '<end_of_text>')
DEFAULT_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets',
                             'bpe_simple_vocab_16e6.txt.gz')
# open_clip's pattern. It is compiled there with re.IGNORECASE, on lowercased text: the one match
# that adds is 's' as U+017F 'ſ' (its only simple case fold), spelled out here ((?i) would double
# the time Oniguruma takes to split).
PATTERN = (r"<[sſ]tart_of_text>|<end_of_text>|'[sſ]|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
           r"[^\s\p{L}\p{N}]+")

def clean(text):
  """open_clip's 'lower' cleaning: ftfy.fix_text, HTML unescaped twice, one space between
  words, lowercase."""
  text = text.decode('utf-8') if isinstance(text, (bytes, np.bytes_)) else str(text)
  text = html.unescape(html.unescape(ftfy.fix_text(text)))
  return ' '.join(text.split()).lower()


class ClipTokenizer:
  """CLIP's BPE with fixed-length batch encoding; the interface of tokenizer.Tokenizer."""

  pad_id, sot_id, eos_id, vocab_size = PAD_ID, SOT_ID, EOT_ID, VOCAB_SIZE

  def __init__(self, vocab_bytes, *, source='vocab bytes'):
    """vocab_bytes: a bpe_simple_vocab_16e6.txt.gz file's bytes (or unzipped); source: its name."""
    self.vocab_bytes = data = bytes(vocab_bytes)
    try:
      data = gzip.decompress(data) if data[:2] == b'\x1f\x8b' else data
      lines = data.decode('utf-8').split('\n')
    except (OSError, EOFError, UnicodeDecodeError) as e:
      raise ValueError(f'{source} is not a CLIP BPE vocabulary (gzipped UTF-8 text): {e}') from None
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    odd = next((n for n, m in enumerate(merges, 2) if len(m) != 2), None)
    why = (f'its first line {lines[0][:40]!r} is not "#version: ..."' if '#version' not in lines[0]
           else f'{len(merges)} merges, not {NUM_MERGES}' if len(merges) < NUM_MERGES
           else f'line {odd} is not a merge of two pieces' if odd else None)
    if why:
      raise ValueError(f'{source} is not a CLIP BPE vocabulary: {why}.')
    byte_chars = list(_bytes_to_unicode().values())  # ids 0-255, in CLIP's order
    self._vocab = [*byte_chars, *(c + '</w>' for c in byte_chars), *map(''.join, merges), *SPECIALS]
    bpe = models.BPE({p: i for i, p in enumerate(self._vocab)}, merges, end_of_word_suffix='</w>')
    self._tok = Tokenizer(bpe)
    self._tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior='removed', invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    self._byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}

  def __reduce__(self):  # pickled as its vocabulary bytes (grain worker processes)
    return ClipTokenizer, (self.vocab_bytes,)

  @classmethod
  def load(cls, path=None):
    """Reads a vocabulary file (`save`'s or open_clip's); None: the bundled one."""
    path = DEFAULT_VOCAB if path is None else path
    with open(path, 'rb') as f:
      return cls(f.read(), source=str(path))

  def save(self, path):
    """Writes the vocabulary file it was built from (open_clip's `bpe_path` reads it too)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(self.vocab_bytes)

  def _ids(self, texts):
    """The piece ids of each text (no SOT/EOT): N lists of ints."""
    out = []
    for text in map(clean, texts):
      enc = self._tok.encode(text)  # one text at a time: no thread pool (the process is one core)
      ids = enc.ids
      if '<start_of_text>' in text or '<end_of_text>' in text:  # a special the regex kept as a word
        words = {}
        for i, w in enumerate(enc.word_ids):
          words.setdefault(w, []).append(i)
        for idx in sorted(words.values(), reverse=True):
          word = text[enc.offsets[idx[0]][0]:enc.offsets[idx[-1]][1]]
          if word in SPECIALS:
            ids[idx[0]:idx[-1] + 1] = [SOT_ID if word == SPECIALS[0] else EOT_ID]
      out.append(ids)
    return out

  def pieces(self, text):
    """The BPE pieces of one text (for inspection), e.g. ['a</w>', 'photo</w>', 'of</w>']."""
    return [self._vocab[i] for i in self._ids([text])[0]]

  def encode(self, texts, length, *, per_row=False):
    """Fixed-length ids of a batch of texts, as open_clip.tokenize(texts, context_length=length).

    Each row is SOT, the text's pieces, EOT, then PAD_ID (0) up to `length`. A text of more than
    `length - 2` pieces keeps SOT and its first `length - 2`, and the row's last id is EOT.

    Args:
      texts: N strings (str or UTF-8 bytes).
      length: L, the row length (>= 2).

    Returns:
      (ids [N, L] int32, num_truncated): the number of texts that lost pieces (with per_row:
      [N] int32, 1 for each text that lost pieces).
    """
    return tokenizer_lib.fixed_length(self._ids(texts), length, eos_id=EOT_ID, pad_id=PAD_ID,
                                      sot_id=SOT_ID, per_row=per_row)

  def decode(self, ids):
    """ids [N, L] (or [L]) -> N strings (or one): the pieces between SOT and the first EOT.

    As open_clip's decode, with '</w>' a space, bytes that are not UTF-8 as U+FFFD, and the last
    word's space stripped. Pieces are lowercase and cleaned: 'A cat!' comes back as 'a cat !'.
    Id 0 is both PAD and the piece '!', so a row without EOT drops only its trailing zeros.
    """
    ids = np.asarray(ids)
    if ids.ndim == 1:
      return self.decode(ids[None])[0]
    texts = []
    for row in ids.tolist():
      row = row[1:] if row[:1] == [SOT_ID] else row
      if EOT_ID in row:
        row = row[:row.index(EOT_ID)]
      else:
        while row and row[-1] == PAD_ID:
          row.pop()
      chars = ''.join(self._vocab[i] for i in row)
      text = bytes(self._byte_decoder[c] for c in chars).decode('utf-8', errors='replace')
      texts.append(text.replace('</w>', ' ').rstrip(' '))
    return texts


def _bytes_to_unicode():
  """CLIP's (GPT-2's) byte -> printable character map: printable Latin-1 bytes map to themselves."""
  bs = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
        *range(ord('®'), ord('ÿ') + 1)]
  others = [b for b in range(256) if b not in bs]  # -> chr(256), chr(257), ...
  return dict(zip(bs + others, map(chr, bs + list(range(256, 256 + len(others))))))
