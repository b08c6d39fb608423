"""A JSON-lines file of pairs, read and checked before any work (`pairs.JsonlPairs` converts it).

One record per line, all of one kind:

    {"image": "imgs/cat.png", "text": "a photo of a cat"}        # kind 'image_text'
    {"text_a": "dog", "text_b": "a domesticated canid"}          # kind 'text_text'

Image paths are absolute or relative to the .jsonl file's folder. `read` checks every line and
raises `PairsDataError` naming FILE:LINE for the first bad one: not UTF-8, not a JSON object,
missing keys, a text or "image" that is not a string (null, a number, a list), a missing image
file (an image that does not decode is named at conversion, `pairs.JsonlPairs`).

Splits. An optional "split" key (a string) names the record's split; where some records carry
one, the others are 'train'. Where none does, `test_fraction` (0.1 by default) of the records
are 'test' by a hash of the image path (image_text) or text a (text_text), the same on every
machine (`in_test_split`): all the records of one image or text land on the same side.

Group ids. A record's group id (field 'id' of the converted rows) is the line index of the
first record with its image (image_text) or its text a (text_text): such rows are not each
other's negatives in the loss, and are one item in retrieval. Exact duplicate pairs are counted
(`Records.describe`).

    records = read('pairs.jsonl')
    records.kind -> 'image_text'; records.rows -> (Row(line, split, first, second, group), ...)
    check_counts(records, batch_size=32, eval_split='test')   # too few rows: PairsDataError
"""

import dataclasses
import hashlib
import json
import os

from contrastive.data import freshness
from contrastive.data.fashion_mnist import MissingDatasetError

KINDS = {'image_text': ('image', 'text'), 'text_text': ('text_a', 'text_b')}
TEST_FRACTION = 0.1  # held out by hash where no record has a "split"
MIN_EVAL_ITEMS = 2  # distinct items per side of the evaluation split (retrieval ranks them)
_CACHE = {}  # (path, size, mtime_ns, kind, test_fraction) -> Records


class PairsDataError(ValueError):
  """A JSON-lines file of pairs cannot be trained on; the message names the file (and line)."""


def in_test_split(key, test_fraction):
  """Deterministic hash split: True for about `test_fraction` of keys, the same on every run and
  machine (SHA-256 of the UTF-8 key, not Python's salted `hash`)."""
  digest = hashlib.sha256(key.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') < test_fraction * 2.0**64


@dataclasses.dataclass(frozen=True)
class Row:
  line: int  # 0-based line index in the file
  split: str
  first: str  # the image path as written, or text a
  second: str  # the text (b)
  group: int  # line index of the first record with this image / text a


@dataclasses.dataclass(frozen=True)
class Records:
  """The checked records of a file (`read`)."""
  path: str
  kind: str
  rows: tuple
  hashed: bool  # no record has a "split": 'test' is the hash split of test_fraction
  test_fraction: float
  duplicates: int  # records repeating an earlier record's pair exactly
  images: tuple  # absolute paths of the distinct images (image_text)

  def counts(self):
    """{split: number of records}."""
    out = {}
    for row in self.rows:
      out[row.split] = out.get(row.split, 0) + 1
    return dict(sorted(out.items()))

  def describe(self):
    """One line: the records per split, how the split was made, and the duplicates."""
    counts = ', '.join(f'{n} {s}' for s, n in self.counts().items())
    how = (f'no "split" keys: {self.test_fraction:.0%} held out by a hash of each '
           f'{"image path" if self.kind == "image_text" else "text a"}'
           if self.hashed else 'splits from the "split" keys')
    dup = (f'; {self.duplicates} duplicate record(s) repeat an earlier pair and share its id '
           '(not each other\'s negatives)' if self.duplicates else '')
    return f'{self.path}: {len(self.rows)} {self.kind} records ({counts}; {how}){dup}.'


def _fail(path, n, message):
  raise PairsDataError(f'{path}:{n + 1}: {message}')


def _record(path, n, raw, first_line):
  """The JSON object of line n (bytes), or PairsDataError."""
  try:
    line = raw.decode('utf-8-sig' if first_line else 'utf-8')
  except UnicodeDecodeError as e:
    _fail(path, n, f'not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); '
          'save the file as UTF-8.')
  if not line.strip():
    return None
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    _fail(path, n, f'not JSON ({e}).')
  if not isinstance(record, dict):
    _fail(path, n, f'expected a JSON object with keys {list(KINDS.values())}, found '
          f'{type(record).__name__} {line.strip()[:60]}.')
  return record


def _kind_of(path, n, record, kind):
  kind = kind or next((k for k, keys in KINDS.items() if set(keys) <= set(record)), None)
  if kind not in KINDS or not set(KINDS[kind]) <= set(record):
    _fail(path, n, f'expected keys {KINDS.get(kind) or list(KINDS.values())}, found '
          f'{sorted(record)}.')
  for key in KINDS[kind] + (('split',) if 'split' in record else ()):
    value = record[key]
    required = key in ('image', 'split')  # a text may be empty (EOS alone)
    if not isinstance(value, str) or (required and not value):
      _fail(path, n, f'"{key}" must be a {"non-empty " * required}string, found '
            f'{json.dumps(value)[:60]}.')
  return kind


def read(path, *, kind=None, test_fraction=TEST_FRACTION):
  """Reads and checks every record of `path` (see the module docstring); cached per file
  version. Raises MissingDatasetError for an absent file, PairsDataError for a bad one."""
  if not path or not os.path.isfile(path):
    raise MissingDatasetError(f'JSON-lines file {path!r} not found.')
  if not 0 <= test_fraction < 1:
    raise PairsDataError(f'test_fraction={test_fraction} must be in [0, 1).')
  stat = os.stat(path)
  key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, kind, test_fraction)
  if key not in _CACHE:
    _CACHE.clear()
    _CACHE[key] = _read(path, kind, test_fraction)
  return _CACHE[key]


