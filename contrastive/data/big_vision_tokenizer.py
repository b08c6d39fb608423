"""big_vision's text layout on a SentencePiece model (SigLIP's c4_en / mc4, SigLIP 2's Gemma):
what its `tokenize(max_len=L, eos='sticky', pad_value=p)` op (after `lower`) gives.

    tok = BigVisionTokenizer.load('c4_en.model', pad_id=1)
    ids, num_truncated = tok.encode(['A photo of a cat'], 64)
    # [N, 64] int32: 'a photo of a cat' pieces, EOS, then pad_id to the end; a text of more
    # than 63 pieces keeps its first 63 and EOS ('sticky': the last id is always EOS)

SigLIP pads with 1 (its models' EOS), SigLIP 2 with 0; its text tower attends to every
position and pools the last (models/text.py `pool='last'`, `pad_mask=False`), so the padding
id is part of the model's input.
"""

import os

import numpy as np
import sentencepiece as spm

from contrastive.data.tokenizer import _as_str  # pylint: disable=protected-access


class BigVisionTokenizer:
  """A SentencePiece model with big_vision's sticky-EOS layout (see the module docstring)."""

  def __init__(self, model_proto, *, pad_id, lower=True):
    self.model_proto, self.pad_id, self.lower = bytes(model_proto), int(pad_id), bool(lower)
    self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    self.eos_id = self._sp.eos_id()
    if self.eos_id < 0:
      raise ValueError('the SentencePiece model has no EOS piece (big_vision appends one).')

  def __reduce__(self):
    return BigVisionTokenizer, (self.model_proto,), dict(pad_id=self.pad_id, lower=self.lower)

  def __setstate__(self, state):
    self.__init__(self.model_proto, **state)

  @classmethod
  def load(cls, path, *, pad_id, lower=True):
    with open(path, 'rb') as f:
      return cls(f.read(), pad_id=pad_id, lower=lower)

  def save(self, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(self.model_proto)

  @property
  def vocab_size(self):
    return self._sp.get_piece_size()

  def pieces(self, text):
    text = _as_str(text)
    return self._sp.encode(text.lower() if self.lower else text, out_type=str)

  def encode(self, texts, length, *, per_row=False):
    """(ids [N, L] int32, number of texts cut (with per_row: [N] flags)), as the module doc."""
    if length < 2:
      raise ValueError(f'length must be >= 2 (room for a piece and EOS), got {length}.')
    texts = [_as_str(t) for t in texts]
    pieces = self._sp.encode([t.lower() if self.lower else t for t in texts], out_type=int,
                             num_threads=1)
    ids = np.full((len(pieces), length), self.pad_id, np.int32)
    truncated = np.zeros(len(pieces), np.int32)
    for n, (row, p) in enumerate(zip(ids, pieces)):
      truncated[n] = len(p) > length - 1
      p = p[:length - 1]
      row[:len(p)], row[len(p)] = p, self.eos_id
    return ids, (truncated if per_row else int(truncated.sum()))

  def decode(self, ids):
    """ids [N, L] (or [L]) -> N strings (or one): the pieces before the first EOS."""
    ids = np.asarray(ids)
    if ids.ndim == 1:
      return self.decode(ids[None])[0]
    rows = [row[:row.index(self.eos_id)] if self.eos_id in row else row for row in ids.tolist()]
    return self._sp.decode(rows)
