"""Webdataset tar shards (img2dataset's output): the shard list of a pattern, and a per-shard
index of each sample's members so that any sample is read by offset (random access).

A shard `00000.tar` holds samples as consecutive members named KEY.EXT (`000001.jpg`,
`000001.txt`, `000001.json`); a sample is the members sharing a KEY (the name up to the first
dot of the file name, its folder included), as in the webdataset package. The index of a shard
is one structured numpy row per sample (`RECORD`): the image member chosen by `image_keys`
(the first extension present), the text member, a status and a group id. It is built once
(tar headers and the small text/JSON members only; images are never read) and cached as an
.npy (memory-mapped when read: the page cache shares it between worker processes) with a
JSON record of the shard's size and mtime; a shard whose size or mtime changed is re-indexed.

We index the tar ourselves instead of using webdataset's `wids`: wids needs a shard list with
sample counts written beforehand and groups samples only when it reads them, while this index
also records, once per shard, which samples cannot be used (`REASONS`) so that the loader can
skip them deterministically, and it has no dependency beyond the standard `tarfile`.
"""

import glob
import hashlib
import json
import os
import re
import tarfile

import numpy as np

from contrastive.config_lib import ConfigError
from contrastive.data.fashion_mnist import MissingDatasetError

VERSION = 1
OK, NO_IMAGE, NO_TEXT, EMPTY_TEXT, TRUNCATED, BAD_IMAGE = range(6)
REASONS = ('ok', 'no image member', 'no text member', 'empty caption', 'truncated member',
           'undecodable image')  # BAD_IMAGE: found when decoded (webdataset.py), not here
RECORD = [('image_offset', np.int64), ('image_size', np.int64), ('image_ext', np.int8),
          ('text_offset', np.int64), ('text_size', np.int64), ('status', np.int8),
          ('group', np.int32)]
_BRACE = re.compile(r'\{(\d+)\.\.(\d+)\}')
_KEY = re.compile(r'^((?:.*/)?[^./]+)\.([^/]*)$')


def _expand_braces(pattern):
  """'d/{000..002}.tar' -> ['d/000.tar', 'd/001.tar', 'd/002.tar'] (zero padding kept;
  several ranges multiply)."""
  m = _BRACE.search(pattern)
  if not m:
    return [pattern]
  lo, hi = m.group(1), m.group(2)
  if int(hi) < int(lo):
    raise ConfigError(f'shard pattern {pattern!r}: range {{{lo}..{hi}}} is empty.')
  width = len(lo) if lo.startswith('0') else 0
  return [p for n in range(int(lo), int(hi) + 1)
          for p in _expand_braces(pattern[:m.start()] + str(n).zfill(width) + pattern[m.end():])]


def expand(pattern):
  """The shard paths of `pattern`: a brace pattern ('/data/cc/{00000..00331}.tar'), a glob,
  a text file of paths (one per line, not ending in .tar), a comma-separated string or a
  list of any of these. Raises MissingDatasetError if it matches no file or names a missing
  one (one line naming it), before anything is read."""
  if isinstance(pattern, (list, tuple)):
    paths = [p for item in pattern for p in expand(item)]
  elif not pattern or not str(pattern).strip():
    raise ConfigError('no shards given: set config.dataset.train_shards (a brace pattern, '
                      'a glob, a list or a file of paths).')
  elif ',' in pattern and not os.path.exists(pattern):
    paths = expand([p.strip() for p in pattern.split(',') if p.strip()])
  elif os.path.isfile(pattern) and not pattern.endswith('.tar'):
    with open(pattern, encoding='utf-8') as f:
      paths = [line.strip() for line in f if line.strip()]
    if not paths:
      raise MissingDatasetError(f'the shard list {pattern!r} names no shard.')
  elif glob.has_magic(pattern):
    paths = sorted(glob.glob(os.path.expanduser(pattern)))
    if not paths:
      raise MissingDatasetError(f'the shard pattern {pattern!r} matches no file.')
  else:
    paths = [os.path.expanduser(p) for p in _expand_braces(pattern)]
  for path in paths:
    if not os.path.isfile(path):
      raise MissingDatasetError(f'shard {path!r} not found (from {pattern!r}).')
    if not os.access(path, os.R_OK):
      raise MissingDatasetError(f'shard {path!r} is not readable.')
  return paths


def group_id(value):
  """A JSON value -> int32 id in [0, 2^31) (equal values, equal ids; distinct values collide
  with probability ~2^-31 per pair)."""
  digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode('utf-8')).digest()
  return int.from_bytes(digest[:4], 'big') & 0x7FFFFFFF


