"""The tokenizer of a workdir, of either kind: SentencePiece (`tokenizer.py`: trained here, or a
big_vision `.model`) or CLIP's byte-level BPE (`clip_tokenizer.py`: open_clip's vocabulary).

config.tokenizer.kind ('sentencepiece' when absent) says which file the workdir holds:

    tokenizer.model            SentencePiece
    tokenizer_clip_bpe.txt.gz  CLIP's BPE vocabulary (49,408 ids, 77 tokens)
"""

import os

from contrastive.data import tokenizer as sentencepiece_lib

FILES = {'sentencepiece': 'tokenizer.model', 'clip_bpe': 'tokenizer_clip_bpe.txt.gz'}
CONTEXT = {'clip_bpe': 77}


class TokenizerFileError(ValueError):
  """A tokenizer file is missing or of another kind."""


def _clip():
  from contrastive.data import clip_tokenizer  # pylint: disable=g-import-not-at-top
  return clip_tokenizer.ClipTokenizer


def load_file(kind, path=None):
  """(tokenizer, config.tokenizer dict) of a tokenizer file of `kind` (CLIP's BPE: the bundled
  vocabulary when `path` is None); one-line TokenizerFileError for a missing file or a file of
  another kind."""
  if kind not in FILES:
    raise TokenizerFileError(f'unknown tokenizer kind {kind!r}; choose one of {tuple(FILES)}.')
  if path is not None and not os.path.isfile(path):
    raise TokenizerFileError(f'tokenizer file {path!r} not found.')
  try:
    if kind == 'clip_bpe':
      tok = _clip().load(path)
    else:
      if path is None:
        raise TokenizerFileError('a SentencePiece tokenizer needs its .model file (--tokenizer).')
      tok = sentencepiece_lib.Tokenizer.load(path)
  except TokenizerFileError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise TokenizerFileError(f'{path!r} is not a {kind} tokenizer file ({type(e).__name__}: '
                             f'{str(e)[:150]}).') from None
  cfg = dict(kind=kind, vocab_size=int(tok.vocab_size), context=CONTEXT.get(kind, 64))
  return tok, cfg


def save_to_workdir(tok, workdir):
  """Writes `tok` as its kind's file in `workdir`."""
  kind = 'sentencepiece' if isinstance(tok, sentencepiece_lib.Tokenizer) else 'clip_bpe'
  tok.save(os.path.join(workdir, FILES[kind]))


def load_workdir(workdir, tokenizer_cfg):
  """The tokenizer a workdir's run used (config.tokenizer: its kind)."""
  kind = (tokenizer_cfg or {}).get('kind', 'sentencepiece')
  return load_file(kind, os.path.join(workdir, FILES[kind]))[0]
