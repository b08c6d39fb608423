"""AMCL (contrastive/losses/amcl.py) against a plain NumPy re-derivation, its gradients, its
paths (dense, blockwise, a mesh of 1, 2 and 8 devices) in float64, what its temperature
penalty does, and the recipe through contrastive.main."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from contrastive import config_lib
from contrastive import parallel
from contrastive import validate
from contrastive.data import fashion_mnist
from contrastive.losses import amcl
from contrastive.models import build_model
from tests import float64
from tests import xla_flags
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def numpy_amcl(z1, z2, taus, beta, kappa):
  """Written from the formula, not the module: per head h the cosine matrix S = Z1 Z2^T of the
  L2-normalised views, the two InfoNCE directions -mean_i log softmax(S / tau_h)_ii (rows,
  then columns), their mean; the heads averaged; plus beta mean_h (kappa log tau_h + 1 / tau_h)."""
  b, h = z1.shape[0], len(taus)
  z1, z2 = z1.reshape(b, h, -1), z2.reshape(b, h, -1)
  total = 0.0
  for k, tau in enumerate(taus):
    a = z1[:, k] / np.linalg.norm(z1[:, k], axis=1, keepdims=True)
    c = z2[:, k] / np.linalg.norm(z2[:, k], axis=1, keepdims=True)
    s = a @ c.T / tau
    rows = np.log(np.exp(s).sum(axis=1)) - np.diag(s)
    cols = np.log(np.exp(s).sum(axis=0)) - np.diag(s)
    total += 0.5 * (rows.mean() + cols.mean())
  penalty = np.mean([kappa * np.log(t) + 1.0 / t for t in taus])
  return total / h + beta * penalty


def inputs(b=8, h=3, d=5, seed=0):
  rng = np.random.default_rng(seed)
  z1 = rng.standard_normal((b, h * d))
  z2 = z1 + 0.5 * rng.standard_normal((b, h * d))
  return z1, z2, np.array([0.1, 0.3, 0.7])[:h]


@pytest.mark.parametrize('block_size', [None, 3])
def test_matches_numpy_and_check_grads(block_size):
  z1, z2, taus = inputs()
  loss, metrics = amcl.amcl(jnp.asarray(z1), jnp.asarray(z2), temperatures=jnp.asarray(taus),
                            beta=0.1, kappa=0.5, block_size=block_size)
  float64.assert_close(loss, numpy_amcl(z1, z2, taus, 0.1, 0.5))
  assert metrics['temperature/2'] == pytest.approx(0.7)
  fn = lambda a, c, t: amcl.amcl(a, c, temperatures=t, beta=0.1, kappa=0.5,
                                 block_size=block_size)[0]
  check_grads(fn, (jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(taus)), order=1,
              modes=['rev'])
  # Counterexample: one temperature for every head is another loss.
  same = numpy_amcl(z1, z2, np.full(3, taus.mean()), 0.1, 0.5)
  assert abs(float(loss) - same) > 0.05


@pytest.mark.parametrize('devices', [1, 2, 8])
def test_mesh_of_devices_equals_one_device_with_gradients(devices):
  z1, z2, taus = inputs(b=16)
  mesh = parallel.make_mesh([('data', -1)], devices=jax.devices()[:devices])
  sharding = parallel.data_sharding(mesh)

  def value_and_grads(block_size, mesh):
    fn = lambda a, c, t: amcl.amcl(a, c, temperatures=t, block_size=block_size, mesh=mesh)[0]
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))

  want = value_and_grads(None, None)(jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(taus))
  got = value_and_grads(2, mesh)(jax.device_put(z1, sharding), jax.device_put(z2, sharding),
                                 jnp.asarray(taus))
  float64.assert_close(got[0], want[0])
  for g, w, name in zip(got[1], want[1], ('z1', 'z2', 'temperatures')):
    float64.assert_close(g, w, err_msg=f'd/d{name}')


def test_penalty_keeps_the_temperatures_from_collapsing():
  """Gradient descent on the temperatures alone, embeddings fixed with every positive first:
  without the penalty (beta = 0) each temperature falls towards the lower limit; with it each
  stops at an interior value."""
  z1, z2, _ = inputs(b=8, h=2)
  z2 = z1 + 0.01 * np.random.default_rng(1).standard_normal(z1.shape)  # positives rank first

  def descend(beta, steps=300):
    logits = jnp.full(2, amcl.temperature_logit(0.5))
    loss = lambda t: amcl.amcl(z1, z2, temperatures=amcl.head_temperatures(t), beta=beta)[0]
    grad = jax.jit(jax.grad(loss))
    for _ in range(steps):
      logits = logits - 2.0 * grad(logits)
    return np.asarray(amcl.head_temperatures(logits)), np.asarray(grad(logits))

  free, push = descend(0.0)
  assert np.all(free < 0.06) and np.all(push > 0), (free, push)  # still falling
  held, rest = descend(0.1)
  assert np.all(held > 0.15) and np.all(held < 1.0) and np.all(np.abs(rest) < 1e-6), held


def test_model_has_its_heads_and_temperatures():
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'simclr_fmnist.py'),
                                  'runlocal,loss=amcl')
  model = build_model(config.model)
  variables = model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=False)
  head = variables['params']['head']
  assert sorted(k for k in head if k.startswith('heads_')) == [f'heads_{k}' for k in range(4)]
  np.testing.assert_allclose(head['temperature_logit'], amcl.temperature_logit(0.1))
  temps = model.apply(variables, method='loss_params')['temperatures']
  np.testing.assert_allclose(temps, 0.1, rtol=1e-6)
  _, z = model.apply(variables, jnp.zeros((2, 28, 28, 1)), train=False)
  assert z.shape == (2, 4 * config.model.head_out_dim)


@pytest.mark.parametrize('changes, match', [
    ({'model.head_count': 1}, r'the amcl loss takes H >= 2 heads'),
    ({'loss.beta': -1.0}, r'amcl needs beta >= 0 and kappa > 0'),
    ({'loss.kappa': 0.0}, r'amcl needs beta >= 0 and kappa > 0'),
    ({'model.head_temperature': 3.0}, r'head_temperature=3.0 must lie in'),
    ({'samplers.mining_k': 8}, r"config.loss.name='amcl': the momentum encoder, queue, samplers"),
])
def test_bad_amcl_configs_fail_before_compiling(changes, match):
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'simclr_fmnist.py'),
                                  'runlocal,loss=amcl')
  config.dataset.name = 'not_local'
  for field, value in changes.items():
    section, _, name = field.rpartition('.')
    (config[section] if section else config)[name] = value
  with pytest.raises(validate.ConfigError, match=match):
    validate.validate_config(config, num_devices=1, num_processes=1)
  plain = config_lib.load_config(os.path.join(REPO, 'configs', 'simclr_fmnist.py'), 'runlocal')
  plain.dataset.name, plain.model.head_count = 'not_local', 3  # heads without their loss
  with pytest.raises(validate.ConfigError, match='only it uses them'):
    validate.validate_config(plain, num_devices=1, num_processes=1)


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_IDX_DIR),
                    reason='apt-get install dataset-fashion-mnist')
def test_runlocal_trains_through_main(tmp_path):
  cmd = [sys.executable, '-m', 'contrastive.main',
         f'--config={REPO}/configs/simclr_fmnist.py:runlocal,loss=amcl',
         f'--workdir={tmp_path / "run"}', f'--config.dataset.data_dir={tmp_path / "tfds"}',
         '--config.loss.block_size=16']
  env = dict(os.environ, XLA_FLAGS=xla_flags.FAST_COMPILE, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  assert 'step 6/6' in out.stdout and 'knn_top1' in out.stdout
  import json  # pylint: disable=g-import-not-at-top
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    last = [json.loads(line) for line in f if '"loss"' in line][-1]
  assert {f'temperature/{k}' for k in range(4)} <= set(last)
  assert np.isfinite(last['loss']) and last['temperature_penalty'] > 0
