"""ResNets for small images (28-32 px), CIFAR-style stem, in Flax Linen.

The stem is a single 3x3 stride-1 convolution with no max-pool (He et al. 2016, section 4.2;
the SimCLR CIFAR-10 variant, Chen et al. 2020, appendix B.9), so a 28x28 input keeps its
resolution in the first stage. Stage i (i >= 1) halves the resolution and doubles the width.

BatchNorm statistics are computed over whatever batch the module sees. Under `jax.jit` with
the batch sharded over a mesh, that is the *global* batch: XLA inserts the cross-device
reductions, so no `axis_name` is needed (and none must be set, or the stats would be local).

Convolutions are `conv.Conv` (nn.Conv's parameters; on the CPU its kernel gradients are
matmuls, as fast as XLA:CPU's own with jax 0.10.2; elsewhere XLA's convolution).

`dtype` (`compute.py`) is the compute dtype of the convolutions and activations; BatchNorm
takes its statistics in float32 and keeps float32 running averages. `remat` wraps each
residual block in `nn.remat` with a policy of `compute.REMAT_POLICIES` (same parameters).
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from contrastive.models import compute
from contrastive.models import conv


def _layers(train: bool, dtype: Any):
  """(Conv, BatchNorm) constructors of a block: compute dtype `dtype`, BatchNorm in training
  or inference mode."""
  return (functools.partial(conv.Conv, dtype=dtype),
          functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                            dtype=compute.flax_dtype(dtype)))


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut.

  `train` may be passed positionally (the remat'd block takes it as static argument 2)."""
  filters: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv_, norm = _layers(train, self.dtype)
    y = conv_(self.filters, (3, 3), self.strides, name='conv1')(x)
    y = nn.relu(norm(name='bn1')(y))
    y = conv_(self.filters, (3, 3), name='conv2')(y)
    y = norm(name='bn2', scale_init=nn.initializers.zeros)(y)
    if x.shape[-1] != self.filters or self.strides != 1:
      x = conv_(self.filters, (1, 1), self.strides, name='proj')(x)
      x = norm(name='proj_bn')(x)
    return nn.relu(x + y)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand (x4) with a projection shortcut where shapes change."""
  filters: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv_, norm = _layers(train, self.dtype)
    y = nn.relu(norm(name='bn1')(conv_(self.filters, (1, 1), name='conv1')(x)))
    y = conv_(self.filters, (3, 3), self.strides, name='conv2')(y)
    y = nn.relu(norm(name='bn2')(y))
    y = conv_(4 * self.filters, (1, 1), name='conv3')(y)
    y = norm(name='bn3', scale_init=nn.initializers.zeros)(y)
    if x.shape[-1] != 4 * self.filters or self.strides != 1:
      x = conv_(4 * self.filters, (1, 1), self.strides, name='proj')(x)
      x = norm(name='proj_bn')(x)
    return nn.relu(x + y)


BLOCKS = {'basic': BasicBlock, 'bottleneck': BottleneckBlock}
POOLS = ('avg', 'flatten')  # ResNet.pool: how the last feature map becomes the features


class ResNet(nn.Module):
  """CIFAR-style ResNet encoder: images [N, H, W, C] uint8 or float -> features [N, F].

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    width: filters of the first stage; stage i has width * 2**i (x4 for bottleneck blocks).
    block: 'basic' or 'bottleneck'.
    stem_strides: 1 is the CIFAR stem; 2 halves the resolution before the first stage
      (4x less compute, for CPU budgets).
    dtype: compute dtype (`compute.py`); parameters and batch statistics stay float32.
    remat: '' or a name in `compute.REMAT_POLICIES`, applied to each residual block.
    pool: 'avg' (global average pool: F = the last stage's width) or 'flatten' (the last
      feature map flattened, F = H' W' x width: keeps where in the image a feature is).
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  block: str = 'basic'
  stem_strides: int = 1
  dtype: Any = jnp.float32
  remat: str = ''
  pool: str = 'avg'

  def __post_init__(self):  # a wrong name fails when the tower is built, not at its first call
    if self.pool not in POOLS:
      raise ValueError(f'pool={self.pool!r} is unknown; choose one of {list(POOLS)}.')
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool):
    block_cls = compute.maybe_remat(BLOCKS[self.block], self.remat, static_argnums=(2,))
    conv_, norm = _layers(train, self.dtype)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # uint8 -> float32; float64 stays
    x = nn.relu(norm(name='stem_bn')(conv_(self.width, (3, 3), self.stem_strides, name='stem')(x)))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = block_cls(self.width * 2**i, strides, self.dtype,
                      name=f'stage{i + 1}_block{j + 1}')(x, train)
    if self.pool == 'flatten':
      return x.reshape(x.shape[0], -1)  # [N, H' W' C], in the compute dtype
    return jnp.mean(x, axis=(1, 2))  # global average pool: [N, F], in the compute dtype


# Named presets; the CPU default of the Fashion-MNIST recipe is set in its config.
PRESETS = {
    'resnet18': dict(stage_sizes=(2, 2, 2, 2), width=64, block='basic'),
    'resnet34': dict(stage_sizes=(3, 4, 6, 3), width=64, block='basic'),
    'resnet50': dict(stage_sizes=(3, 4, 6, 3), width=64, block='bottleneck'),
}
