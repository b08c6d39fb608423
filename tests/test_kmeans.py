"""k-means against a plain NumPy Lloyd's written from the algorithm, in float64.

The JAX version computes in its input's dtype. On float32 blobs (distances via |x|^2 - 2 x.c +
|c|^2) centroids are compared at atol 1e-5 on well-separated blobs where no point is near a
tie. k-means on 2 and 8 devices sums the centroid means in another order than on one device:
that comparison runs on float64 points (tests/float64.py), where the orders agree to ~1e-15,
compared at rtol 1e-9, so it holds on any CPU.
"""

import jax
import numpy as np
import pytest

from contrastive import parallel
from contrastive.samplers import kmeans as km
from tests import float64
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)

# ---- NumPy reference ------------------------------------------------------------------------


def ref_lloyd(x, centroids, num_iters):
  """Lloyd 1982: nearest centroid, then mean of each cluster (an empty one stays put)."""
  x, c = np.asarray(x, np.float64), np.array(centroids, np.float64)

  def nearest(c):
    return np.array([int(np.argmin([np.sum((p - q) ** 2) for q in c])) for p in x])

  for _ in range(num_iters):
    a = nearest(c)
    for j in range(len(c)):
      if np.any(a == j):
        c[j] = x[a == j].mean(0)
  a = nearest(c)
  return c, a, sum(np.sum((x[i] - c[a[i]]) ** 2) for i in range(len(x)))


def blobs(seed, centres, per_blob, scale=0.3):
  rng = np.random.default_rng(seed)
  centres = np.asarray(centres, np.float32)
  x = np.concatenate([c + scale * rng.standard_normal((per_blob, centres.shape[1])) for c in centres])
  return x.astype(np.float32), np.repeat(np.arange(len(centres)), per_blob)


CENTRES4 = [[0, 0, 0], [5, 0, 0], [0, 5, 0], [0, 0, 5]]
jit_lloyd = jax.jit(km.lloyd, static_argnums=2)

# ---- Lloyd ----------------------------------------------------------------------------------


def test_lloyd_matches_numpy():
  x, _ = blobs(0, CENTRES4, 15)  # N = 60, D = 3
  init = x[[0, 1, 2, 30]]  # two seeds in blob 0, none in blob 3: Lloyd has to move them
  c, a, inertia = jit_lloyd(x, init, 5)
  c_ref, a_ref, inertia_ref = ref_lloyd(x, init, 5)
  np.testing.assert_array_equal(np.asarray(a), a_ref)
  assert a.dtype == np.int32
  # Bounds in float32 (u = 6e-8): a centroid coordinate is a mean of n <= 30 values of size <= 5
  # on average, off by at most (n - 1) u 5 ~ 9e-6 in any summation order (typically ~1e-7);
  # each squared distance (~0.3) from |x|^2 - 2 x.c + |c|^2 (~25) loses 25 / 0.3 ~ 100 u ~ 6e-6
  # relative at worst, and the 60 terms' rounding errors do not all align: below 1e-5 in total.
  np.testing.assert_allclose(np.asarray(c), c_ref, atol=1e-5)
  np.testing.assert_allclose(float(inertia), inertia_ref, rtol=1e-5)


def test_empty_cluster_keeps_its_centroid():
  x, _ = blobs(2, CENTRES4, 15)  # same shapes as above: no new compile
  far = np.array([100.0, 100.0, 100.0], np.float32)
  init = np.stack([x[0], x[15], x[30], far])
  c, a, _ = jit_lloyd(x, init, 5)
  np.testing.assert_array_equal(np.asarray(c)[3], far)
  assert not np.any(np.asarray(a) == 3)
  assert np.all(np.isfinite(np.asarray(c)))
  np.testing.assert_allclose(np.asarray(c), ref_lloyd(x, init, 5)[0], atol=1e-5)


# ---- k-means++ ------------------------------------------------------------------------------


