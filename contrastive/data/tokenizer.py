"""A SentencePiece subword tokenizer for the text tower: trained on the training texts, fixed-length ids.

Kudo & Richardson 2018 (SentencePiece), Kudo 2018 (unigram LM); `byte_fallback` (as in Llama's
tokenizers) spells any character the vocabulary lacks as its UTF-8 bytes, so every string round-trips.
Special ids: 0 pad, 1 unk (unused with byte fallback), 2 EOS; no BOS. The default normalization is
'identity' with whitespace kept, so `decode(encode(x)) == x` exactly.

    tok = train(train_texts, vocab_size=2048)
    ids, num_truncated = tok.encode(texts, length=32)   # [N, 32] int32: pieces, EOS, then pad (0)
    tok.save('workdir/tokenizer.model'); tok = Tokenizer.load('workdir/tokenizer.model')

Training is deterministic: one thread, every sentence used (no sampling) and a fixed seed for
SentencePiece's random generator; the same texts and options give the same model bytes.
"""

import io
import os

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, EOS_ID = 0, 1, 2


def _as_str(text):
  return text.decode('utf-8') if isinstance(text, (bytes, np.bytes_)) else str(text)


def fixed_length(pieces, length, *, eos_id, pad_id, sot_id=None, per_row=False):
  """N lists of piece ids -> (ids [N, L] int32, texts cut): each row [SOT,] pieces, EOS, then
  pad_id to L; a text with more pieces than fit keeps its first ones and ends in EOS. The
  count of texts cut is an int, or with per_row [N] int32 flags. Every tokenizer's layout
  (this SentencePiece one, clip_tokenizer's, big_vision_tokenizer's)."""
  if length < 2:
    needs = 'a piece and EOS' if sot_id is None else 'SOT and EOT'
    raise ValueError(f'length must be >= 2 (room for {needs}), got {length}.')
  first = 0 if sot_id is None else 1
  room = length - first - 1  # pieces that fit
  ids = np.full((len(pieces), length), pad_id, np.int32)
  truncated = np.zeros(len(pieces), np.int32)
  for n, (row, p) in enumerate(zip(ids, pieces)):
    truncated[n] = len(p) > room
    p = p[:room]
    if sot_id is not None:
      row[0] = sot_id
    row[first:first + len(p)], row[first + len(p)] = p, eos_id
  return ids, (truncated if per_row else int(truncated.sum()))


def train(texts, vocab_size, *, model_type='unigram', seed=0, normalization='identity',
          character_coverage=1.0, **trainer_options):
  """Trains a tokenizer on `texts` (str or UTF-8 bytes; e.g. a dataset's training texts only).

  Args:
    texts: iterable of strings, one sentence each.
    vocab_size: size of the vocabulary, specials and the 256 byte pieces included (> 259 + the number
      of distinct characters kept); SentencePiece raises if the texts cannot fill it.
    model_type: 'unigram' or 'bpe'.
    seed: SentencePiece's random seed (set before training; training runs on one thread).
    normalization: a SentencePiece rule ('identity': lossless; 'nmt_nfkc': NFKC).
    character_coverage: share of characters given their own piece; the rest fall back to bytes.
    **trainer_options: any other SentencePieceTrainer option (e.g. `hard_vocab_limit=False`).

  Returns:
    Tokenizer.
  """
  texts = [_as_str(t) for t in texts]
  if not texts:
    raise ValueError('train() needs at least one text.')
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  options = dict(
      model_type=model_type, vocab_size=vocab_size, byte_fallback=True,
      character_coverage=character_coverage, normalization_rule_name=normalization,
      remove_extra_whitespaces=normalization != 'identity', split_digits=True,
      pad_id=PAD_ID, unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1, num_threads=1,
      input_sentence_size=0, shuffle_input_sentence=False,
      max_sentence_length=max(4192, max(len(t.encode('utf-8')) for t in texts)),
      minloglevel=2)
  options.update(trainer_options)
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, **options)
  return Tokenizer(model.getvalue())


class Tokenizer:
  """A trained SentencePiece model with fixed-length batch encoding."""

  def __init__(self, model_proto):
    """model_proto: the bytes of a .model file (`train`, `load` or `model_proto` of another one)."""
    self.model_proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    if (self._sp.pad_id(), self._sp.eos_id()) != (PAD_ID, EOS_ID):
      raise ValueError(f'Expected pad id {PAD_ID} and EOS id {EOS_ID}, the model has '
                       f'{self._sp.pad_id()} and {self._sp.eos_id()}.')

  def __reduce__(self):  # pickled as its model bytes (grain worker processes)
    return Tokenizer, (self.model_proto,)

  @classmethod
  def load(cls, path):
    """Reads a .model file written by `save` (or by SentencePiece)."""
    with open(path, 'rb') as f:
      return cls(f.read())

  def save(self, path):
    """Writes the model (a SentencePiece .model file, readable by any SentencePiece library)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(self.model_proto)

  @property
  def vocab_size(self):
    return self._sp.get_piece_size()

  pad_id, eos_id = PAD_ID, EOS_ID

  def pieces(self, text):
    """The subword pieces of one text (for inspection), e.g. ['▁wav', 'ing', '▁hand']."""
    return self._sp.encode(_as_str(text), out_type=str)

  def encode(self, texts, length, *, per_row=False):
    """Fixed-length ids of a batch of texts.

    Each row is the text's pieces, then EOS, then PAD_ID up to `length`. A text of more than
    `length - 1` pieces keeps its first `length - 1`, so EOS is always present (the position a text
    tower can pool at: the first EOS in the row).

    Args:
      texts: N strings (str or UTF-8 bytes).
      length: L, the row length (>= 2).

    Returns:
      (ids [N, L] int32, num_truncated): the number of texts that lost pieces (with per_row:
      [N] int32, 1 for each text that lost pieces).
    """
    # One thread: no pool started per call (~3 ms), and the caller's process is one core.
    pieces = self._sp.encode([_as_str(t) for t in texts], out_type=int, num_threads=1)
    return fixed_length(pieces, length, eos_id=EOS_ID, pad_id=PAD_ID, per_row=per_row)

  def decode(self, ids):
    """ids [N, L] (or [L]) -> N strings (or one): pieces up to the first EOS, PAD_ID dropped."""
    ids = np.asarray(ids)
    if ids.ndim == 1:
      return self.decode(ids[None])[0]
    rows = []
    for row in ids.tolist():
      row = row[:row.index(EOS_ID)] if EOS_ID in row else row
      rows.append([i for i in row if i != PAD_ID])
    return self._sp.decode(rows)
