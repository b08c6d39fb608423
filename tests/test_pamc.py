"""PamC's meta-node InfoNCE (contrastive/losses/pamc.py): the NumPy re-derivation, gradients,
the exact limit K = B, the error against K, bad inputs, 1 vs 2 vs 8 devices and a runlocal run.

Comparisons run in float64 (tests/float64.py): the sharded runs sum the [K, D] cluster sums in
another order, which float64 keeps ~1e-15 apart, far below the rtol of 1e-9.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from contrastive import parallel
from contrastive import validate
from contrastive.losses import info_nce
from contrastive.losses import pamc
from contrastive.losses import pamc_info_nce
from contrastive.losses import registry
from tests import float64
from tests import reference
from tests import xla_flags
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)
from tests.test_losses_distributed import mesh_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, D, TAU = 24, 8, 0.2


def _pair(seed=0, b=B, d=D):
  rng = np.random.default_rng(seed)
  key = rng.normal(size=(b, d))
  return key + 0.5 * rng.normal(size=(b, d)), key  # (query, key) float64


def _simplex(seed, b, k):
  return np.random.default_rng(seed).dirichlet(np.ones(k), size=b)


def _loss(**kw):
  return lambda q, k: pamc_info_nce(q, k, temperature=TAU, **kw)


# ---- The formula -------------------------------------------------------------------------------


@pytest.mark.parametrize('num_clusters,iterations', [(1, 0), (3, 2), (8, 3), (B, 1)])
def test_matches_numpy_reference(num_clusters, iterations):
  q, k = _pair(1)
  want_c = reference.soft_kmeans(k, num_clusters, iterations, 0.05)
  got_c = pamc.soft_kmeans(jnp.asarray(reference.unit(k)), num_clusters, iterations=iterations,
                           assignment_temperature=0.05, row_ids=jnp.arange(B), total=B)
  float64.assert_close(got_c, want_c)
  loss, metrics = jax.jit(_loss(num_clusters=num_clusters, iterations=iterations,
                                assignment_temperature=0.05))(q, k)
  want_loss, want_accuracy = reference.pamc_info_nce(q, k, TAU, want_c)
  float64.assert_close(loss, want_loss)
  float64.assert_close(metrics['accuracy'], want_accuracy)
  qn, kn = reference.unit(q), reference.unit(k)
  sim = qn @ kn.T
  float64.assert_close(metrics['pos_sim'], np.mean(np.diag(sim)))  # exact, not approximated
  float64.assert_close(metrics['neg_sim'], np.sum(sim - np.diag(np.diag(sim))) / (B * (B - 1)))
  p = want_c.sum(0) / B
  float64.assert_close(metrics['cluster_perplexity'], np.exp(-np.sum(p * np.log(p))))
  float64.assert_close(metrics['cluster_max_mass'], p.max())


def test_learnt_assignments_match_reference_and_get_gradients():
  q, k = _pair(2)
  c = _simplex(3, B, 5)
  loss, _ = pamc_info_nce(q, k, temperature=TAU, num_clusters=5, assignments=c)
  float64.assert_close(loss, reference.pamc_info_nce(q, k, TAU, c)[0])
  fn = lambda q, k, c: pamc_info_nce(q, k, temperature=TAU, num_clusters=5, assignments=c)[0]
  check_grads(jax.jit(fn), (q, k, c), order=1, modes=('rev',), atol=1e-6, rtol=1e-6)
  assert np.abs(jax.grad(fn, argnums=2)(q, k, c)).max() > 1e-3  # learnt C is differentiated


def test_no_gradient_through_the_kmeans():
  """The k-means assignments are constants of the gradient: it equals the gradient of the same
  loss with those assignments passed in and held fixed."""
  q, k = _pair(4)
  kw = dict(temperature=TAU, num_clusters=6, iterations=3, assignment_temperature=0.05)
  c = pamc.soft_kmeans(jnp.asarray(reference.unit(k)), 6, iterations=3,
                       assignment_temperature=0.05, row_ids=jnp.arange(B), total=B)
  grads = jax.grad(lambda q, k: pamc_info_nce(q, k, **kw)[0], argnums=(0, 1))(q, k)
  fixed = jax.grad(lambda q, k: pamc_info_nce(q, k, assignments=c, **kw)[0], argnums=(0, 1))(q, k)
  float64.assert_close(grads, fixed)


def test_one_meta_node_per_key_is_exact_info_nce():
  """K = B with C = I: every key is its own meta-node, the leave-one-out mass of the row's own
  key is 0, and the loss, its gradients and the accuracy are InfoNCE's."""
  q, k = _pair(5)
  exact = jax.value_and_grad(lambda q, k: info_nce(q, k, temperature=TAU)[0], argnums=(0, 1))
  eye = jnp.eye(B)
  ours = jax.value_and_grad(lambda q, k: pamc_info_nce(
      q, k, temperature=TAU, num_clusters=B, assignments=eye)[0], argnums=(0, 1))
  float64.assert_close(ours(q, k), exact(q, k))
  metrics = pamc_info_nce(q, k, temperature=TAU, num_clusters=B, assignments=eye)[1]
  float64.assert_close(metrics['accuracy'], info_nce(q, k, temperature=TAU)[1]['accuracy'])
  # The k-means path gets there too: K = B starts at every key; hard assignments ~ C = I.
  sharp = pamc_info_nce(q, k, temperature=TAU, num_clusters=B, iterations=0,
                        assignment_temperature=1e-3)[0]
  np.testing.assert_allclose(sharp, info_nce(q, k, temperature=TAU)[0], rtol=1e-8)