def test_kmeans_plus_plus_one_centre_per_blob():
  x, labels = blobs(4, [[0, 0], [50, 0], [0, 50]], 10, scale=0.1)
  init = jax.jit(km.kmeans_plus_plus_init, static_argnums=2)
  for seed in range(5):
    c = np.asarray(init(jax.random.key(seed), x, 3))
    rows = [np.flatnonzero(np.all(x == ci, axis=1)) for ci in c]  # each centre is a row of x
    assert all(len(r) == 1 for r in rows)
    picked = {int(labels[r[0]]) for r in rows}
    assert picked == {0, 1, 2}, (seed, picked)  # so also k distinct rows


# ---- kmeans, on meshes ----------------------------------------------------------------------


@pytest.fixture(scope='module')
def one_device():
  x, labels = blobs(6, CENTRES4, 16)  # N = 64, D = 3
  x = x.astype(np.float64)
  return x, labels, km.kmeans(jax.random.key(3), x, 4, num_iters=6)


def test_kmeans_recovers_blobs(one_device):
  x, labels, (c, a, inertia) = one_device
  assert c.dtype == inertia.dtype == np.float64
  a = np.asarray(a)
  assert len(set(a)) == 4 and all(len(set(a[labels == j])) == 1 for j in range(4))
  c_ref, a_ref, inertia_ref = ref_lloyd(x, c, 0)
  np.testing.assert_array_equal(a, a_ref)
  float64.assert_close(inertia, inertia_ref)


def test_kmeans_cosine_ignores_row_norms():
  x, labels = blobs(7, [[4, 0, 0], [0, 4, 0], [0, 0, 4]], 8)  # three directions
  scale = np.random.default_rng(0).uniform(0.2, 5.0, (len(x), 1)).astype(np.float32)
  c1, a1, _ = km.kmeans(jax.random.key(0), x, 3, num_iters=5, cosine=True)
  _, a2, _ = km.kmeans(jax.random.key(0), x * scale, 3, num_iters=5, cosine=True)
  np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
  assert all(len(set(np.asarray(a1)[labels == j])) == 1 for j in range(3))
  assert np.all(np.linalg.norm(np.asarray(c1), axis=1) <= 1 + 1e-6)  # means of unit vectors


@pytest.mark.parametrize('n', [2, 8])
def test_kmeans_on_mesh_equals_one_device(one_device, n):
  x, _, (c1, a1, i1) = one_device
  mesh = parallel.make_mesh([('data', -1)], jax.devices()[:n])
  c, a, inertia = km.kmeans(jax.random.key(3), x, 4, num_iters=6, mesh=mesh)
  assert len(a.sharding.device_set) == n
  np.testing.assert_array_equal(np.asarray(a), np.asarray(a1))
  assert c.dtype == inertia.dtype == np.float64
  float64.assert_close(c, c1, err_msg='centroids')
  float64.assert_close(inertia, i1, err_msg='inertia')
  if n == 8:  # rows stay on their devices: only [k, D]-sized sums cross, x is never gathered
    xs = jax.device_put(x, parallel.data_sharding(mesh))
    hlo = km._kmeans.lower(jax.random.key(3), xs, k=4, num_iters=6, cosine=False,
                           mesh=mesh).compile().as_text()
    assert 'all-reduce' in hlo and 'f64[8,3]' in hlo  # each device's 8 rows, in float64
    assert not [l for l in hlo.splitlines() if 'all-gather(' in l and 'f64[64,3]' in l]


def test_errors():
  x = np.zeros((6, 2), np.float32)
  with pytest.raises(ValueError, match='1 <= k <= N = 6'):
    km.kmeans(jax.random.key(0), x, 0)
  with pytest.raises(ValueError, match='got k = 7'):
    km.kmeans(jax.random.key(0), x, 7)
  with pytest.raises(ValueError, match=r'x must be \[N, D\]; got shape \(6,\)'):
    km.kmeans(jax.random.key(0), x[:, 0], 2)
  with pytest.raises(ValueError, match='num_iters must be >= 0'):
    km.kmeans(jax.random.key(0), x, 2, num_iters=-1)
  with pytest.raises(ValueError, match='centroids must be'):
    km.lloyd(x, np.zeros((2, 3), np.float32), 1)
  mesh = parallel.make_mesh([('data', -1)], jax.devices()[:4])
  with pytest.raises(ValueError, match="divisible by the mesh 'data' axis size 4"):
    km.kmeans(jax.random.key(0), x, 2, mesh=mesh)
