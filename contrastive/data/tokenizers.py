"""The tokenizer of a workdir, of any kind: SentencePiece trained here (`tokenizer.py`), CLIP's
byte-level BPE (`clip_tokenizer.py`: open_clip's vocabulary) or a big_vision SentencePiece
model with its sticky-EOS layout (`big_vision_tokenizer.py`).

config.tokenizer.kind ('sentencepiece' when absent) says which file the workdir holds:

    tokenizer.model            SentencePiece trained here
    tokenizer_clip_bpe.txt.gz  CLIP's BPE vocabulary (49,408 ids, 77 tokens)
    tokenizer_big_vision.model big_vision's SentencePiece (config.tokenizer.pad_id, lower)
"""

import os

from contrastive.data import tokenizer as sentencepiece_lib

FILES = {'sentencepiece': 'tokenizer.model', 'clip_bpe': 'tokenizer_clip_bpe.txt.gz',
         'big_vision_spm': 'tokenizer_big_vision.model'}


class TokenizerFileError(ValueError):
  """A tokenizer file is missing or of another kind."""


def _clip():
  from contrastive.data import clip_tokenizer  # pylint: disable=g-import-not-at-top
  return clip_tokenizer.ClipTokenizer


def load_file(kind, path=None, cfg=None):
  """(tokenizer, config.tokenizer dict) of a tokenizer file of `kind` (CLIP's BPE: the bundled
  vocabulary when `path` is None); `cfg`: config.tokenizer's fields (context; big_vision's
  pad_id and lower). One-line TokenizerFileError for a missing file or a file of another
  kind."""
  cfg = dict(cfg or {})
  if kind not in FILES:
    raise TokenizerFileError(f'unknown tokenizer kind {kind!r}; choose one of {tuple(FILES)}.')
  if path is not None and not os.path.isfile(path):
    raise TokenizerFileError(f'tokenizer file {path!r} not found.')
  try:
    if kind == 'clip_bpe':
      tok = _clip().load(path)
    elif kind == 'big_vision_spm':
      from contrastive.data import big_vision_tokenizer  # pylint: disable=g-import-not-at-top
      if path is None:
        raise TokenizerFileError('a big_vision model needs its SentencePiece .model file '
                                 '(--tokenizer).')
      tok = big_vision_tokenizer.BigVisionTokenizer.load(
          path, pad_id=cfg.get('pad_id', 1), lower=cfg.get('lower', True))
    else:
      if path is None:
        raise TokenizerFileError('a SentencePiece tokenizer needs its .model file (--tokenizer).')
      tok = sentencepiece_lib.Tokenizer.load(path)
  except TokenizerFileError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise TokenizerFileError(f'{path!r} is not a {kind} tokenizer file ({type(e).__name__}: '
                             f'{str(e)[:150]}).') from None
  return tok, dict(cfg, kind=kind, vocab_size=int(tok.vocab_size))


def save_to_workdir(tok, workdir):
  """Writes `tok` as its kind's file in `workdir`."""
  kind = {'Tokenizer': 'sentencepiece', 'ClipTokenizer': 'clip_bpe',
          'BigVisionTokenizer': 'big_vision_spm'}[type(tok).__name__]
  tok.save(os.path.join(workdir, FILES[kind]))


def load_workdir(workdir, tokenizer_cfg):
  """The tokenizer a workdir's run used (config.tokenizer: its kind)."""
  cfg = dict(tokenizer_cfg or {})
  kind = cfg.get('kind', 'sentencepiece')
  return load_file(kind, os.path.join(workdir, FILES[kind]), cfg)[0]
