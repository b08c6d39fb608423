"""NegCLIP in the two-tower objective (config.negclip): word-order perturbations of each text b
as extra negatives of SigLIP's loss, against a NumPy re-derivation; the held-out order test and
the per-row determinism of the perturbations are in tests/test_negclip.py and here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive import objectives
from contrastive.losses import blockwise
from contrastive.losses import sigmoid_loss
from contrastive.negatives import negclip
from tests import reference
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)


def siglip_with_negclip_numpy(za, zb, zneg, valid, ids, t, bias):
  """-(1/B) sum_i sum_j log sigmoid(y_ij (s_ij / t + b)) over the columns zb_1..zb_B and the
  B P perturbations; y = +1 only for (i, i). Dropped: in-batch j != i with ids_j = ids_i, and
  every invalid perturbation (it is text b_k itself: a negative of no row); a valid
  perturbation is a negative of every row, its own included."""
  b, p, _ = zneg.shape
  other_group = ids[None, :] != ids[:, None]  # [B, B]: ids_k != ids_i
  keep_neg = np.broadcast_to(valid.reshape(1, b * p), (b, b * p))  # [B, B P]
  return reference.sigmoid_loss(za, zb, t, bias, extra=zneg.reshape(b * p, -1),
                                mask=np.concatenate([other_group, keep_neg], axis=1))


@pytest.mark.parametrize('block_size', [None, 4])
def test_negclip_negatives_in_sigmoid_loss_match_numpy(block_size):
  rng = np.random.default_rng(0)
  b, p, d = 6, 2, 5
  za, zb = rng.standard_normal((2, b, d))
  zneg = rng.standard_normal((b, p, d))
  ids = np.array([0, 1, 1, 2, 3, 3])  # rows 1, 2 and 4, 5 share a group
  valid = np.array([[1, 1], [1, 0], [0, 0], [1, 1], [1, 1], [0, 1]], bool)
  batch = {'id': jnp.asarray(ids), 'b_neg_valid': jnp.asarray(valid)}
  z = (jnp.asarray(za), jnp.asarray(zb), {'b_neg': jnp.asarray(zneg)})
  args = {} if block_size is None else dict(block_size=block_size)
  negatives = objectives.text_negatives(z, batch)
  assert negatives['negative_mask'] is blockwise.distinct_valid_ids
  loss, _ = sigmoid_loss(za, zb, temperature=0.5, bias=-1.0, **negatives, **args)
  want = siglip_with_negclip_numpy(za, zb, zneg, valid, ids, 0.5, -1.0)
  np.testing.assert_allclose(loss, want, rtol=1e-12)
  # Counterexample: giving the perturbations their rows' ids would drop each from its own row.
  wrong = dict(objectives.text_negatives(z, batch))
  wrong['mask_ids'] = (batch['id'], jnp.concatenate([batch['id'], jnp.repeat(batch['id'], p)]))
  bad, _ = sigmoid_loss(za, zb, temperature=0.5, bias=-1.0, **wrong, **args)
  assert abs(float(bad) - want) > 0.1


@pytest.mark.parametrize('block_size', [None, 2])
@pytest.mark.parametrize('name', ['b_neg', 'b_hard'])
def test_invalid_extra_negatives_are_no_negative_of_any_row(name, block_size):
  """B = 4, K = 2 extra texts per row, all invalid (NegCLIP's one-word captions; ANCE before its
  first refresh): the loss is the plain loss, as if there were no extras."""
  rng = np.random.default_rng(1)
  za, zb = rng.standard_normal((2, 4, 3))
  ids = jnp.arange(4)
  batch = {'id': ids, name + '_valid': jnp.zeros((4, 2), bool)}
  if name == 'b_hard':
    batch['b_hard_id'] = jnp.repeat(ids, 2).reshape(4, 2)
  own_text = np.repeat(zb[:, None], 2, axis=1)  # an invalid entry's tokens: the row's text
  z = (jnp.asarray(za), jnp.asarray(zb), {name: jnp.asarray(own_text)})
  args = dict(temperature=0.5, bias=-1.0)
  args.update({} if block_size is None else dict(block_size=block_size))
  loss, _ = sigmoid_loss(za, zb, **objectives.text_negatives(z, batch), **args)
  plain, _ = sigmoid_loss(za, zb, mask_ids=(ids, ids), negative_mask=blockwise.distinct_ids,
                          **args)
  np.testing.assert_allclose(loss, plain, rtol=1e-12)
  # Counterexample: the row ids the invalid entries had made them negatives of the other rows.
  old = dict(objectives.text_negatives(z, batch))
  old['mask_ids'] = (ids, jnp.concatenate([ids, jnp.repeat(ids, 2)]))
  assert float(sigmoid_loss(za, zb, **old, **args)[0]) - float(plain) > 0.1


def test_without_negclip_only_the_ids():
  batch = {'id': jnp.arange(3)}
  out = objectives.text_negatives((jnp.zeros((3, 2)), jnp.zeros((3, 2))), batch)
  assert set(out) == {'mask_ids', 'negative_mask'}
  assert out['negative_mask'] is blockwise.distinct_ids


@pytest.mark.slow  # make test-all; CI keeps the suite under 10 min
def test_gradients_reach_the_perturbations():
  rng = np.random.default_rng(1)
  za, zb = rng.standard_normal((2, 4, 3))
  zneg = rng.standard_normal((4, 2, 3))
  batch = {'id': jnp.arange(4), 'b_neg_valid': jnp.ones((4, 2), bool)}

  def loss(zneg):
    z = (jnp.asarray(za), jnp.asarray(zb), {'b_neg': zneg})
    return sigmoid_loss(za, zb, temperature=0.5, bias=-1.0,
                        **objectives.text_negatives(z, batch))[0]
  g = jax.grad(loss)(jnp.asarray(zneg))
  assert np.all(np.abs(np.asarray(g)).max(axis=-1) > 1e-4)


def test_negative_captions_by_row_index_do_not_depend_on_the_batch():
  captions = [f'a red dog number {i} chases the cat' for i in range(8)]
  whole, whole_valid = negclip.negative_captions(captions, 2, seed=3)
  part, part_valid = negclip.negative_captions([captions[5], captions[2]], 2, seed=3,
                                               indices=[5, 2])
  assert part == [whole[5], whole[2]]
  np.testing.assert_array_equal(part_valid, whole_valid[[5, 2]])
  with pytest.raises(ValueError, match='indices must be 2 ints >= 0'):
    negclip.negative_captions(captions[:2], 2, seed=3, indices=[1])


def test_negclip_with_clip_loss_is_a_one_line_config_error():
  from contrastive import config_lib  # pylint: disable=g-import-not-at-top
  from contrastive import validate  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), '..', 'configs', 'clip_emoji.py')
  config = config_lib.load_config(path, 'runlocal')
  config.negclip.num_negatives = 2
  with pytest.raises(validate.ConfigError, match="negclip.num_negatives=2: .* need sigmoid_loss "
                     r"\(got 'clip_loss'\)") as e:
    validate.validate_config(config, num_devices=8, num_processes=1)
  assert '\n' not in str(e.value)
