"""The negative samplers against plain NumPy re-derivations: keep-masks, mining, MoCHi.

Each keep-function is compared with a NumPy bool mask written from its formula, directly and
through `info_nce` (dense, blockwise with padded tiles, and per device on a 2-device mesh):
the loss and its gradient w.r.t. the query must equal the dense loss with the NumPy mask,
whose value is also checked against a NumPy InfoNCE (tests/reference.py). Mining is compared with a
sort-and-filter loop; MoCHi's mixtures are checked by solving for their mixing coefficients.

Everything runs in float64 (tests/float64.py): the dense, blockwise and sharded paths sum in
other orders and agree to ~1e-15 (losses relative, gradients absolute), the NumPy references
(which normalise without l2_normalize's 1e-12 epsilon) to ~1e-12; all are compared at rtol 1e-9
(atol 1e-12), so the checks hold on any CPU. A wrong mask or a dropped negative moves the loss
by > 1e-3.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive import losses
from contrastive import parallel
from contrastive.samplers import masks
from contrastive.samplers import mining
from contrastive.samplers import mochi
from tests import float64
from tests import reference
from tests.reference import unit
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)

B, M, D = 6, 4, 5  # queries, extra negatives, width
TAU = 0.2


def ref_top_k(query, cands, k, skip_top=0, mask=None):
  """Sort each row's negatives by decreasing similarity, skip, take k, pad with (-inf, -1)."""
  sim = unit(query) @ unit(cands).T
  sims, idx = np.full((len(sim), k), -np.inf), np.full((len(sim), k), -1)
  for i in range(len(sim)):
    negs = [j for j in range(sim.shape[1]) if j != i and (mask is None or mask[i, j])]
    ranked = sorted(negs, key=lambda j: (-sim[i, j], j))[skip_top:skip_top + k]
    sims[i, :len(ranked)], idx[i, :len(ranked)] = sim[i, ranked], ranked
  return sims, idx


def _data():
  rng = np.random.default_rng(0)
  query = rng.normal(size=(B, D))  # float64
  key = query + rng.normal(size=(B, D))
  extra = rng.normal(size=(M, D))
  return query, key, extra


QUERY, KEY, EXTRA = _data()
CANDS = np.concatenate([KEY, EXTRA])  # the loss's column order: keys, then extra negatives
SIM = unit(QUERY) @ unit(CANDS).T  # (B, B + M) float64
IDS = np.array([0, 1, 2, 3, 1, 5])  # rows 1 and 4 are views of the same example
CAND_IDS = np.concatenate([IDS, [2, -1, 7, 1]])  # a queue: row 2's and example 1's old keys
CLUSTERS = np.array([0, 1, 0, 1, 2, 0])
CAND_CLUSTERS = np.concatenate([CLUSTERS, [0, 1, 2, 3]])
THETA = 0.3
GUIDE_C = np.random.default_rng(1).normal(size=(B + M, 3))  # the frozen guide's embeddings
GUIDE_Q = GUIDE_C[:B] + 0.7 * np.random.default_rng(2).normal(size=(B, 3))  # near positives
GUIDE_SIM = unit(GUIDE_Q) @ unit(GUIDE_C).T
MARGIN = 0.1
MINED = np.array([[3, 7, -1], [9, 0, 2], [1, 1, 8], [-1, -1, -1], [5, 6, 0], [4, 2, 3]])


def _mask_from(keep_fn):
  """A keep-function evaluated on the whole (B, B + M) grid, as NumPy."""
  grid = jax.jit(lambda sim: keep_fn(jnp.arange(B), jnp.arange(B + M), sim))
  return jax.tree.map(np.asarray, grid(jnp.asarray(SIM)))


# name -> (keep-function, NumPy mask from the formula)
KEEPS = {
    'instance': (lambda: masks.instance_keep(IDS, CAND_IDS),
                 lambda: (IDS[:, None] != CAND_IDS[None, :]) & (CAND_IDS[None, :] >= 0)),
    'threshold': (lambda: masks.threshold_keep(THETA), lambda: SIM <= THETA),
    'gist': (lambda: masks.gist_keep(GUIDE_Q, GUIDE_C, margin=MARGIN),
             lambda: GUIDE_SIM <= np.diag(GUIDE_SIM)[:, None] - MARGIN),
    'cluster': (lambda: masks.cluster_keep(CLUSTERS, CAND_CLUSTERS),
                lambda: CLUSTERS[:, None] == CAND_CLUSTERS[None, :]),
    'all_of': (lambda: masks.all_of(masks.instance_keep(IDS, CAND_IDS), None,
                                    masks.threshold_keep(THETA)),
               lambda: (IDS[:, None] != CAND_IDS[None, :]) & (CAND_IDS[None, :] >= 0) &
               (SIM <= THETA)),
    'indices': (lambda: mining.indices_keep(MINED),
                lambda: np.array([[j in MINED[i] for j in range(B + M)] for i in range(B)])),
    # Knowing N, the dense path scatters into a [B, N] mask; tiles still binary-search.
    'indices_scatter': (lambda: mining.indices_keep(MINED, num_candidates=B + M),
                        lambda: np.array([[j in MINED[i] for j in range(B + M)]
                                          for i in range(B)])),
}


