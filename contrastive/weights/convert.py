"""Checkpoint tensors <-> the two-tower parameter tree, checked tensor by tensor.

A format module (`open_clip_format`, ...) lists its tensors (`Tensor`: key, our parameter
paths, conversions). `to_params` fills the model's parameters from a state dict, refusing, in
one line, the first tensor (in the checkpoint's order) whose shape differs from what the
architecture needs (both shapes named), an unexpected tensor and a missing one. `to_state`
is the inverse (export).
"""

import numpy as np


class WeightsError(ValueError):
  """A checkpoint does not fit the architecture, or a file is of the wrong kind."""


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _paths(tree, prefix=()):
  if not isinstance(tree, dict):
    return [prefix]
  return [p for k in tree for p in _paths(tree[k], prefix + (k,))]


def to_params(tensors, state, abstract, *, zero=(), identity=(), skip=(),
              source='the checkpoint'):
  """Our parameter tree (float32 numpy) from `state` ({key: array}, in the file's order).

  tensors: the format's [Tensor]; abstract: the model's params (anything with .shape);
  zero / identity: our paths without a counterpart, set to 0 / the identity matrix (a square
  projection the format does not have); skip: key suffixes to ignore (buffers).
  """
  spec = {t.key: t for t in tensors}
  params = {}
  for key, value in state.items():
    if key.endswith(tuple(skip)):
      continue
    if key not in spec:
      raise WeightsError(f'{source} has a tensor the architecture does not: {key!r} '
                         f'{list(np.shape(value))}.')
    t = spec[key]
    want = [tuple(_get(abstract, p).shape) for p in t.paths]
    expected = tuple(t.to_theirs([np.zeros(s, np.float32) for s in want]).shape)
    if tuple(np.shape(value)) != expected:
      raise WeightsError(f'{source}: tensor {key!r} has shape {list(np.shape(value))}, the '
                         f'architecture needs {list(expected)}.')
    for path, array in zip(t.paths, t.to_ours(np.asarray(value, np.float32))):
      _set(params, path, np.array(array, np.float32, order='C'))
  missing = [t.key for t in tensors if t.key not in state]
  if missing:
    raise WeightsError(f'{source} lacks {len(missing)} tensor(s) of the architecture, e.g. '
                       f'{missing[:3]}.')
  for path in zero:
    _set(params, path, np.zeros(_get(abstract, path).shape, np.float32))
  for path in identity:
    shape = _get(abstract, path).shape
    if len(shape) != 2 or shape[0] != shape[1]:
      raise WeightsError(f'{"/".join(path)} {list(shape)} must be square to be the identity: '
                         'set embed_dim to the tower\'s width.')
    _set(params, path, np.eye(shape[0], dtype=np.float32))
  unfilled = [p for p in _paths(abstract) if not _has(params, p)]
  if unfilled:
    raise WeightsError(f'the architecture has parameters no tensor fills: {unfilled[:3]}.')
  return params


def _has(tree, path):
  try:
    _get(tree, path)
    return True
  except (KeyError, TypeError):
    return False


def to_state(tensors, params, *, zero=(), identity=()):
  """{key: float32 array} in the format's order from our parameter tree; raises WeightsError
  if a parameter the format cannot hold is not 0 (`zero`) or the identity (`identity`)."""
  checks = [(p, 'zero', np.zeros_like) for p in zero] + [
      (p, 'the identity', lambda x: np.eye(len(x), dtype=x.dtype)) for p in identity]
  for path, name, want in checks:
    value = np.asarray(_get(params, path))
    if not np.array_equal(value, want(value)):
      raise WeightsError(f'parameter {"/".join(path)} is not {name}: the format has no place '
                         'for it.')
  return {t.key: np.array(t.to_theirs([np.asarray(_get(params, p), np.float32)
                                         for p in t.paths]), order='C') for t in tensors}