@pytest.mark.parametrize('num_clusters', [1, 4, 12])
def test_never_above_info_nce(num_clusters):
  """Jensen: each meta-node's term n exp(mean s / tau) <= the sum of exp(s / tau) it replaces."""
  for seed in range(3):
    q, k = _pair(seed)
    exact = info_nce(q, k, temperature=TAU)[0]
    c = _simplex(seed, B, num_clusters)
    for kw in (dict(), dict(assignments=c)):
      assert pamc_info_nce(q, k, temperature=TAU, num_clusters=num_clusters, **kw)[0] <= exact


def test_error_shrinks_as_k_grows_on_clustered_keys():
  rng = np.random.default_rng(0)
  b, d = 128, 16
  centres = rng.normal(size=(8, d))
  key = centres[rng.integers(0, 8, b)] + 0.15 * rng.normal(size=(b, d))
  query = key + 0.15 * rng.normal(size=(b, d))
  exact = float(info_nce(query, key, temperature=TAU)[0])
  errors = [(exact - float(pamc_info_nce(query, key, temperature=TAU, num_clusters=k)[0])) / exact
            for k in (1, 4, 16, 128)]
  assert all(e >= 0 for e in errors), errors
  assert errors == sorted(errors, reverse=True) and errors[0] > 0.3 and errors[2] < 0.01, errors


def test_bfloat16_inputs():
  q, k = (jnp.asarray(x, jnp.bfloat16) for x in _pair(6))
  value = lambda q, k: _loss(num_clusters=4)(q, k)[0]
  loss, grads = jax.jit(jax.value_and_grad(value, argnums=(0, 1)))(q, k)
  assert loss.dtype == jnp.float32 and all(g.dtype == jnp.bfloat16 for g in grads)
  np.testing.assert_allclose(loss, value(q.astype(jnp.float32), k.astype(jnp.float32)), rtol=2e-2)
  same = jnp.ones((8, 4), jnp.bfloat16)  # every key equal: the loss is log B
  np.testing.assert_allclose(jax.jit(value)(same, same), np.log(8), rtol=1e-2)


# ---- Bad inputs: one line, before anything is compiled ------------------------------------------


@pytest.mark.parametrize('kwargs,message', [
    (dict(num_clusters=0), r'num_clusters must be an int in \[1, B = 24\]'),
    (dict(num_clusters=25), r'num_clusters must be an int in \[1, B = 24\] \(query: \(24, 8\)\)'),
    (dict(num_clusters=2.0), 'got 2.0'),
    (dict(num_clusters=4, temperature=0.0), 'temperature must be > 0'),
    (dict(num_clusters=4, iterations=-1), 'iterations must be an int >= 0'),
    (dict(num_clusters=4, assignment_temperature=0.0), 'assignment_temperature must be'),
    (dict(num_clusters=4, assignments=np.ones((24, 3))),
     r'assignments must be \[B, K\] = \(24, 4\)'),
    (dict(num_clusters=4, key=np.ones((23, 8))), r'query: \(24, 8\), key: \(23, 8\)'),
    (dict(num_clusters=4, mesh='5'), r'B = 24 must be divisible'),
])
def test_bad_inputs_raise_before_compiling(kwargs, message):
  q, k = _pair(0)
  k = kwargs.pop('key', k)
  kwargs.setdefault('temperature', TAU)
  if kwargs.get('mesh') == '5':
    kwargs['mesh'] = jax.sharding.Mesh(np.array(jax.devices()[:5]), ('data',))
  with pytest.raises(ValueError, match=message):
    jax.jit(lambda q, k: pamc_info_nce(q, k, **kwargs)).lower(q, k)


@pytest.mark.parametrize('fields,message', [
    (dict(name='pamc', temperature=0.1, num_clusters=4), "config.loss.name='pamc' is unknown"),
    (dict(name='pamc_info_nce', temperature=0.1), 'config.loss.num_clusters is missing'),
    (dict(name='pamc_info_nce', temperature=0.1, num_clusters=0),
     'config.loss.num_clusters=0 must be an int >= 1'),
    (dict(name='pamc_info_nce', temperature=0.1, num_clusters=4, iterations=-2),
     'config.loss.iterations=-2 must be an int >= 0'),
    (dict(name='pamc_info_nce', temperature=0.1, num_clusters=4, block_size=8),
     "config.loss.block_size is not an argument of the 'pamc_info_nce' loss"),
])
def test_bad_loss_config_raises(fields, message):
  with pytest.raises(ValueError, match=message):
    registry.check_loss_config(ml_collections.ConfigDict(fields))


