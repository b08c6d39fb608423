"""Bad loss inputs and configs fail with clear messages; every registered loss runs from a config."""

import functools
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from contrastive import losses
from contrastive import parallel
from contrastive.losses import registry
from tests import float64
from tests.test_distributed import mesh_of
from tests.test_losses import normal
from tests.test_losses import PAIR_KWARGS


@pytest.mark.parametrize('name', sorted(registry.PAIR_LOSSES))
def test_every_registered_loss_builds_and_runs(name):
  arguments = registry.loss_arguments(name)
  kw = {k: PAIR_KWARGS[k] for k, required in arguments.items() if required}
  cfg = ml_collections.ConfigDict(dict(name=name, **kw))
  learned = {'temperatures': np.array([0.2, 0.5])} if name == 'amcl' else {}  # the model's
  fn = functools.partial(registry.pair_loss_from_config(cfg), **learned)
  z1, z2 = normal(18, 8, 4), normal(19, 8, 4)
  loss, metrics = jax.jit(fn)(z1, z2)
  assert np.isfinite(float(loss))
  assert {'accuracy', 'pos_sim', 'neg_sim'} <= set(metrics)
  if 'block_size' in arguments:  # the blockwise path, selected from the config, in float64
    with float64.enabled():      # (tests/float64.py: reordered sums compared at rtol 1e-9)
      z1, z2 = float64.cast((z1, z2))
      loss = jax.jit(fn)(z1, z2)[0]
      blocked = functools.partial(registry.pair_loss_from_config(
          ml_collections.ConfigDict(dict(name=name, block_size=3, **kw))), **learned)
      float64.assert_close(jax.jit(blocked)(z1, z2)[0], loss)
      mesh = mesh_of(2)
      gathered = functools.partial(registry.pair_loss_from_config(ml_collections.ConfigDict(
          dict(name=name, block_size=3, collective='all_gather', **kw)), mesh=mesh), **learned)
      z1, z2 = (jax.device_put(z, parallel.data_sharding(mesh)) for z in (z1, z2))
      float64.assert_close(jax.jit(gathered)(z1, z2)[0], loss)


@pytest.mark.parametrize('fields,message', [
    (dict(name='infonce'), "config.loss.name='infonce' is unknown; choose one of"),
    (dict(name='dcl', temperature=-1.0), 'config.loss.temperature=-1.0 must be > 0'),
    (dict(name='dcl', temperature=0.1, tau_plus=0.1),
     "config.loss.tau_plus is not an argument of the 'dcl' loss"),
    (dict(name='dclw', temperature=0.1, sigma=-1.0), 'config.loss.sigma=-1.0 must be > 0'),
    (dict(name='sigmoid_loss', temperature=0.1), "config.loss.bias is missing"),
    (dict(name='debiased_info_nce', temperature=0.1, tau_plus=1.0),
     r'config.loss.tau_plus=1.0 must be in \[0, 1\)'),
    (dict(name='clip_loss', temperature=0.1, block_size=4, collective='tree'),
     r"config.loss.collective='tree' must be one of \('ring', 'all_gather'\)"),
    (dict(name='clip_loss', temperature=0.1, collective='all_gather'),
     'config.loss.collective only acts on the blockwise path'),
])
def test_bad_loss_config_raises(fields, message):
  with pytest.raises(ValueError, match=message):
    registry.check_loss_config(ml_collections.ConfigDict(fields))


def test_bad_inputs_raise():
  x = jnp.ones((3, 4))
  with pytest.raises(ValueError, match='temperature must be > 0'):
    losses.info_nce(x, x, temperature=0.0)
  with pytest.raises(ValueError, match=r'extra_negatives: \(2, 5\)'):
    losses.info_nce(x, x, temperature=0.1, extra_negatives=jnp.ones((2, 5)))
  with pytest.raises(ValueError, match=r'negative_mask must be bool \[B, B \+ M\] = \(3, 5\)'):
    losses.info_nce(x, x, temperature=0.1, extra_negatives=jnp.ones((2, 4)),
                    negative_mask=jnp.ones((3, 3), bool))
  with pytest.raises(ValueError, match=r'tau_plus must be in \[0, 1\)'):
    losses.debiased_info_nce(x, x, temperature=0.1, tau_plus=-0.1)
  with pytest.raises(ValueError, match=r'labels: \(2,\)'):
    losses.supcon(x, jnp.zeros(2, jnp.int32), temperature=0.1)
  with pytest.raises(ValueError, match=r'z1: \(3, 4\), z2: \(2, 4\)'):
    losses.dcl(x, x[:2], temperature=0.1)
  with pytest.raises(ValueError, match='sigma must be > 0, got -1.0'):
    losses.dclw(x, x, temperature=0.1, sigma=-1.0)
  with pytest.raises(ValueError, match=r'za: \(3, 4\), zb: \(2, 4\)'):
    losses.sigmoid_loss(x, x[:2], temperature=0.1, bias=0.0)