def test_reference_masks_are_not_borderline_or_trivial():
  assert np.min(np.abs(SIM - THETA)) > 1e-3
  margin_gap = GUIDE_SIM - np.diag(GUIDE_SIM)[:, None] + MARGIN
  assert np.min(np.abs(margin_gap[~np.eye(B, B + M, dtype=bool)])) > 1e-3
  for name, (_, ref) in KEEPS.items():
    negatives = ref() & ~np.eye(B, B + M, dtype=bool)
    assert 0 < negatives.sum() < negatives.size - B, name
    # One negative more or less moves the loss by > 1e-3 (by 2.6e-3 or more here): far outside
    # the rtol of 1e-9 the paths are compared at.
    fewer = ref().copy()
    fewer[tuple(np.argwhere(negatives)[0])] = False
    loss = reference.info_nce(QUERY, CANDS, TAU, mask=ref())
    assert abs(reference.info_nce(QUERY, CANDS, TAU, mask=fewer) - loss) > 1e-3, name


@functools.cache
def _all_masks():
  return _mask_from(lambda *ids_sim: {name: keep_fn()(*ids_sim)
                                      for name, (keep_fn, _) in KEEPS.items()})


@pytest.mark.parametrize('name', list(KEEPS))
def test_keep_matches_numpy_mask(name):
  np.testing.assert_array_equal(_all_masks()[name], KEEPS[name][1]())


def _loss_fn(**kwargs):
  return lambda q: losses.info_nce(q, KEY, temperature=TAU, extra_negatives=EXTRA, **kwargs)[0]


@jax.jit
def _masked_loss_and_grad(query, mask):
  """The dense loss and its gradient with a [B, B + M] bool array mask: one compile for all."""
  return jax.value_and_grad(lambda q: _loss_fn(negative_mask=mask)(q))(query)


@functools.cache
def _keep_losses():
  """{name: ((dense loss, grad), (blockwise loss, grad))} for every keep, from one compile."""
  def run(query):
    out = {}
    for name, (keep_fn, _) in KEEPS.items():
      dense = jax.value_and_grad(_loss_fn(negative_mask=keep_fn()))
      blocks = jax.value_and_grad(_loss_fn(negative_mask=keep_fn(), block_size=4))  # 6 -> 8 rows
      out[name] = (dense(query), blocks(query))
    return out
  return jax.jit(run)(QUERY)


@pytest.mark.parametrize('name', list(KEEPS))
def test_keep_in_info_nce_dense_and_blockwise(name):
  mask = KEEPS[name][1]()
  want, want_grad = _masked_loss_and_grad(QUERY, mask)
  assert want.dtype == want_grad.dtype == np.float64
  float64.assert_close(want, reference.info_nce(QUERY, CANDS, TAU, mask=mask))
  for path, (got, got_grad) in zip(('dense', 'blockwise'), _keep_losses()[name]):
    float64.assert_close(got, want, err_msg=path)
    float64.assert_close(got_grad, want_grad, err_msg=path)


def test_keeps_on_a_two_device_mesh():
  mesh = parallel.make_mesh([('data', -1)], jax.devices()[:2])
  keep_fn = masks.all_of(masks.instance_keep(IDS, CAND_IDS),
                         masks.gist_keep(GUIDE_Q, GUIDE_C, margin=MARGIN),
                         masks.threshold_keep(THETA))
  mask = KEEPS['instance'][1]() & KEEPS['gist'][1]() & KEEPS['threshold'][1]()
  assert (mask & ~np.eye(B, B + M, dtype=bool)).sum(axis=1).min() > 0  # every row has some
  want, want_grad = _masked_loss_and_grad(QUERY, mask)
  loss_fn = _loss_fn(negative_mask=keep_fn, block_size=2, mesh=mesh)  # 3 rows per device
  got, got_grad = jax.jit(jax.value_and_grad(loss_fn))(QUERY)
  assert got.dtype == np.float64
  float64.assert_close(got, want)
  float64.assert_close(got_grad, want_grad)


def test_all_of_with_nothing_is_none():
  assert masks.all_of() is None and masks.all_of(None, None) is None
  keep_fn = masks.threshold_keep(THETA)
  assert masks.all_of(None, keep_fn) is keep_fn
  with pytest.raises(ValueError, match='keep-functions'):
    masks.all_of(np.ones((B, B + M), bool))


