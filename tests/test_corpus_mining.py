"""Corpus hard-negative mining (contrastive/negatives/corpus_mining.py) against a plain NumPy
brute force over the full N x M matrix, in float64 (tests/float64.py).

The reference removes each query's excluded candidates (its positive, every candidate sharing
its id) and ranks the rest with a stable argsort on -score: equal scores keep the lower index
first, the rule the module documents. Ties are built exactly: duplicated candidate rows, and
integer-valued embeddings whose dot products are exact in any summation order.

The meshes use the 8 CPU devices tests/conftest.py gives the session (as tests/test_retrieval.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive import parallel
from contrastive.negatives import corpus_mining
from contrastive.negatives import mine_hard_negatives
from tests import float64
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)


# ---- Independent NumPy reference --------------------------------------------------------------


def np_mine(queries, candidates, num_hard, positive, query_ids=None, candidate_ids=None,
            query_modality=None, candidate_modality=None):
  """Full [N, M] scores; per query the kept columns, stable argsort on -score, -1/-inf padded."""
  scores = queries @ candidates.T
  n, m = scores.shape
  idx, top = np.full((n, num_hard), -1), np.full((n, num_hard), -np.inf)
  for i in range(n):
    keep = ~np.isin(np.arange(m), np.atleast_1d(positive[i]))  # one positive or a set
    if query_ids is not None:
      keep &= candidate_ids != query_ids[i]
    if query_modality is not None:
      keep &= candidate_modality == query_modality[i]
    cols = np.flatnonzero(keep)
    order = cols[np.argsort(-scores[i, cols], kind='stable')][:num_hard]
    idx[i, :len(order)], top[i, :len(order)] = order, scores[i, order]
  return idx, top


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def tied_problem(rng, n=16, m=60, d=8):
  """Unit candidates with duplicated rows (exact ties), queries partly copies of candidates,
  duplicate ids on both sides, some queries without a positive."""
  candidates = unit(rng.normal(size=(m, d)))
  candidates[[20, 41, 59]] = candidates[3]
  candidates[[10, 11]] = candidates[9]
  queries = np.concatenate([unit(rng.normal(size=(n - 4, d))), candidates[[3, 9, 20, 30]]])
  positive = rng.integers(0, m, size=n)
  positive[[1, 5]] = -1
  positive[-4] = 3  # a copy of its positive exists at 20, 41, 59: those stay (distinct ids)
  candidate_ids = rng.integers(0, 12, size=m)
  query_ids = rng.integers(0, 12, size=n)
  query_ids[-3] = candidate_ids[10]  # excludes 10 (and others) but not 9, 11 unless equal
  return queries, candidates, positive, query_ids, candidate_ids


def integer_problem(rng, n=16, m=60, d=8):
  """Entries in {-1, 0, 1}: exact integer scores, many equal ones, zero rows (signed zeros)."""
  queries = rng.integers(-1, 2, size=(n, d)).astype(np.float64)
  candidates = rng.integers(-1, 2, size=(m, d)).astype(np.float64)
  candidates[[2, 17, 30]] = 0.0
  queries[0] = -1.0
  return (queries, candidates, rng.integers(-1, m, size=n), rng.integers(0, 5, size=n),
          rng.integers(0, 5, size=m))


def assert_matches(got, want):
  np.testing.assert_array_equal(got[0], want[0])
  float64.assert_close(got[1], want[1])


# ---- Exactness, ties, exclusions ---------------------------------------------------------------


@pytest.mark.parametrize('num_hard,block_size', [(5, 7), (13, 12), (59, 64)])
def test_matches_numpy_with_ties_and_duplicate_ids(num_hard, block_size):
  rng = np.random.default_rng(num_hard * 100 + block_size)
  for problem in (tied_problem(rng), integer_problem(rng)):
    idx, scores = mine_hard_negatives(*problem[:2], num_hard=num_hard, positive=problem[2],
                                      query_ids=problem[3], candidate_ids=problem[4],
                                      block_size=block_size)
    assert idx.dtype == jnp.int32 and scores.dtype == jnp.float64
    assert_matches((idx, scores), np_mine(problem[0], problem[1], num_hard, *problem[2:]))
  # Without ids only the positive is excluded; num_hard = M - 1 ranks the whole rest.
  q, c, positive = problem[:3]
  got = mine_hard_negatives(q, c, num_hard=num_hard, positive=positive, block_size=block_size)
  assert_matches(got, np_mine(q, c, num_hard, positive))


def test_ties_keep_lower_index_and_exclusions_never_returned():
  c = np.array([[1., 0.], [1., 0.], [0., 1.], [1., 0.], [0.6, 0.8], [1., 0.]])
  q = np.array([[1., 0.], [1., 0.]])
  idx, scores = mine_hard_negatives(q, c, num_hard=4, positive=np.array([1, -1]),
                                    query_ids=np.array([7, 8]),
                                    candidate_ids=np.array([0, 0, 0, 7, 0, 0]), block_size=4)
  np.testing.assert_array_equal(idx, [[0, 5, 4, 2], [0, 1, 3, 5]])  # row 0: not 1 (positive), 3
  np.testing.assert_array_equal(scores, [[1., 1., .6, 0.], [1., 1., 1., 1.]])


def test_several_positives_per_query_are_all_excluded():
  # A text of several groups: each query excludes every candidate of its group's set [N, E]
  # (-1 padding), not only its own positive.
  rng = np.random.default_rng(5)
  q, c, _, query_ids, candidate_ids = tied_problem(rng)
  positives = rng.integers(-1, len(c), size=(len(q), 4))
  positives[0] = [3, 20, -1, -1]
  for block_size in (7, 64):
    got = mine_hard_negatives(q, c, num_hard=9, positive=positives, query_ids=query_ids,
                              candidate_ids=candidate_ids, block_size=block_size)
    assert_matches(got, np_mine(q, c, 9, positives, query_ids, candidate_ids))
    for row, excluded in zip(np.asarray(got[0]), positives):
      assert not set(row) & set(excluded) - {-1}
  # Counterexample: the first column alone leaves the others of the set among the negatives.
  first = mine_hard_negatives(q, c, num_hard=9, positive=positives[:, 0], query_ids=query_ids,
                              candidate_ids=candidate_ids, block_size=7)[0]
  assert sum(bool(set(r) & set(e[1:]) - {-1}) for r, e in zip(np.asarray(first), positives)) > 4


def test_fewer_kept_candidates_than_num_hard_pads_with_minus_one():
  rng = np.random.default_rng(3)
  q, c = unit(rng.normal(size=(3, 4))), unit(rng.normal(size=(10, 4)))
  candidate_ids = np.array([0] * 8 + [1, 2])
  positive, query_ids = np.array([8, -1, 8]), np.array([0, 0, 5])
  idx, scores = mine_hard_negatives(q, c, num_hard=4, positive=positive, query_ids=query_ids,
                                    candidate_ids=candidate_ids, block_size=3)
  np.testing.assert_array_equal(idx[0], [9, -1, -1, -1])  # ids exclude 0..7, positive 8
  kept = 8 + np.argsort(-(c[8:] @ q[1]), kind='stable')  # no positive; ids exclude 0..7
  np.testing.assert_array_equal(idx[1], kept.tolist() + [-1, -1])
  assert np.all(np.isneginf(scores[0, 1:])) and np.all(np.isneginf(scores[1, 2:]))
  assert np.all(idx[2] >= 0)  # id 5 excludes nothing: 9 candidates left
  assert_matches((idx, scores), np_mine(q, c, 4, positive, query_ids, candidate_ids))


def test_float32_stays_float32():
  rng = np.random.default_rng(4)
  q, c = unit(rng.normal(size=(6, 8))), unit(rng.normal(size=(40, 8)))
  positive = rng.integers(0, 40, size=6)
  idx, scores = mine_hard_negatives(q.astype(np.float32), c.astype(np.float32), num_hard=6,
                                    positive=positive, block_size=9)
  want_idx, want_scores = np_mine(q, c, 6, positive)
  assert scores.dtype == jnp.float32
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-6, atol=1e-6)


def test_never_builds_the_n_by_m_matrix_and_traces_under_jit():
  n, m = 64, 300
  fn = jax.jit(functools.partial(mine_hard_negatives, num_hard=8, block_size=32))
  q, c = np.zeros((n, 16)), np.zeros((m, 16))
  hlo = fn.lower(q, c, positive=np.zeros(n, np.int32)).as_text()
  assert f'{n}x{m}x' not in hlo and f'{n}x32xf64' in hlo  # tiles of 32 columns only


def test_counterexample_missing_id_mask_or_positive_differs():
  rng = np.random.default_rng(5)
  q, c, positive, query_ids, candidate_ids = tied_problem(rng)
  want = np_mine(q, c, 5, positive, query_ids, candidate_ids)
  no_ids = mine_hard_negatives(q, c, num_hard=5, positive=positive, block_size=7)
  assert not np.array_equal(no_ids[0], want[0])  # the mask matters: a test that can fail
  no_positive = mine_hard_negatives(q, c, num_hard=5, positive=np.full(16, -1),
                                    query_ids=query_ids, candidate_ids=candidate_ids,
                                    block_size=7)
  assert not np.array_equal(no_positive[0], want[0])


# ---- Meshes ------------------------------------------------------------------------------------


@pytest.mark.parametrize('axes', [[('data', 2)], [('data', 2), ('fsdp', 4)]])  # 2, 8 devices
def test_meshes_equal_one_device(axes):
  assert jax.device_count() >= 8, 'tests/conftest.py should have set 8 CPU devices'
  mesh = parallel.make_mesh(axes, devices=jax.devices()[:int(np.prod([s for _, s in axes]))])
  rng = np.random.default_rng(6)
  q, c, positive, query_ids, candidate_ids = tied_problem(rng)
  kwargs = dict(num_hard=6, positive=positive, query_ids=query_ids,
                candidate_ids=candidate_ids, block_size=11)
  got = mine_hard_negatives(q, c, mesh=mesh, **kwargs)
  assert_matches(got, mine_hard_negatives(q, c, **kwargs))
  assert_matches(got, np_mine(q, c, 6, positive, query_ids, candidate_ids))


@pytest.mark.parametrize('devices', [1, 8])
def test_modality_aware_mining_never_returns_another_modality(devices):
  """MM-Embed: each query keeps only candidates of its target modality (0: text, 1: image, 2:
  a third kind here), on one device and on 8."""
  mesh = parallel.make_mesh([('data', devices)], devices=jax.devices()[:devices])
  rng = np.random.default_rng(8)
  q, c, positive, query_ids, candidate_ids = tied_problem(rng)
  candidate_modality = rng.integers(0, 3, size=len(c))
  query_modality = rng.integers(0, 3, size=len(q))
  kwargs = dict(num_hard=8, positive=positive, query_ids=query_ids, candidate_ids=candidate_ids,
                block_size=11)
  got = mine_hard_negatives(q, c, query_modality=query_modality,
                            candidate_modality=candidate_modality, mesh=mesh, **kwargs)
  assert_matches(got, np_mine(q, c, 8, positive, query_ids, candidate_ids, query_modality,
                              candidate_modality))
  idx = np.asarray(got[0])
  found = idx >= 0
  assert found.sum() > len(q) * 4  # most queries get negatives
  np.testing.assert_array_equal(candidate_modality[idx[found]],
                                np.broadcast_to(query_modality[:, None], idx.shape)[found])
  # Counterexample: without the modalities, many mined negatives are of another modality.
  plain = np.asarray(mine_hard_negatives(q, c, mesh=mesh, **kwargs)[0])
  wrong = candidate_modality[plain] != query_modality[:, None]
  assert wrong.mean() > 0.4
  with pytest.raises(ValueError, match='query_modality and candidate_modality must be given '
                     'together'):
    mine_hard_negatives(q, c, query_modality=query_modality, **kwargs)


# ---- Bad arguments -----------------------------------------------------------------------------


def test_rejects_bad_arguments_with_one_line_errors():
  q, c, positive = np.zeros((4, 3)), np.zeros((6, 3)), np.zeros(4, np.int32)
  ids, cids = np.zeros(4, np.int32), np.zeros(6, np.int32)
  ok = dict(num_hard=2, positive=positive, block_size=2)
  cases = [
      (dict(num_hard=0), r'num_hard must be an int in \[1, M - 1 = 5\]'),
      (dict(num_hard=6), r'num_hard must be an int in \[1, M - 1 = 5\]'),
      (dict(num_hard=2.0), 'num_hard must be an int'),
      (dict(block_size=0), 'block_size must be an int >= 1'),
      (dict(positive=np.zeros(3, np.int32)),
       r'positive must be int \[N\] or \[N, E\] with N = 4; got int32 \(3,\)'),
      (dict(positive=np.zeros(4)),
       r'positive must be int \[N\] or \[N, E\] with N = 4; got float64'),
      (dict(positive=np.zeros((4, 2, 1), np.int32)), r'got int32 \(4, 2, 1\)'),
      (dict(positive=np.array([0, 1, 6, -1])), r'positive must be in \[-1, M = 6\)'),
      (dict(query_ids=ids), 'query_ids and candidate_ids must be given together'),
      (dict(query_ids=ids[:3], candidate_ids=cids), r'query_ids must be int \[N\] = \(4,\)'),
      (dict(query_ids=ids, candidate_ids=cids[:5]), r'candidate_ids must be int \[M\] = \(6,\)'),
      (dict(mesh=parallel.make_mesh([('data', 8)])), 'N = 4 queries must divide evenly over'),
  ]
  for change, match in cases:
    with pytest.raises(ValueError, match=match) as error:
      mine_hard_negatives(q, c, **{**ok, **change})
    assert '\n' not in str(error.value), str(error.value)
  for bad_q, bad_c in ((np.zeros((4, 2)), c), (np.zeros(4), c), (q, np.zeros((6, 3, 1)))):
    with pytest.raises(ValueError, match='same D'):
      mine_hard_negatives(bad_q, bad_c, **ok)
  assert corpus_mining.mine_hard_negatives is mine_hard_negatives
