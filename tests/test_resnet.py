"""contrastive.models.resnet: the pooling of the last feature map (ResNet.pool)."""

import jax
import jax.numpy as jnp
import pytest

from contrastive.models import resnet
from tests import float64
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)


def _features(pool, x, **kw):
  model = resnet.ResNet(stage_sizes=(1, 1), width=4, stem_strides=2, pool=pool,
                        dtype=jnp.float64, **kw)
  variables = float64.cast(model.init(jax.random.key(0), x, train=False))
  return variables, model.apply(variables, x, train=False)


def test_flatten_keeps_the_map_that_avg_pools():
  """pool='flatten' has the same parameters as 'avg' and returns the last map [N, 7, 7, 8]
  (28 px, stride-2 stem, one stride-2 stage) flattened: its spatial mean is the 'avg'
  features, and the positions differ (a counterexample: a pooled map would not)."""
  x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1), jnp.float64)
  avg_vars, avg = _features('avg', x)
  flat_vars, flat = _features('flatten', x)
  assert jax.tree.structure(avg_vars) == jax.tree.structure(flat_vars)
  assert avg.shape == (3, 8) and flat.shape == (3, 7 * 7 * 8)
  grid = flat.reshape(3, 7, 7, 8)
  float64.assert_close(jnp.mean(grid, axis=(1, 2)), avg)
  assert float(jnp.max(jnp.abs(grid - grid.mean(axis=(1, 2), keepdims=True)))) > 1e-3


def test_unknown_pool():
  with pytest.raises(ValueError, match=r"pool='max' is unknown; choose one of \['avg', 'flatten'\]"):
    _features('max', jnp.zeros((1, 28, 28, 1)))
