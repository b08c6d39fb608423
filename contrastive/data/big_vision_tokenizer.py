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

import numpy as np
import sentencepiece as spm

from contrastive.data import tokenizer as tokenizer_lib
from contrastive.data.tokenizer import _as_str  # pylint: disable=protected-access


class BigVisionTokenizer(tokenizer_lib.Tokenizer):
  """A SentencePiece model with big_vision's sticky-EOS layout (see the module docstring);
  `save` and `vocab_size` as the SentencePiece tokenizer's, whose fixed ids it does not need."""

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

  def pieces(self, text):
    text = _as_str(text)
    return self._sp.encode(text.lower() if self.lower else text, out_type=str)

  def encode(self, texts, length, *, per_row=False):
    """(ids [N, L] int32, number of texts cut (with per_row: [N] flags)), as the module doc."""
    texts = [_as_str(t) for t in texts]
    pieces = self._sp.encode([t.lower() if self.lower else t for t in texts], out_type=int,
                             num_threads=1)
    return tokenizer_lib.fixed_length(pieces, length, eos_id=self.eos_id, pad_id=self.pad_id,
                                      per_row=per_row)

  def decode(self, ids):
    """ids [N, L] (or [L]) -> N strings (or one): the pieces before the first EOS."""
    ids = np.asarray(ids)
    if ids.ndim == 1:
      return self.decode(ids[None])[0]
    rows = [row[:row.index(self.eos_id)] if self.eos_id in row else row for row in ids.tolist()]
    return self._sp.decode(rows)
