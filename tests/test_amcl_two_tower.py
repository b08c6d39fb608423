"""AMCL on the two-tower recipes (configs/clip_emoji.py:amcl): the loss with the recipes'
duplicate-text masks against a NumPy re-derivation, check_grads, 1/2/8 devices in float64
(the loss on a mesh, and whole train steps), the model's heads, config errors, and a run
through contrastive.main."""

import json
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
from contrastive.data import emoji
from contrastive.losses import amcl
from contrastive.losses import blockwise
from contrastive.models import two_tower as two_tower_lib
from contrastive.recipes import two_tower
from tests import float64
from tests import test_two_tower
from tests import xla_flags
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def numpy_masked_amcl(za, zb, taus, ids, beta=0.1, kappa=0.5):
  """From the formula, not the module: per head h, S = A B^T / tau_h of the L2-normalised
  heads; a pair (i, j != i) of the same id is no negative (dropped from row i's and from
  column j's sum); row loss -log(e^S_ii / sum_kept_j e^S_ij), column loss likewise; their
  mean; the heads averaged; plus beta mean_h (kappa log tau_h + 1 / tau_h)."""
  b, h = za.shape[0], len(taus)
  keep = (ids[:, None] != ids[None, :]) | np.eye(b, dtype=bool)
  total = 0.0
  for k, tau in enumerate(taus):
    a = za.reshape(b, h, -1)[:, k]
    c = zb.reshape(b, h, -1)[:, k]
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
    e = np.exp(a @ c.T / tau) * keep
    rows = -np.log(np.diag(e) / e.sum(axis=1))
    cols = -np.log(np.diag(e) / e.sum(axis=0))
    total += 0.5 * (rows.mean() + cols.mean())
  return total / h + beta * np.mean([kappa * np.log(t) + 1 / t for t in taus])


def _inputs(b=16, h=3, d=4, seed=0):
  rng = np.random.default_rng(seed)
  za = rng.standard_normal((b, h * d))
  zb = za + 0.7 * rng.standard_normal((b, h * d))
  ids = (np.arange(b) // 2).astype(np.int32)  # rows 2i, 2i + 1: one text, two images
  return za, zb, np.array([0.1, 0.25, 0.6])[:h], ids


def _loss(block_size=None, mesh=None):
  return lambda a, c, t, ids: amcl.amcl(
      a, c, temperatures=t, negative_mask=blockwise.distinct_ids, mask_ids=(ids, ids),
      block_size=block_size, mesh=mesh)


@pytest.mark.parametrize('block_size', [None, 4])
def test_masked_loss_matches_numpy_and_check_grads(block_size):
  za, zb, taus, ids = _inputs()
  loss, _ = _loss(block_size)(jnp.asarray(za), jnp.asarray(zb), jnp.asarray(taus), ids)
  float64.assert_close(loss, numpy_masked_amcl(za, zb, taus, ids))
  # Counterexample: without the mask the duplicates are negatives, another loss.
  unmasked = numpy_masked_amcl(za, zb, taus, np.arange(len(ids)))
  assert abs(float(loss) - unmasked) > 0.05
  fn = lambda a, c, t: _loss(block_size)(a, c, t, ids)[0]
  check_grads(fn, (jnp.asarray(za), jnp.asarray(zb), jnp.asarray(taus)), order=1,
              modes=['rev'])


@pytest.mark.parametrize('devices', [1, 2, 8])
def test_masked_loss_on_a_mesh_equals_one_device_with_gradients(devices):
  za, zb, taus, ids = _inputs()
  mesh = parallel.make_mesh([('data', -1)], devices=jax.devices()[:devices])
  put = lambda x: jax.device_put(x, parallel.data_sharding(mesh))
  grads = lambda fn: jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))
  want = grads(_loss())(jnp.asarray(za), jnp.asarray(zb), jnp.asarray(taus), ids)
  got = grads(_loss(2, mesh))(put(za), put(zb), jnp.asarray(taus), put(ids))
  float64.assert_close(got[0][0], want[0][0])
  for g, w, name in zip(got[1], want[1], ('za', 'zb', 'temperatures')):
    float64.assert_close(g, w, err_msg=f'd/d{name}')


@pytest.mark.parametrize('n, block_size', [
    (2, None), (2, 4), pytest.param(8, 2, marks=pytest.mark.slow)])