def test_config_with_more_clusters_than_rows_is_refused():
  from tests.test_configs import load_config  # pylint: disable=g-import-not-at-top
  config = load_config(os.path.join(REPO, 'configs', 'simclr_fmnist.py'),
                       'runlocal,loss=pamc_info_nce')
  config.loss.num_clusters = 65
  with pytest.raises(validate.ConfigError, match='num_clusters=65 must be <= config.batch_size=64'):
    validate.validate_config(config, num_devices=2, num_processes=1)


# ---- 1, 2 and 8 devices --------------------------------------------------------------------------


@pytest.mark.parametrize('path', ['mesh', 'global', 'learnt_mesh'])
def test_loss_and_grads_equal_on_1_2_8_devices(path):
  """mesh: shard_map with psums; global: the loss on global arrays, batch-sharded under jit
  (XLA partitions it); learnt_mesh: given assignments, sharded with the rows."""
  q, k = _pair(7, b=32)
  c = _simplex(8, 32, 6) if path == 'learnt_mesh' else None
  value = lambda q, k, **kw: pamc_info_nce(q, k, temperature=TAU, num_clusters=6, **kw)[0]
  want = jax.value_and_grad(lambda q, k: value(q, k, assignments=c), argnums=(0, 1))(q, k)
  for n in (1, 2, 8):
    mesh = mesh_of(n)
    sharding = parallel.data_sharding(mesh)
    kw = {} if path == 'global' else dict(mesh=mesh)
    if c is not None:
      kw['assignments'] = jax.device_put(c, sharding)
    step = jax.jit(jax.value_and_grad(lambda q, k, kw=kw: value(q, k, **kw), argnums=(0, 1)))
    loss, grads = step(jax.device_put(q, sharding), jax.device_put(k, sharding))
    assert loss.sharding.is_fully_replicated and grads[0].sharding.spec == P(parallel.DATA)
    float64.assert_close(jax.device_get((loss, grads)), want, err_msg=f'{path}, {n} devices')


def test_only_cluster_sums_cross_devices():
  """The mesh path all-reduces [K, D] sums and [K] masses; no device gathers the keys, and the
  loss with per-device meta-nodes (the bug this would hide) is another loss."""
  q, k = _pair(9, b=32)
  mesh = mesh_of(8)
  sharding = parallel.data_sharding(mesh)
  q, k = (jax.device_put(x, sharding) for x in (q, k))
  step = jax.jit(jax.grad(lambda q, k: _loss(num_clusters=6, mesh=mesh)(q, k)[0], argnums=(0, 1)))
  hlo = step.lower(q, k).compile().as_text()
  assert 'all-reduce' in hlo and 'all-gather' not in hlo and 'collective-permute' not in hlo
  local = jax.jit(jax.shard_map(lambda q, k: jax.lax.pmean(_loss(num_clusters=2)(q, k)[0], 'data'),
                                mesh=mesh, in_specs=(P('data'), P('data')), out_specs=P()))
  assert abs(local(q, k) - _loss(num_clusters=2)(q, k)[0]) > 1e-2


def test_registry_pair_binds_the_mesh():
  z1, z2 = _pair(10, b=32)
  cfg = ml_collections.ConfigDict(dict(name='pamc_info_nce', temperature=TAU, num_clusters=6))
  mesh = mesh_of(8)
  fn = registry.pair_loss_from_config(cfg, mesh=mesh)
  assert fn.keywords['mesh'] is mesh
  sharding = parallel.data_sharding(mesh)
  got = jax.jit(fn)(jax.device_put(z1, sharding), jax.device_put(z2, sharding))[0]
  both = 0.5 * (_loss(num_clusters=6)(z1, z2)[0] + _loss(num_clusters=6)(z2, z1)[0])
  float64.assert_close(got, both)


# ---- Through contrastive.main --------------------------------------------------------------------


def _main(tmp_path, *overrides):
  cmd = [sys.executable, '-m', 'contrastive.main',
         f'--config={REPO}/configs/simclr_fmnist.py:runlocal,loss=pamc_info_nce',
         f'--workdir={tmp_path}/run', *overrides]
  env = dict(os.environ, XLA_FLAGS=xla_flags.with_devices(2), JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO)
  return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)


@pytest.mark.slow
def test_runlocal_trains_with_pamc(tmp_path):
  out = _main(tmp_path, '--config.loss.num_clusters=16', '--config.total_steps=3')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'step 3/3' in out.stdout and 'knn_top1' in out.stdout
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    rows = [r for r in map(json.loads, f) if 'loss' in r]
  assert [r['step'] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r['loss']) and 1 <= r['cluster_perplexity'] <= 16 for r in rows)


def test_runlocal_refuses_too_many_clusters_in_one_line(tmp_path):
  out = _main(tmp_path, '--config.loss.num_clusters=65')
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == (
      'ERROR: ConfigError: config.loss.num_clusters=65 must be <= config.batch_size=64: at most '
      'one meta-node per key.')
  assert 'Traceback' not in out.stderr
