"""contrastive.models.conv: values and gradients equal nn.Conv's / lax's, in float64."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.test_util
import numpy as np
import pytest

from contrastive import parallel
from contrastive.models import conv
from contrastive.models import resnet
from tests import float64
from tests.float64 import float64_mode  # pylint: disable=unused-import (autouse fixture)


def _inputs(batch, size, channels, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, channels), jnp.float64)


def _pair(features, kernel_size, strides, x, **kw):
  """(nn.Conv, conv.Conv) and their (identical) float64 parameters."""
  ref = nn.Conv(features, kernel_size, strides, use_bias=False)
  new = conv.Conv(features, kernel_size, strides, **kw)
  params = float64.cast(ref.init(jax.random.key(1), x))
  return ref, new, params


@pytest.mark.parametrize('kernel_size', [(1, 1), (3, 3)])
@pytest.mark.parametrize('strides', [1, 2])
@pytest.mark.parametrize('size', [7, 8])  # odd and even: 'SAME' pads (1, 1) or (0, 1) at stride 2
@pytest.mark.parametrize('max_size', [conv.MAX_SIZE, 2 * 8 * 8 * 9 * 3, 1])  # 1, 2 or 4+ chunks
def test_value_and_gradients_equal_nn_conv(kernel_size, strides, size, max_size):
  x = _inputs(4, size, 3)
  ref, new, params = _pair(5, kernel_size, strides, x, max_size=max_size)
  ct = jax.random.normal(jax.random.key(2), ref.apply(params, x).shape, jnp.float64)

  def loss(module):
    return lambda p, x: jnp.vdot(module.apply(p, x), ct)  # sum(y * ct): any cotangent

  float64.assert_close(new.apply(params, x), ref.apply(params, x))
  new_grads = jax.jit(jax.grad(loss(new), argnums=(0, 1)))(params, x)
  ref_grads = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  float64.assert_close(new_grads, ref_grads)
  assert new_grads[0]['params']['kernel'].shape == (*kernel_size, 3, 5)


def test_kernel_grad_equals_lax_transpose():
  x, dy = _inputs(6, 9, 4), _inputs(6, 5, 7, seed=3)  # stride 2: 9 -> 5
  kernel = jnp.zeros((3, 3, 4, 7), jnp.float64)
  _, vjp = jax.vjp(lambda k: jax.lax.conv_general_dilated(
      x, k, (2, 2), 'SAME', dimension_numbers=conv.DIMENSION_NUMBERS), kernel)
  for max_size, groups in [(conv.MAX_SIZE, 1), (5 * 5 * 9 * 4 * 2, 1), (1, 1),  # 1, 3, 6 chunks
                           (conv.MAX_SIZE, 2), (1, 3), (5 * 5 * 9 * 4, 2), (1, 6)]:
    float64.assert_close(conv.kernel_grad(x, dy, (3, 3), (2, 2), max_size, groups), vjp(dy)[0])
  with pytest.raises(ValueError, match='must divide the batch'):
    conv.kernel_grad(x, dy, (3, 3), (2, 2), groups=4)


@pytest.mark.parametrize('kernel_size,strides', [((3, 3), (1, 1)), ((3, 3), (2, 2)),
                                                 ((1, 1), (2, 2))])
def test_check_grads(kernel_size, strides):
  x = _inputs(2, 5, 2)
  kernel = jax.random.normal(jax.random.key(4), (*kernel_size, 2, 3), jnp.float64)
  fn = lambda x, k: conv.conv2d(x, k, strides, max_size=5 * 5 * 9 * 2)  # 2 chunks for 3x3
  jax.test_util.check_grads(fn, (x, kernel), order=1, modes=('rev',))


def test_same_parameters_as_nn_conv():
  """Same name, shape and initial values as nn.Conv(use_bias=False): checkpoints carry over."""
  x = jnp.zeros((2, 8, 8, 3), jnp.float32)
  for kernel_size in [(1, 1), (3, 3)]:
    ref = nn.Conv(16, kernel_size, 2, use_bias=False).init(jax.random.key(0), x)
    new = conv.Conv(16, kernel_size, 2).init(jax.random.key(0), x)
    assert jax.tree.structure(new) == jax.tree.structure(ref)
    np.testing.assert_array_equal(new['params']['kernel'], ref['params']['kernel'])


def test_sharded_batch_equals_one_device():
  """The kernel gradient's batch chunks split over a 2-device mesh: same gradients."""
  x = _inputs(8, 8, 3)
  ref, new, params = _pair(4, (3, 3), 1, x, max_size=2 * 8 * 8 * 9 * 3)  # 4 chunks of 2
  grad = jax.grad(lambda p, x: jnp.sum(jnp.sin(new.apply(p, x))), argnums=(0, 1))
  mesh = parallel.make_mesh([('data', -1)], jax.devices()[:2])
  sharded = jax.jit(grad, in_shardings=(NamedSharding(mesh, P()), parallel.data_sharding(mesh)))
  float64.assert_close(sharded(params, x), grad(params, x))
  ref_grad = jax.grad(lambda p, x: jnp.sum(jnp.sin(ref.apply(p, x))), argnums=(0, 1))
  float64.assert_close(sharded(params, x), ref_grad(params, x))