def _members(path):
  """[(name, data offset, size)] of the shard's files in tar order, and whether the archive
  ends in a truncated or unreadable header (the members before it are kept)."""
  members, broken_tail = [], False
  try:
    with tarfile.open(path, mode='r:') as tar:
      try:
        for m in tar:
          if m.isfile():
            members.append((m.name, m.offset_data, m.size))
      except (tarfile.TarError, EOFError):
        broken_tail = True
  except (tarfile.TarError, EOFError, OSError) as e:
    raise MissingDatasetError(f'shard {path!r} is not a readable tar file ({e}).') from None
  return members, broken_tail


def _read(f, offset, size):
  f.seek(offset)
  return f.read(size)


def build(path, image_keys, text_key, group_key=''):
  """The index of one shard: (records [n] RECORD, keys [n] str) in sample order."""
  size = os.path.getsize(path)
  members, broken_tail = _members(path)
  samples = {}
  for name, offset, length in members:
    m = _KEY.match(name)
    if m:
      samples.setdefault(m.group(1), {})[m.group(2).lower()] = (offset, length)
  records = np.zeros(len(samples), RECORD)
  last = next(reversed(samples), None)  # the sample a broken tail cuts
  with open(path, 'rb') as f:
    for row, (key, files) in zip(records, samples.items()):
      image_ext = next((k for k, ext in enumerate(image_keys) if ext in files), -1)
      row['group'] = group_id(key)
      if image_ext >= 0:
        row['image_offset'], row['image_size'] = files[image_keys[image_ext]]
        row['image_ext'] = image_ext
      if text_key in files:
        row['text_offset'], row['text_size'] = files[text_key]
      ends = [o + n for o, n in files.values()]
      if max(ends) > size or (broken_tail and key == last):
        row['status'] = TRUNCATED
      elif image_ext < 0:
        row['status'] = NO_IMAGE
      elif text_key not in files:
        row['status'] = NO_TEXT
      elif not _read(f, *files[text_key]).decode('utf-8', 'replace').strip():
        row['status'] = EMPTY_TEXT
      if group_key and 'json' in files and row['status'] != TRUNCATED:
        try:
          meta = json.loads(_read(f, *files['json']))
          if isinstance(meta, dict) and meta.get(group_key) is not None:
            row['group'] = group_id(meta[group_key])
        except ValueError:
          pass  # no group: the sample is its own group
  return records, list(samples)


def _cache_paths(path, index_dir, options):
  """(.npy, .json) of `path`'s index: beside the shard, or in `index_dir` (named by a hash of
  the shard's absolute path) when given or when the shard's folder is not writable."""
  tag = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]
  folder = os.path.dirname(os.path.abspath(path))
  name = os.path.basename(path)
  if index_dir or not os.access(folder, os.W_OK):
    folder = os.path.expanduser(index_dir or os.path.join('~', '.cache', 'contrastive',
                                                          'shard_index'))
    name = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16] + '-' + name
  base = os.path.join(folder, f'{name}.idx-{tag}')
  return base + '.npy', base + '.json'


def load(path, image_keys, text_key, group_key='', index_dir='', *, build_missing=True):
  """(records, meta) of shard `path`: its cached index if the shard's size and mtime are
  those it was built from, else built (and cached) now; records are memory-mapped. meta:
  {'size', 'mtime_ns', 'keys', 'num_samples', 'status_counts'}. None with
  build_missing=False when no current index exists."""
  options = dict(image_keys=list(image_keys), text_key=text_key, group_key=group_key,
                 version=VERSION)
  npy, meta_path = _cache_paths(path, index_dir, options)
  stat = os.stat(path)
  try:
    with open(meta_path, encoding='utf-8') as f:
      meta = json.load(f)
    if (meta['size'], meta['mtime_ns']) == (stat.st_size, stat.st_mtime_ns):
      return np.load(npy, mmap_mode='r'), meta
  except (OSError, ValueError, KeyError):
    pass
  if not build_missing:
    return None
  records, keys = build(path, list(image_keys), text_key, group_key)
  meta = dict(options, size=stat.st_size, mtime_ns=stat.st_mtime_ns, keys=keys,
              num_samples=len(records),
              status_counts=np.bincount(records['status'], minlength=len(REASONS)).tolist())
  os.makedirs(os.path.dirname(npy), exist_ok=True)
  pid = os.getpid()
  np.save(f'{npy}.{pid}.tmp.npy', records)
  os.replace(f'{npy}.{pid}.tmp.npy', npy)
  with open(f'{meta_path}.{pid}.tmp', 'w', encoding='utf-8') as f:
    json.dump(meta, f)
  os.replace(f'{meta_path}.{pid}.tmp', meta_path)  # last: the record says the .npy is whole
  return np.load(npy, mmap_mode='r'), meta
