"""Tower properties that must hold exactly, checked in float64 (tests/float64.py): padding
never reaches the text tower's features, and the ViT keeps float64 inputs in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive import models
from tests import float64
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)
from tests.test_towers import images
from tests.test_towers import random_params
from tests.test_towers import TINY_TEXT
from tests.test_towers import TINY_VIT
from tests.test_towers import TOKENS

# TOKENS with two more pad positions (L = 8 = context) and junk ids after each row's first 0:
# a sequence ends at its first 0, so none of these may change the features.
PADDED = np.array([[5, 7, 9, 2, 0, 0, 0, 0],
                   [3, 0, 13, 1, 0, 19, 0, 2],
                   [4, 4, 6, 8, 1, 11, 0, 7]], np.int32)


@pytest.mark.parametrize('pool,causal', [('eos', False), ('mean', False), ('map', False),
                                         ('eos', True)])
def test_text_padding_invariance(pool, causal):
  model = models.TextTransformer(**TINY_TEXT, pool=pool, causal=causal)
  variables = float64.cast(random_params(model, TOKENS))
  apply = jax.jit(model.apply)
  out, padded = apply(variables, TOKENS), apply(variables, PADDED)
  assert out.dtype == jnp.float64
  float64.assert_close(padded, out, err_msg=pool)
  # Not vacuous: a real token (row 0, position 1; row 1's only token) changes the features.
  changed = TOKENS.copy()
  changed[0, 1], changed[1, 0] = 8, 12
  diff = np.abs(apply(variables, changed) - out)
  assert np.min(np.max(diff[:2], axis=1)) > 1e-6
  np.testing.assert_array_equal(diff[2], 0.0)  # rows are independent


def test_text_sequence_lengths():
  np.testing.assert_array_equal(models.text.sequence_lengths(PADDED), [4, 1, 6])


def test_vit_input_dtypes():
  """uint8 images are scaled to [0, 1]; float64 images and parameters compute in float64."""
  model = models.ViT(**TINY_VIT, pool='map')
  x = images()
  variables = float64.cast(random_params(model, x))
  apply = jax.jit(model.apply)
  from_uint8 = apply(variables, x)
  from_float = apply(variables, x.astype(np.float64) / 255.0)
  assert from_float.dtype == jnp.float64
  # uint8 -> float32 / 255 rounds the pixels to float32: equal to ~1e-7 relative.
  np.testing.assert_allclose(from_uint8, from_float, rtol=1e-5, atol=1e-6)