def _read(path, kind, test_fraction):
  root = os.path.dirname(os.path.abspath(path))
  parsed, seen_pairs, first_of, images = [], set(), {}, {}
  duplicates, any_split = 0, False
  with open(path, 'rb') as f:
    for n, raw in enumerate(f):
      record = _record(path, n, raw, n == 0)
      if record is None:
        continue
      kind = _kind_of(path, n, record, kind)
      first, second = (record[k] for k in KINDS[kind])
      if kind == 'image_text':
        image = os.path.normpath(os.path.join(root, first))
        if image not in images and not os.path.isfile(image):
          _fail(path, n, f'image {first!r} not found ({image}).')
        images.setdefault(image, None)
        key = os.path.relpath(image, root)  # the same on any machine, wherever the folder is
      else:
        key = first
      duplicates += (key, second) in seen_pairs
      seen_pairs.add((key, second))
      any_split = any_split or 'split' in record
      parsed.append((n, record.get('split'), first, second, first_of.setdefault(key, n), key))
  if not parsed:
    raise PairsDataError(f'{path}: holds no records.')
  rows = tuple(Row(n, split or 'train', first, second, group) if any_split else
               Row(n, 'test' if in_test_split(key, test_fraction) else 'train', first, second,
                   group)
               for n, split, first, second, group, key in parsed)
  return Records(path=path, kind=kind, rows=rows, hashed=not any_split,
                 test_fraction=test_fraction, duplicates=duplicates, images=tuple(images))


def check_counts(records, *, batch_size=None, eval_split=None):
  """Raises PairsDataError (one line: the counts and what to do) when split 'train' has fewer
  records than `batch_size`, or `eval_split` fewer than MIN_EVAL_ITEMS distinct items a side.
  None skips a check."""
  counts = records.counts()
  found = ', '.join(f'{s!r}: {n}' for s, n in counts.items())
  train = counts.get('train', 0)
  if batch_size and not train:
    raise PairsDataError(f'{records.path}: no training records (split \'train\'; the file has '
                         f'{found}): give records "split": "train", or no "split" keys at all.')
  if batch_size and train < batch_size:
    raise PairsDataError(
        f'{records.path}: {train} training records (split \'train\'; the file has {found}), '
        f'fewer than one batch (config.batch_size={batch_size}): add records or lower '
        f'--config.batch_size to at most {train}.')
  if eval_split:
    rows = [r for r in records.rows if r.split == eval_split]
    a, b = len({r.group for r in rows}), len({r.second for r in rows})
    if min(a, b) < MIN_EVAL_ITEMS:
      how = (f'raise --config.dataset.test_fraction (now {records.test_fraction}), '
             if records.hashed else f'mark more records "split": "{eval_split}", ')
      raise PairsDataError(
          f'{records.path}: evaluation split {eval_split!r} (config.eval.split) has {len(rows)} '
          f'record(s), {a} distinct side-a item(s) and {b} distinct text(s); retrieval needs at '
          f'least {MIN_EVAL_ITEMS} of each (the file has {found}): {how}add records, or set '
          '--config.eval.split to another split of the file.')


def fingerprint(records):
  """What a conversion of `records` depends on: the file (absolute path, size, mtime, SHA-256),
  its images (count and a digest of their paths, sizes and mtimes: no image is re-read) and the
  test fraction. Compare with `same_source`."""
  path = os.path.abspath(records.path)
  stat = os.stat(path)
  digest = hashlib.sha256()
  for image in records.images:
    s = os.stat(image)
    digest.update(f'{image}\0{s.st_size}\0{s.st_mtime_ns}\n'.encode('utf-8', 'surrogateescape'))
  return dict(path=path, size=stat.st_size, mtime_ns=stat.st_mtime_ns,
              sha256=freshness.fingerprint([path])[path]['sha256'],
              images=dict(count=len(records.images), digest=digest.hexdigest()),
              test_fraction=records.test_fraction)


_SAME = ('path', 'size', 'sha256', 'images', 'test_fraction')  # an mtime alone is no change


def same_source(old, new):
  """Whether two fingerprints describe the same data (a touched, unchanged file is the same)."""
  return bool(old) and all(old.get(k) == new.get(k) for k in _SAME)


def describe_change(old, new):
  """How fingerprint `new` differs from `old` (a phrase)."""
  if not old:
    return 'no record of its source (converted by an older version)'
  changes = []
  if (old.get('size'), old.get('sha256')) != (new['size'], new['sha256']):
    changes.append(f'its content changed ({old.get("size")} -> {new["size"]} bytes, '
                   'another SHA-256)')
  if old.get('images') != new['images']:
    changes.append(f'its images changed ({old.get("images", {}).get("count")} -> '
                   f'{new["images"]["count"]}, or their sizes or modification times)')
  if old.get('test_fraction') != new['test_fraction']:
    changes.append(f'test_fraction {old.get("test_fraction")} -> {new["test_fraction"]}')
  if old.get('path') != new['path']:
    changes.append(f'another file ({old.get("path")})')
  return '; '.join(changes)