def test_train_steps_equal_on_1_2_8_devices(n, block_size):
  """Three AMCL steps of the two-tower model (3 heads, their temperatures learned): the same
  losses, heads' temperatures and parameters on n devices as on 1 dense device."""
  _, ref_losses, ref_metrics, ref_state = test_two_tower._run(1, loss_params='amcl')
  _, losses, metrics, state = test_two_tower._run(n, loss_params='amcl', block_size=block_size)
  float64.assert_close(np.array(losses), np.array(ref_losses))
  for m, r in zip(metrics, ref_metrics):
    for k in ('temperature/0', 'temperature/2', 'temperature_penalty', 'l2_grads'):
      float64.assert_close(m[k], r[k], err_msg=k)
  assert metrics[-1]['temperature/0'] != pytest.approx(0.1, abs=1e-6)  # learned
  float64.assert_close(state.params, ref_state.params, atol=1e-9)  # as test_two_tower's


def test_model_heads_normalise_to_the_mean_cosine():
  config = test_two_tower._config('amcl')
  model = two_tower_lib.build_two_tower(two_tower.model_config(config))
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), np.uint8)
  tokens = test_two_tower._tokens(np.random.default_rng(1), 4)
  variables = model.init(jax.random.key(0), images, tokens)
  assert variables['params']['logit']['temperature_logit'].shape == (3,)
  za, zb, logit = model.apply(variables, images, tokens)
  assert za.shape == zb.shape == (4, 3 * 8)
  np.testing.assert_allclose(logit['temperatures'], 0.1, rtol=1e-6)  # 1 / logit_scale_init
  ua = model.apply(variables, images, method='encode_image', normalize=True)
  ub = model.apply(variables, tokens, method='encode_text', normalize=True)
  heads = lambda z: np.asarray(z).reshape(4, 3, 8)
  cos = [np.sum(heads(za)[:, h] * heads(zb)[:, h], axis=1) /
         np.linalg.norm(heads(za)[:, h], axis=1) / np.linalg.norm(heads(zb)[:, h], axis=1)
         for h in range(3)]
  # The model computes in float32: 1e-6 is ~10 float32 ulps of these unit-norm values, and
  # ~1e4 times below a wrong normalisation's error (the whole vector's norm: 0.03-0.16 here).
  np.testing.assert_allclose(np.sum(ua * ub, axis=1), np.mean(cos, axis=0), atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(ua, axis=1), 1.0, atol=1e-6)


def _amcl_config(**changes):
  from tests.test_configs import set_fields  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'clip_emoji.py'),
                                  'amcl,runlocal')
  return set_fields(config, changes)


@pytest.mark.parametrize('changes, match', [
    ({'model.head_count': 1}, r"head_count=1 with loss_params='amcl'"),
    ({'loss.beta': -1.0}, r'amcl needs beta >= 0 and kappa > 0'),
    ({'loss.kappa': 0}, r'amcl needs beta >= 0 and kappa > 0'),
    ({'model.logit_scale_init': 0.1}, r'heads start at temperature 1/logit_scale_init'),
    ({'loss.name': 'clip_loss'}, r"does not go with config.model.loss_params='amcl'"),
    ({'negclip.num_negatives': 2}, r'need sigmoid_loss'),
])
def test_bad_amcl_configs_fail_before_compiling(changes, match):
  with pytest.raises(validate.ConfigError, match=match):
    validate.validate_config(_amcl_config(**changes), num_devices=8, num_processes=1)
  plain = config_lib.load_config(os.path.join(REPO, 'configs', 'clip_emoji.py'), 'runlocal')
  plain.model.head_count = 2  # heads without their loss
  with pytest.raises(validate.ConfigError, match="only it uses"):
    validate.validate_config(plain, num_devices=8, num_processes=1)


@pytest.mark.skipif(not os.path.exists(emoji.FONT_PATH),
                    reason='make install (Debian fonts-noto-color-emoji etc.)')
def test_runlocal_trains_and_evaluates_through_main(tmp_path):
  cmd = [sys.executable, '-m', 'contrastive.main',
         f'--config={REPO}/configs/clip_emoji.py:amcl,runlocal', f'--workdir={tmp_path / "run"}',
         f'--config.dataset.data_dir={tmp_path / "tfds"}', '--config.loss.block_size=16']
  env = dict(os.environ, XLA_FLAGS=xla_flags.FAST_COMPILE, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  train = [r for r in rows if 'loss' in r][-1]
  assert {f'temperature/{k}' for k in range(4)} <= set(train)
  assert np.isfinite(train['loss']) and train['temperature_penalty'] > 0
  assert 'a2b/r@1' in rows[-1] and 'zero_shot/top1' in rows[-1]
