"""Retrieval, zero-shot and alignment/uniformity metrics (contrastive/retrieval.py)
against plain NumPy re-derivations over the full N x M matrix, in float64 (tests/float64.py).

The references rank with a stable argsort on -score, so equal scores keep the lower key index
first: the rule the blockwise top-k documents. Ties are built exactly (integer-valued
embeddings, whose dot products are exact in any summation order, and duplicated keys).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive import parallel
from contrastive import retrieval
from tests import float64
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)

DEVICE_COUNTS = (1, 2, 8)


# ---- Independent NumPy references -------------------------------------------------------------


def np_topk(queries, keys, k):
  """Full [N, M] scores, stable argsort on -score: ties keep the lower key index first."""
  scores = queries @ keys.T
  order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return np.take_along_axis(scores, order, axis=1), order


def np_recall(queries, keys, query_group, key_group, ks):
  _, order = np_topk(queries, keys, keys.shape[0])
  match = key_group[order] == query_group[:, None]  # (N, M), ranked
  return {f'r@{k}': float(np.mean(match[:, :k].any(axis=1))) for k in ks}


def np_alignment(za, zb, alpha):
  return float(np.mean(np.linalg.norm(za - zb, axis=1) ** alpha))


def np_uniformity(z, t):
  n = z.shape[0]
  d2 = np.sum((z[:, None, :] - z[None, :, :]) ** 2, axis=-1)  # (N, N)
  off = ~np.eye(n, dtype=bool)
  return float(np.log(np.mean(np.exp(-t * d2[off]))))


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def mesh_of(n):
  assert jax.device_count() >= 8, 'tests/conftest.py should have set 8 CPU devices'
  return parallel.make_mesh([('data', -1)], devices=jax.devices()[:n])


def integer_embeddings(rng, n, d=4):
  """Entries in {-1, 0, 1}: exact integer dot products, many equal ones."""
  return rng.integers(-1, 2, size=(n, d)).astype(np.float64)


def duplicated_keys(rng, m=37, d=16):
  """Unit keys where rows 3, 20 and 36 are copies of row 3 and rows 9, 10 of row 9."""
  keys = unit(rng.normal(size=(m, d)))
  keys[[20, 36]] = keys[3]
  keys[10] = keys[9]
  return keys


# ---- Top-k ------------------------------------------------------------------------------------


@pytest.mark.parametrize('k,block_size', [(1, 5), (6, 5), (6, 8), (37, 16), (6, 64)])
def test_topk_matches_numpy_including_ties(k, block_size):
  rng = np.random.default_rng(k * 100 + block_size)
  # Integer-valued: equal scores everywhere, and zero keys (score 0 whatever the query).
  q, keys = integer_embeddings(rng, 11), integer_embeddings(rng, 37)
  keys[[2, 17, 30]] = 0.0
  q[0] = -1.0  # its score against every zero key is a (signed) zero
  scores, idx = retrieval.topk_retrieval(q, keys, k=k, block_size=block_size)
  ref_scores, ref_idx = np_topk(q, keys, k)
  assert idx.dtype == jnp.int32 and scores.dtype == jnp.float64
  np.testing.assert_array_equal(idx, ref_idx)
  float64.assert_close(scores, ref_scores)
  # Unit vectors with duplicated keys, some queries equal to a duplicated key.
  keys = duplicated_keys(rng)
  q = np.concatenate([unit(rng.normal(size=(9, 16))), keys[[3, 9, 36]]])
  scores, idx = retrieval.topk_retrieval(q, keys, k=k, block_size=block_size)
  ref_scores, ref_idx = np_topk(q, keys, k)
  np.testing.assert_array_equal(idx, ref_idx)
  float64.assert_close(scores, ref_scores)


def test_topk_ties_keep_lower_index():
  keys = np.array([[0., 1.], [1., 0.], [1., 0.], [0., -1.], [1., 0.]])
  _, idx = retrieval.topk_retrieval(np.array([[1., 0.]]), keys, k=4, block_size=2)
  np.testing.assert_array_equal(idx, [[1, 2, 4, 0]])  # three ties at 1, then 0 before 3 (0 > -1)
  # D = 1: the scores are signed zeros (-1 * 0 = -0.0), equal ties all the same.
  keys = np.array([[0.], [-1.], [-0.], [0.], [1.]])
  _, idx = retrieval.topk_retrieval(np.array([[-1.], [1.]]), keys, k=5, block_size=2)
  np.testing.assert_array_equal(idx, [[1, 0, 2, 3, 4], [4, 0, 2, 3, 1]])
  np.testing.assert_array_equal(idx, np_topk(np.array([[-1.], [1.]]), keys, 5)[1])


def test_topk_keeps_float32_and_float64():
  rng = np.random.default_rng(1)
  q, keys = unit(rng.normal(size=(5, 8))), unit(rng.normal(size=(9, 8)))
  assert retrieval.topk_retrieval(q, keys, k=3, block_size=4)[0].dtype == jnp.float64
  s32, i32 = retrieval.topk_retrieval(q.astype(np.float32), keys.astype(np.float32), k=3,
                                      block_size=4)
  assert s32.dtype == jnp.float32
  np.testing.assert_array_equal(i32, np_topk(q, keys, 3)[1])


@pytest.mark.parametrize('num_devices', DEVICE_COUNTS)
def test_topk_and_recall_on_meshes_equal_one_device(num_devices):
  rng = np.random.default_rng(2)
  keys = duplicated_keys(rng)
  q = np.concatenate([unit(rng.normal(size=(10, 16))), keys[[3, 9, 36]]])  # N = 13: padded
  mesh = mesh_of(num_devices)
  scores, idx = retrieval.topk_retrieval(q, keys, k=7, block_size=6, mesh=mesh)
  one_scores, one_idx = retrieval.topk_retrieval(q, keys, k=7, block_size=6)
  np.testing.assert_array_equal(idx, one_idx)
  np.testing.assert_array_equal(idx, np_topk(q, keys, 7)[1])
  float64.assert_close(scores, one_scores)
  qg, kg = rng.integers(0, 5, size=13), rng.integers(0, 5, size=37)
  recall = retrieval.recall_at_k(q, keys, qg, kg, (1, 3, 7), block_size=6, mesh=mesh)
  assert recall == retrieval.recall_at_k(q, keys, qg, kg, (1, 3, 7), block_size=6)
  assert recall == np_recall(q, keys, qg, kg, (1, 3, 7))


def test_topk_memory_is_blockwise():
  n = m = 4096
  spec = jax.ShapeDtypeStruct((n, 32), jnp.float32)
  blockwise = jax.jit(functools.partial(retrieval.topk_retrieval, k=10, block_size=256))
  temp = blockwise.lower(spec, spec).compile().memory_analysis().temp_size_in_bytes
  dense = jax.jit(lambda q, k: jax.lax.top_k(q @ k.T, 10))  # the measure sees an N x M matrix
  dense_temp = dense.lower(spec, spec).compile().memory_analysis().temp_size_in_bytes
  assert dense_temp >= n * m * 4, dense_temp
  assert temp < n * m * 4 / 8, (temp, n * m * 4)


def test_topk_rejects_bad_arguments():
  q, keys = np.zeros((3, 4)), np.zeros((5, 4))
  with pytest.raises(ValueError, match=r'k must be in \[1, M = 5\]'):
    retrieval.topk_retrieval(q, keys, k=6, block_size=2)
  with pytest.raises(ValueError, match='same D'):
    retrieval.topk_retrieval(q, np.zeros((5, 3)), k=1, block_size=2)
  with pytest.raises(ValueError, match='block_size'):
    retrieval.topk_retrieval(q, keys, k=1, block_size=0)


# ---- Recall@k ---------------------------------------------------------------------------------


def test_recall_counts_duplicate_texts():
  """Queries 0 and 1 are the same text (group 7), so are keys 0 and 2: a hit on either counts."""
  keys = unit(np.array([[1., 0., 0.], [0., 1., 0.], [1., 0., 0.], [0., 0., 1.]]))
  q = unit(np.array([[1., .1, 0.], [.9, 0., .5], [0., 1., .2], [0., .3, 1.]]))
  key_group = np.array([7, 8, 7, 9])
  query_group = np.array([7, 7, 8, 9])
  recall = retrieval.recall_at_k(q, keys, query_group, key_group, (1, 2), block_size=3)
  assert recall == {'r@1': 1.0, 'r@2': 1.0}
  assert recall == np_recall(q, keys, query_group, key_group, (1, 2))
  # With per-index ids (query i's positive key i only), query 1's top hit (key 0) is wrong.
  per_index = retrieval.recall_at_k(q, keys, np.array([0, 2, 1, 3]), np.arange(4), (1, 2),
                                    block_size=3)
  assert per_index['r@1'] == 0.75


@pytest.mark.parametrize('block_size', [4, 50])
def test_recall_and_bidirectional_match_numpy(block_size):
  rng = np.random.default_rng(3)
  za = unit(rng.normal(size=(30, 8)))
  zb = unit(za + 0.8 * rng.normal(size=za.shape))
  zb[5] = zb[4]  # a duplicated text...
  ga, gb = np.arange(30), np.arange(30)
  gb[5] = 4  # ...shares its group with the other copy,
  ga[5] = 4  # and so does its image.
  ks = (1, 5, 10)
  out = retrieval.bidirectional_recall(za, zb, ga, gb, ks, block_size=block_size)
  assert list(out) == ['a2b/r@1', 'a2b/r@5', 'a2b/r@10', 'b2a/r@1', 'b2a/r@5', 'b2a/r@10']
  a2b, b2a = np_recall(za, zb, ga, gb, ks), np_recall(zb, za, gb, ga, ks)
  assert out == {**{f'a2b/{k}': v for k, v in a2b.items()},
                 **{f'b2a/{k}': v for k, v in b2a.items()}}
  assert 0 < out['a2b/r@1'] < out['a2b/r@10'] <= 1


def test_recall_rejects_bad_groups_and_ks():
  q, keys = np.zeros((3, 4)), np.zeros((5, 4))
  with pytest.raises(ValueError, match='query_group and key_group'):
    retrieval.recall_at_k(q, keys, np.zeros(3), np.zeros(4), (1,), block_size=2)
  with pytest.raises(ValueError, match='every k in ks'):
    retrieval.recall_at_k(q, keys, np.zeros(3), np.zeros(5), (1, 10), block_size=2)


# ---- Zero-shot --------------------------------------------------------------------------------


def test_zero_shot_unbalanced_labels():
  rng = np.random.default_rng(4)
  classes = unit(rng.normal(size=(5, 8)))
  labels = np.array([0] * 20 + [1] * 6 + [2] * 3 + [4])  # class 3 absent
  images = unit(classes[labels] + 0.9 * rng.normal(size=(labels.size, 8)))
  out = retrieval.zero_shot_accuracy(images, classes, labels, block_size=2)
  pred = np.argmax(images @ classes.T, axis=1)  # first maximum: the lower class index
  present = [c for c in range(5) if np.any(labels == c)]
  balanced = np.mean([np.mean(pred[labels == c] == c) for c in present])
  assert out == {'top1': float(np.mean(pred == labels)), 'balanced_top1': float(balanced)}
  assert out['top1'] != out['balanced_top1']
  mesh = retrieval.zero_shot_accuracy(images, classes, labels, block_size=2, mesh=mesh_of(8))
  assert mesh == out


def test_zero_shot_with_several_rows_per_class():
  """class_of: a class scores its best row (the nearest subclass prompt decides)."""
  rng = np.random.default_rng(6)
  rows = unit(rng.normal(size=(7, 8)))
  class_of = np.array([0, 0, 1, 2, 2, 2, 1])
  labels = np.array([0] * 9 + [1] * 4 + [2] * 12)
  near = np.array([rng.choice(np.flatnonzero(class_of == y)) for y in labels])
  images = unit(rows[near] + 0.8 * rng.normal(size=(labels.size, 8)))
  out = retrieval.zero_shot_accuracy(images, rows, labels, class_of=class_of, block_size=3)
  scores = images @ rows.T  # (N, M)
  best = np.stack([scores[:, class_of == c].max(axis=1) for c in range(3)], axis=1)
  pred = np.argmax(best, axis=1)
  balanced = np.mean([np.mean(pred[labels == c] == c) for c in range(3)])
  assert out == {'top1': float(np.mean(pred == labels)), 'balanced_top1': float(balanced)}
  assert 0 < out['top1'] < 1
  # Averaging each class's rows (one row per class) is a different classifier here.
  means = unit(np.stack([rows[class_of == c].mean(0) for c in range(3)]))
  assert retrieval.zero_shot_accuracy(images, means, labels) != out
  with pytest.raises(ValueError, match='class_of must be int'):
    retrieval.zero_shot_accuracy(images, rows, labels, class_of=class_of[:3])


def test_zero_shot_rejects_bad_labels():
  with pytest.raises(ValueError, match=r'labels must be in \[0, C = 2\)'):
    retrieval.zero_shot_accuracy(np.eye(3), np.eye(3)[:2], np.array([0, 1, 2]))


def test_class_embeddings_ensemble_prompts():
  rng = np.random.default_rng(5)
  w = rng.normal(size=(6, 4))
  tokenize = lambda texts: np.array([[len(t), t.count('a'), t.count('o'), t.count(' '), 1.,
                                      sum(map(ord, t)) % 7] for t in texts])
  encode = lambda tokens: jnp.asarray(tokens) @ w  # (T, 6) . (6, 4) -> (T, 4)
  names, templates = ['cat', 'dog', 'a boat'], ['a photo of a {}.', '{}', 'art of the {}!']
  out = retrieval.class_embeddings(encode, names, templates, tokenize)
  ref = []
  for name in names:
    z = unit(tokenize([t.format(name) for t in templates]) @ w)
    ref.append(unit(z.mean(axis=0)))
  assert out.shape == (3, 4) and out.dtype == jnp.float64
  float64.assert_close(out, np.stack(ref))
  with pytest.raises(ValueError, match="'{}' exactly once"):
    retrieval.class_embeddings(encode, names, ['a photo'], tokenize)


# ---- Alignment and uniformity -----------------------------------------------------------------


@pytest.mark.parametrize('alpha', [2, 1])
def test_alignment_matches_numpy(alpha):
  rng = np.random.default_rng(6)
  za = unit(rng.normal(size=(20, 8)))
  zb = unit(za + 0.5 * rng.normal(size=za.shape))
  float64.assert_close(retrieval.alignment(za, zb, alpha=alpha), np_alignment(za, zb, alpha))


@pytest.mark.parametrize('t,block_size', [(2, 7), (2, 64), (0.5, 1)])
def test_uniformity_matches_numpy(t, block_size):
  rng = np.random.default_rng(7)
  z = unit(rng.normal(size=(23, 8)))
  z[4] = z[11]  # a duplicate: distance 0, counted (i != j by index)
  got = retrieval.uniformity(z, t=t, block_size=block_size)
  float64.assert_close(got, np_uniformity(z, t))
  assert retrieval.uniformity(z[:2], t=t) == pytest.approx(np_uniformity(z[:2], t), rel=1e-12)