# ---- mining -----------------------------------------------------------------------------------


@pytest.mark.parametrize('block_size', [None, 3])  # N = 10 is not a multiple of 3
def test_top_k_negatives_matches_numpy(block_size):
  cluster_keep, cluster_mask = KEEPS['cluster'][0](), KEEPS['cluster'][1]()  # 1 to 3 negatives
  cases = ((0, None, None), (2, None, None), (1, cluster_keep, cluster_mask))  # too few: -1

  @jax.jit
  def run(query):
    return [mining.top_k_negatives(query, CANDS, 3, skip_top=skip_top, keep=keep_fn,
                                   block_size=block_size) for skip_top, keep_fn, _ in cases]

  for (skip_top, _, mask), (sims, idx) in zip(cases, run(QUERY)):
    want_sims, want_idx = ref_top_k(QUERY, CANDS, 3, skip_top, mask)
    assert sims.dtype == QUERY.dtype and idx.dtype == jnp.int32
    np.testing.assert_array_equal(idx, want_idx, err_msg=f'skip_top={skip_top}')
    float64.assert_close(sims, want_sims, err_msg=f'skip_top={skip_top}')
  assert np.sum(want_idx == -1) > 0  # the last case really has missing slots


def test_top_k_negatives_more_than_there_are():
  top_k = functools.partial(mining.top_k_negatives, k=5, block_size=2)  # 3 or 4 negatives
  sims, idx = jax.jit(top_k)(QUERY, CANDS[:4])
  want_sims, want_idx = ref_top_k(QUERY, CANDS[:4], 5)
  np.testing.assert_array_equal(idx, want_idx)
  float64.assert_close(sims, want_sims)


def test_top_k_negatives_has_no_gradient_and_checks_args():
  def total(q):
    sims, _ = mining.top_k_negatives(q, CANDS, 2)
    return jnp.sum(sims)
  np.testing.assert_array_equal(jax.jit(jax.grad(total))(QUERY), 0.0)
  for kwargs, match in ((dict(k=0), 'k must'), (dict(k=2, skip_top=-1), 'skip_top'),
                        (dict(k=2, block_size=0), 'block_size')):
    with pytest.raises(ValueError, match=match):
      mining.top_k_negatives(QUERY, CANDS, **kwargs)
  with pytest.raises(ValueError, match=r'\[N, D\]'):
    mining.top_k_negatives(QUERY, CANDS[:, :3], 2)


def test_mined_negatives_in_the_loss_denominator():
  @jax.jit
  def run(query):
    _, idx = mining.top_k_negatives(query, CANDS, 2, skip_top=1)
    return idx, _loss_fn(negative_mask=mining.indices_keep(idx))(query)

  idx, loss = run(QUERY)
  mask = np.zeros((B, B + M), bool)
  mask[np.arange(B)[:, None], idx] = True  # the positive and the 2 mined negatives remain
  float64.assert_close(loss, reference.info_nce(QUERY, CANDS, TAU, mask=mask))


# ---- MoCHi ------------------------------------------------------------------------------------


FIT_TOL = 1e-9  # float64 fits of the mixtures are exact to ~1e-15


def _solve_mix(h, a, b):
  """(t, residual, r) of the least-squares fit r h = t a + (1 - t) b."""
  (r, t), *_ = np.linalg.lstsq(np.stack([h, b - a], axis=1), b, rcond=None)
  return t, np.linalg.norm(r * h - (t * a + (1 - t) * b)), r


def _check_mixtures(negs, valid, hard_idx, num_mix, q, c):
  """Each h mixes two distinct hard negatives (alpha in [0, 1]), each h' the query and one.

  In float64 a fit is exact to ~1e-15 (residual, t), checked at 1e-9; h equal to one of the
  negatives (a pair i = j) would have h . n = 1 to ~1e-15, a true mix has h . n < 1 - 1e-9."""
  for i in range(B):
    hard = [c[j] for j in hard_idx[i] if j >= 0]
    if not hard:
      assert not valid[i].any() and np.all(negs[i] == 0)
      continue
    assert valid[i].all()
    pairs = [(x, y) for x in range(len(hard)) for y in range(len(hard)) if x != y or len(hard) == 1]
    for s, h in enumerate(np.asarray(negs[i], np.float64)):
      if s < num_mix:
        if len(hard) > 1:  # a true mix of two distinct ones: none of them (P(alpha in {0, 1}) = 0)
          assert max(h @ n for n in hard) < 1 - FIT_TOL, (i, s)
        fits = [_solve_mix(h, hard[x], hard[y]) for x, y in pairs]
        ok = [res < FIT_TOL and -FIT_TOL <= t <= 1 + FIT_TOL and r > 0 for t, res, r in fits]
      else:
        fits = [_solve_mix(h, q[i], n) for n in hard]
        ok = [res < FIT_TOL and -FIT_TOL <= t <= 0.5 + FIT_TOL and r > 0 for t, res, r in fits]
      assert any(ok), (i, s, fits)


