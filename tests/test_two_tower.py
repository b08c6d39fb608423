"""The two-tower family (CLIP, SigLIP, LiT): the sharded step on 1, 2 and 8 devices, the learned
temperature and bias, LiT's locked tower, initialising from a checkpoint, and config errors.

Device-count comparisons run in float64 (tests/float64.py): every parameter, the temperature
and the bias after 3 AdamW steps agree to rtol 1e-9.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.test_util import check_grads

from contrastive import objectives
from contrastive import parallel
from contrastive import step as step_lib
from contrastive import validate
from contrastive.config_lib import ConfigError
from contrastive.losses import clip_loss
from contrastive.losses import sigmoid_loss
from contrastive.models import two_tower as two_tower_lib
from contrastive.recipes import two_tower
from contrastive.recipes import two_tower_checks
from contrastive.recipes import two_tower_init
from tests import float64
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)

B, S, L, VOCAB = 32, 8, 8, 50
RUNS = tuple((i * B // 4, (i + 1) * B // 4, i % 2 == 1) for i in range(4))  # mixture's layout


def _config(loss_params='siglip', lock=''):
  return ml_collections.ConfigDict(dict(
      batch_size=B, lit=dict(locked_tower=lock), tokenizer=dict(vocab_size=VOCAB, context=L),
      model=dict(image=dict(name='vit', patch=4, width=16, depth=1, heads=2, mlp_dim=32,
                            pool='gap'),
                 text=dict(name='text', width=16, depth=1, heads=2, mlp_dim=32, pool='eos'),
                 embed_dim=8, loss_params=loss_params, logit_scale_init=None,
                 logit_bias_init=-10.0, head_count=3 if loss_params == 'amcl' else 1),
      optimizer=dict(name='adamw', lr=1e-2, scale_lr_by_batch=False, warmup_steps=0,
                     weight_decay=1e-4, momentum=0.9, grad_clip_norm=0.0, logit_lr_mult=10.0)))


def _tokens(rng, *shape):
  """Random texts [*shape, L]: pieces, EOS = 2, then padding."""
  lengths = rng.integers(1, L, shape)
  tokens = rng.integers(3, VOCAB, (*shape, L)).astype(np.int32)
  tokens[np.arange(L) == lengths[..., None]] = 2
  tokens[np.arange(L) > lengths[..., None]] = 0
  return tokens


def _batches(steps, seed=0, extras=False, mixture=False):
  """Images [B, S, S, 3] uint8, tokens [B, L], ids with duplicates (rows 2i and 2i + 1 share
  an id: false negatives the loss must mask); with `extras` also 2 NegCLIP texts and 2 mined
  texts per row (some invalid, the mined ones with other rows' ids); with `mixture` rows
  B/4 ... B/2 - 1 and 3B/4 ... B - 1 text queries (contrastive/data/mixture.py: 'a_text',
  'a_is_text'; RUNS: a mixture of 4 parts in its plan's layout)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    batch = {'a': rng.integers(0, 256, (B, S, S, 3), dtype=np.uint8), 'b': _tokens(rng, B),
             'id': (np.arange(B) // 2).astype(np.int32), 'truncated': np.zeros(B, np.int32)}
    if extras:
      batch.update(b_neg=_tokens(rng, B, 2), b_neg_valid=rng.random((B, 2)) < 0.8,
                   b_hard=_tokens(rng, B, 2), b_hard_valid=rng.random((B, 2)) < 0.8,
                   b_hard_id=rng.integers(0, B // 2, (B, 2)).astype(np.int32))
    if mixture:
      batch.update(a_text=_tokens(rng, B), a_is_text=(np.arange(B) // (B // 4)) % 2 == 1)
    out.append(batch)
  return out


def _run(n, *, loss_params='siglip', block_size=None, lock='', steps=3, dtype=jnp.float64,
         micro_batch_size=0, extras=False, mixup_alpha=0.0, mixture=False, query_runs=None):
  """`steps` updates on n devices (GradCache with micro_batch_size > 0) -> (losses, metrics,
  final state), all on the host."""
  config = _config(loss_params, lock)
  model = two_tower_lib.build_two_tower(two_tower.model_config(config))
  mesh = parallel.make_mesh([('data', -1)], devices=jax.devices()[:n])
  inputs = (np.zeros((2, S, S, 3), np.uint8), np.zeros((2, L), np.int32))
  rng = jax.random.key(0)
  abstract = jax.eval_shape(lambda r: model.init(r, *inputs, train=False), rng)
  tx, schedule = two_tower_init.optimizer(config.optimizer, abstract['params'], steps,
                                          batch_size=config.batch_size,
                                          locked=two_tower_init.LOCKS[lock])
  state = step_lib.create_train_state(model, tx, None, rng, mesh, inputs=inputs, dtype=dtype)
  objective = objectives.two_tower(
      model=model, loss_name=two_tower_checks.LOSS_OF_PARAMS[loss_params],
      locked=two_tower_init.LOCKS[lock], block_size=block_size,
      mesh=mesh if block_size else None, mixup_alpha=mixup_alpha, query_runs=query_runs)
  step = step_lib.jit_train_step(mesh, state, step_fn=step_lib.update, objective=objective,
                                 tx=tx, schedule=schedule, micro_batch_size=micro_batch_size)
  initial = jax.device_get(state)
  losses, metrics = [], []
  for i, batch in enumerate(_batches(steps, extras=extras, mixture=mixture)):
    batch = jax.device_put(batch, parallel.data_sharding(mesh))
    state, m = step(state, batch, jax.random.key(i))
    m = jax.device_get(m)
    losses.append(m['loss'])
    metrics.append(m)
  return initial, losses, metrics, jax.device_get(state)


class _Runs(dict):
  """(loss_params, block_size) -> _run(1, ...), computed on first use."""

  def __missing__(self, key):
    self[key] = _run(1, loss_params=key[0], block_size=key[1])
    return self[key]


@pytest.fixture(scope='module')
def one_device():
  return _Runs()


SLOW = pytest.mark.slow  # make test-all; CI keeps the suite under 10 min


@pytest.mark.parametrize('loss_params, n, block_size', [
    # ('siglip', 8, 2) with more: test_mixture_rows_equal_on_1_and_8_devices (also slow); in CI
    # the two-tower step on 8 devices is test_grad_cache.py::test_two_tower_equals_full_batch
    pytest.param('siglip', 8, None, marks=SLOW), pytest.param('siglip', 8, 2, marks=SLOW),
    pytest.param('clip', 8, None, marks=SLOW),
    pytest.param('clip', 8, 2, marks=SLOW),
    pytest.param('siglip', 2, None, marks=SLOW), pytest.param('siglip', 2, 4, marks=SLOW),
    pytest.param('clip', 2, None, marks=SLOW), pytest.param('clip', 2, 4, marks=SLOW)])
def test_step_equal_on_1_2_8_devices(one_device, loss_params, n, block_size):
  """Dense (XLA-partitioned) and blockwise ring losses over 2 and 8 devices: the same losses,
  metrics and parameters (temperature and bias included) after 3 steps as 1 dense device."""
  _, ref_losses, ref_metrics, ref_state = one_device[(loss_params, None)]
  _, losses, metrics, state = _run(n, loss_params=loss_params, block_size=block_size)
  float64.assert_close(np.array(losses), np.array(ref_losses))
  for m, r in zip(metrics, ref_metrics):
    for k in ('temperature', 'l2_grads', 'pos_sim'):
      float64.assert_close(m[k], r[k], err_msg=k)
  # Attention key biases have an exactly zero gradient (softmax is shift invariant), so Adam
  # turns their float64 round-off (~1e-17) into updates of up to lr * 1e-17 / (1e-17 + eps)
  # ~ 1e-11 per step, in any order: atol 1e-9 is 30x that over 3 steps and still ~1e6x below
  # what a per-device loss or statistic changes (test_distributed's counterexamples).
  float64.assert_close(state.params, ref_state.params, atol=1e-9)
  float64.assert_close(state.opt_state, ref_state.opt_state, atol=1e-9)


@SLOW
@pytest.mark.parametrize('options', [dict(extras=True), dict(mixup_alpha=0.5)],
                         ids=['negclip_and_mined_texts', 'geodesic_mixup'])
def test_negatives_options_equal_on_1_and_8_devices(options):
  """The extra negatives in the step: NegCLIP's and the mined texts (through tower b,
  masked by id), and m^3-Mix's mixes (lambda from the step key): the blockwise ring loss on 8
  devices equals one dense device (losses, metrics, parameters after 3 steps)."""
  _, ref_losses, ref_metrics, ref_state = _run(1, **options)
  _, losses, metrics, state = _run(8, block_size=2, **options)
  float64.assert_close(np.array(losses), np.array(ref_losses))
  for m, r in zip(metrics, ref_metrics):
    for k in ('temperature', 'l2_grads', 'pos_sim'):
      float64.assert_close(m[k], r[k], err_msg=k)
  float64.assert_close(state.params, ref_state.params, atol=1e-9)  # as above
  _, plain, _, _ = _run(1)  # counterexample: the options change the loss
  assert np.min(np.abs(np.array(plain) - np.array(ref_losses))) > 1e-3


@SLOW  # make test-all (CI under 10 min: tests/test_mixture.py checks the slices on one device)
def test_mixture_rows_equal_on_1_and_8_devices():
  """A mixture's text queries (tower b) beside image queries (tower a), with mined texts: each
  tower on its own rows (static slices of the plan's layout) with the blockwise ring loss on
  8 devices equals both towers on every row (`a_is_text` choosing) on one dense device after
  2 steps."""
  _, ref_losses, ref_metrics, ref_state = _run(1, mixture=True, extras=True, steps=2)
  _, losses, metrics, state = _run(8, block_size=2, mixture=True, extras=True, query_runs=RUNS,
                                   steps=2)
  float64.assert_close(np.array(losses), np.array(ref_losses))
  for m, r in zip(metrics, ref_metrics):
    float64.assert_close(m['l2_grads'], r['l2_grads'])
  float64.assert_close(state.params, ref_state.params, atol=1e-9)  # as above


@pytest.mark.slow  # make test-all; CI keeps the suite under 10 min (their gradients are checked in CI)
def test_temperature_and_bias_are_learned(one_device):
  initial, _, metrics, state = one_device[('siglip', None)]
  assert initial.params['logit']['log_scale'] == pytest.approx(np.log(10.0))
  assert initial.params['logit']['bias'] == pytest.approx(-10.0)
  assert state.params['logit']['bias'] != initial.params['logit']['bias']
  assert state.params['logit']['log_scale'] != initial.params['logit']['log_scale']
  float64.assert_close(metrics[0]['temperature'], np.exp(-np.log(10.0)))
  assert 'bias' in metrics[0] and 'bias' not in one_device[('clip', None)][2][0]


def test_false_negatives_are_masked():
  """Rows sharing an id are not negatives: the loss equals the loss with those pairs masked."""
  batch = _batches(1)[0]
  za, zb = jax.random.normal(jax.random.key(1), (2, B, 8), jnp.float64)
  keep = batch['id'][:, None] != batch['id'][None, :]
  for loss in (lambda **kw: clip_loss(za, zb, temperature=0.1, **kw),
               lambda **kw: sigmoid_loss(za, zb, temperature=0.1, bias=-2.0, **kw)):
    from contrastive.losses import blockwise  # pylint: disable=g-import-not-at-top
    masked, _ = loss(negative_mask=blockwise.distinct_ids, mask_ids=(batch['id'], batch['id']))
    dense, _ = loss(negative_mask=keep | np.eye(B, dtype=bool))
    unmasked, _ = loss()
    float64.assert_close(masked, dense)
    assert abs(masked - unmasked) > 1e-3


@pytest.mark.parametrize('loss_fn', ['clip', 'siglip'])
def test_grads_of_temperature_and_bias(loss_fn):
  za, zb = jax.random.normal(jax.random.key(2), (2, 6, 4), jnp.float64)
  if loss_fn == 'clip':
    f = lambda log_scale: clip_loss(za, zb, temperature=jnp.exp(-log_scale))[0]
    check_grads(f, (jnp.float64(np.log(1 / 0.07)),), order=1, modes=['rev'])
  else:
    f = lambda t, b: sigmoid_loss(za, zb, temperature=jnp.exp(-t), bias=b)[0]
    check_grads(f, (jnp.float64(np.log(10.0)), jnp.float64(-10.0)), order=1, modes=['rev'])


@pytest.mark.parametrize('lock, frozen', [
    ('image', ('tower_a', 'proj_a')),
    pytest.param('text', ('tower_b', 'proj_b'), marks=pytest.mark.slow)])
def test_lit_locked_tower_is_bitwise_unchanged_and_has_no_optimizer_state(lock, frozen):
  initial, _, _, state = _run(1, lock=lock, steps=2, dtype=jnp.float32)
  for group in state.params:
    same = jax.tree.map(np.array_equal, state.params[group], initial.params[group])
    assert all(jax.tree.leaves(same)) == (group in frozen), group
  # Optimizer slots exist for the trained groups only: adam's mu and nu, one of each per array.
  trained = sum(x.size for g in state.params if g not in frozen
                for x in jax.tree.leaves(state.params[g]))
  slots = sum(np.size(x) for x in jax.tree.leaves(state.opt_state)
              if np.issubdtype(np.asarray(x).dtype, np.floating))  # not adam's int count
  assert slots == 2 * trained


def _full_config(**changes):
  from contrastive import config_lib  # pylint: disable=g-import-not-at-top
  from tests.test_configs import set_fields  # pylint: disable=g-import-not-at-top
  return set_fields(config_lib.load_config('configs/siglip_emoji.py', 'runlocal'), changes)


@pytest.mark.parametrize('changes, match', [
    ({'model.image.name': 'vitt'}, r"unknown tower name 'vitt'"),
    ({'lit.locked_tower': 'both'}, r"config.lit.locked_tower='both'.*locking both towers"),
    ({'loss.name': 'clip_loss'}, r"does not go with config.model.loss_params='siglip'"),
    ({'dataset.image_size': 30}, r'image_size=30 is not a multiple of the ViT patch size 8'),
    ({'tokenizer.context': 1}, r'context=1 must be >= 2'),
    ({'model.logit_scale_init': 0.0}, r'logit_scale_init=0.0 must be a finite number > 0'),
    ({'model.logit_scale_init': -1.0}, r'logit_scale_init=-1.0 must be a finite number > 0'),
    ({'model.logit_bias_init': float('nan')}, r'logit_bias_init=nan must be a finite number'),
    ({'model_init.workdir': '/nonexistent'}, r'has no checkpoints'),
    ({'model.text.pool': 'max'}, r"config.model: pool must be one of \('eos', 'mean', 'map'"),
    ({'model.image.pool': 'max'}, r"config.model: pool must be one of \('gap', 'cls', 'map'\)"),
    ({'model.image.posemb': 'rope'}, r"posemb must be one of \('learn', 'sincos2d'\)"),
    ({'model.embed_dim': 0}, r'config.model: embed_dim=0 must be an int >= 1'),
    ({'model.text.depth': -1}, r'config.model: depth=-1 must be an int >= 0'),
    ({'model.image.heads': 5}, r'width=\d+ is not a multiple of heads=5'),
    ({'dataset.name': 'foo'}, r"config.dataset.name='foo' is not a pair dataset"),
])
def test_bad_two_tower_configs_fail_before_compiling(changes, match):
  with pytest.raises(validate.ConfigError, match=match):
    validate.validate_config(_full_config(**changes), num_devices=8, num_processes=1)


def test_model_init_copies_groups_and_checks_shapes(one_device, tmp_path):
  """A tower initialised from another run's checkpoint; a shape mismatch is a clear error."""
  from contrastive import checkpoint  # pylint: disable=g-import-not-at-top
  initial, _, _, trained = one_device[('siglip', None)]
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), save_every=1, keep=None)
  ckpt.save(1, trained, {}, force=True)
  ckpt.close()
  params, _ = two_tower_init.init_from_checkpoint(initial.params, {}, str(tmp_path),
                                                  'tower_a:tower_a')
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params['tower_a'],
                                          trained.params['tower_a'])))
  assert not np.array_equal(params['proj_a']['kernel'], trained.params['proj_a']['kernel'])
  with pytest.raises(ConfigError, match='shapes of the checkpoint'):  # a ViT into the text tower
    two_tower_init.init_from_checkpoint(initial.params, {}, str(tmp_path), 'tower_a:tower_b')


def test_lit_tower_is_set_from_the_command_line():
  """`--config.lit.locked_tower=image` parses as contrastive.main parses its flags (the old
  field name `lock` is a ConfigDict method, which config_flags cannot override) and locks
  tower a."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  program = (
      'from absl import app, flags\n'
      'from ml_collections import config_flags\n'
      'from contrastive.recipes import two_tower_checks, two_tower_init\n'
      "config_flags.DEFINE_config_file('config', None, 'c', lock_config=True)\n"
      'app.run(lambda _: print(two_tower_init.LOCKS[two_tower_checks.lit_lock(flags.FLAGS.config)]))\n')
  out = subprocess.run([sys.executable, '-c', program, '--config=configs/siglip_emoji.py:runlocal',
                        '--config.lit.locked_tower=image'], capture_output=True, text=True,
                       cwd=os.path.join(os.path.dirname(__file__), '..'), timeout=120)
  assert out.returncode == 0, out.stderr[-1000:]
  assert out.stdout.strip() == "('tower_a', 'proj_a')"