def _loops_with_all_reduce(hlo_text):
  """Names of the while-loop bodies of compiled HLO text that contain an all-reduce."""
  bodies = set(re.findall(r'body=%?([\w.\-]+)', hlo_text))
  computations = re.split(r'\n(?=\S.*\{\n)', hlo_text)
  return [c.split(' ', 1)[0].lstrip('%') for c in computations
          if c.split(' ', 1)[0].lstrip('%') in bodies and 'all-reduce' in c]


def test_no_cross_device_reduction_inside_the_chunk_loop(monkeypatch):
  """A ResNet's gradient on a 2-device mesh: each device's partial sums go through the chunk
  loops apart and are reduced once after them. With one group (the counterexample) GSPMD puts
  an all-reduce in every loop iteration, which made XLA:CPU's in-process all-reduce deadlock
  (the devices waited at different all-reduces); it is compiled here, never run."""
  model = resnet.ResNet(stage_sizes=(1,), width=16, stem_strides=1)
  x = _inputs(64, 16, 1)  # 8 groups here (8 devices) of 8 rows: 2 chunks of 4 per 3x3 conv
  variables = model.init(jax.random.key(0), x, train=True)

  def loss(params, x):
    y, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.sum(y**2)

  mesh = parallel.make_mesh([('data', -1)], jax.devices()[:2])
  compiled = lambda: jax.jit(jax.grad(loss), in_shardings=(
      NamedSharding(mesh, P()), parallel.data_sharding(mesh))).lower(
          variables['params'], x).compile().as_text()
  text = compiled()
  assert 'while' in text and 'all-reduce' in text  # chunk loops and the reductions
  assert _loops_with_all_reduce(text) == []
  monkeypatch.setattr(conv, 'default_groups', lambda batch: 1)
  assert _loops_with_all_reduce(compiled())  # the counterexample: inside the loops


def test_matmul_grads_only_where_asked():
  """`matmul_grads=None` follows the backend (the CPU here): a matmul kernel gradient; False:
  XLA's convolutions only, as nn.Conv."""
  x = _inputs(2, 6, 3)
  _, new, params = _pair(4, (3, 3), 1, x)
  _, xla, _ = _pair(4, (3, 3), 1, x, matmul_grads=False)
  jaxpr = lambda module: str(jax.make_jaxpr(jax.grad(
      lambda p: jnp.sum(module.apply(p, x))))(params))
  assert 'dot_general' in jaxpr(new) and 'dot_general' not in jaxpr(xla)
  float64.assert_close(xla.apply(params, x), new.apply(params, x))
  with conv.target_backend('tpu'):  # traced here for a TPU (contrastive/aot.py): XLA's
    assert 'dot_general' not in jaxpr(new)
  assert 'dot_general' in jaxpr(new)


def test_num_chunks():
  assert conv.num_chunks(512, 14 * 14 * 9 * 32, 2**18) == 512 // 4  # 4 examples per chunk
  assert conv.num_chunks(6, 10, 1000) == 1
  assert conv.num_chunks(6, 10, 25) == 3  # 2 examples of 10 each
  assert conv.num_chunks(7, 10, 25) == 7  # a prime batch: one example per chunk