def no_row_5(row_ids, col_ids, sim):
  del col_ids
  return jnp.broadcast_to(row_ids[:, None] != 5, sim.shape)


@functools.cache
def _mochi_cases():
  """From one compile: (1) MoCHi negatives where row 4 has one negative and row 5 none, and
  info_nce with them; (2) with num_hard=1, and the gradient of their sum w.r.t. the query."""
  keep_fn = masks.all_of(masks.cluster_keep(CLUSTERS, CAND_CLUSTERS), no_row_5)
  sample = functools.partial(mochi.mochi_negatives, num_hard=3, num_mix=4, num_query_mix=3,
                             keep=keep_fn, block_size=3)
  sample_one = functools.partial(mochi.mochi_negatives, num_hard=1, num_mix=2, num_query_mix=2)

  def total(query, rng):
    negs, _ = sample_one(rng, query, CANDS)
    return jnp.sum(negs), negs

  @jax.jit
  def run(rng, query):
    rng, rng_one = jax.random.split(rng)
    negs, valid = sample(rng, query, CANDS)
    loss = _loss_fn(query_negatives=negs, query_negative_mask=valid)(query)
    return (negs, valid, loss), jax.grad(total, has_aux=True)(query, rng_one)

  return run(jax.random.key(0), QUERY)


def test_mochi_mixtures_shapes_norms_and_spans():
  negs, valid, _ = _mochi_cases()[0]
  assert negs.shape == (B, 7, D) and negs.dtype == QUERY.dtype and valid.shape == (B, 7)
  norms = np.linalg.norm(negs, axis=-1)
  float64.assert_close(norms[np.asarray(valid)], 1.0)
  np.testing.assert_array_equal(valid[:, 0], [True] * 5 + [False])
  mask = KEEPS['cluster'][1]()
  mask[5] = False
  _, hard_idx = ref_top_k(QUERY, CANDS, 3, mask=mask)
  assert [np.sum(row >= 0) for row in hard_idx] == [3, 2, 3, 2, 1, 0]
  _check_mixtures(negs, valid, hard_idx, 4, unit(QUERY), unit(CANDS))
  assert len({tuple(np.round(n, 5)) for n in np.asarray(negs[0, :4])}) > 1  # really random


def test_mochi_with_one_hard_negative_and_no_gradient():
  grad, negs = _mochi_cases()[1]
  np.testing.assert_array_equal(grad, 0.0)
  _, hard_idx = ref_top_k(QUERY, CANDS, 1)
  hardest = unit(CANDS)[hard_idx[:, 0]]  # (B, D)
  float64.assert_close(negs[:, :2], np.repeat(hardest[:, None], 2, 1))
  _check_mixtures(negs, np.ones((B, 4), bool), hard_idx, 2, unit(QUERY), unit(CANDS))
  with pytest.raises(ValueError, match='num_mix'):
    mochi.mochi_negatives(jax.random.key(1), QUERY, CANDS, num_hard=1, num_mix=0,
                          num_query_mix=0)


def test_mochi_negatives_in_info_nce():
  negs, valid, loss = _mochi_cases()[0]  # row 5's negatives are invalid and masked out
  want = reference.info_nce(QUERY, CANDS, TAU, own=np.asarray(negs), own_mask=np.asarray(valid))
  float64.assert_close(loss, want)
  assert abs(want - reference.info_nce(QUERY, CANDS, TAU)) > 1e-3  # the negatives count


def test_mochi_reuses_mined_hard_sets():
  """Hard sets handed over (the first num_hard of a larger mining) give the same mixtures."""
  _, idx = mining.top_k_negatives(QUERY, CANDS, 5)
  rng = jax.random.key(4)
  fresh = mochi.mochi_negatives(rng, QUERY, CANDS, num_hard=3, num_mix=2, num_query_mix=1)
  reused = mochi.mochi_negatives(rng, QUERY, CANDS, num_hard=3, num_mix=2, num_query_mix=1,
                                 hard_indices=idx[:, :3])
  np.testing.assert_array_equal(fresh[0], reused[0])
  with pytest.raises(ValueError, match='hard_indices must be'):
    mochi.mochi_negatives(rng, QUERY, CANDS, num_hard=3, num_mix=2, num_query_mix=1,
                          hard_indices=idx)
