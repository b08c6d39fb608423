"""What a converted dataset was built from, so a changed or missing source is noticed.

A local builder (e.g. Fashion-MNIST from IDX files) converts its source files once into
array_record shards. Without a record, later runs keep reading that copy even when the config
points at other files, or the files were fixed or removed. `fingerprint` describes the source
files (absolute path, size, SHA-256); it is stored as `source.json` beside the shards when they
are written, and `pipeline.get_source` compares it on every use: a different source rebuilds
the copy, a missing one is an error naming the package or path.
"""

import hashlib
import json
import os

RECORD_NAME = 'source.json'
_CACHE = {}  # (path, size, mtime_ns) -> sha256: each file is hashed once per process


def _sha256(path):
  stat = os.stat(path)
  key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
  if key not in _CACHE:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
      for chunk in iter(lambda: f.read(1 << 20), b''):
        digest.update(chunk)
    _CACHE[key] = digest.hexdigest()
  return _CACHE[key]


def fingerprint(paths):
  """{absolute path: {'size', 'sha256'}} of the source files (~0.1 s for Fashion-MNIST)."""
  return {os.path.abspath(p): dict(size=os.path.getsize(p), sha256=_sha256(p))
          for p in sorted(paths)}


def recorded(data_dir):
  """The fingerprint stored in a prepared dataset's folder, or None (none, or unreadable)."""
  try:
    with open(os.path.join(data_dir, RECORD_NAME), encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def record(data_dir, source):
  """Writes `source` (a fingerprint) as the dataset's source record."""
  path = os.path.join(data_dir, RECORD_NAME)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(source, f, indent=1, sort_keys=True)
  os.replace(path + '.tmp', path)


def describe_change(old, new):
  """One line saying how two fingerprints differ (for the rebuild message)."""
  if old is None:
    return 'no record of its source (converted by an older version)'
  if set(old) != set(new):
    return f'source files {sorted(old)} -> {sorted(new)}'
  changed = [p for p in new if old[p] != new[p]]
  return f'changed since conversion: {changed}'
