"""2-D convolutions whose gradients XLA:CPU computes faster: drop-ins for nn.Conv(use_bias=False).

XLA:CPU runs a convolution's kernel (weight) gradient as another convolution whose "kernel" is
the whole output gradient, much slower than the forward pass for the small images of the CPU
recipe (3x3, 32 -> 32 channels on 14x14: ~5x the forward's time; 1x1 stride-2 shortcuts: ~5x).
Here the kernel gradient is a matmul instead:

  1x1:  y = x[:, ::s, ::s] @ W                      (its autodiff gradients are matmuls too)
  kxk:  dW = sum over batch chunks c of  P_c^T @ dY_c,   P_c = im2col(x_c): [m Ho Wo, k k Cin]

with the chunks small enough for P_c to stay in cache (one large P^T @ dY is as slow as the
convolution). The forward pass and the input gradient stay XLA's convolutions (`jax.custom_vjp`).

Where the batch is split over a mesh, each device's rows are their own group with their own
partial sum through the loop (`kernel_grad`), reduced across devices once after it: a
reduction inside the loop made XLA:CPU's in-process all-reduce deadlock once on 2 devices
(the devices waited at different all-reduces).

Used by `resnet.ResNet` on the CPU (`Conv.matmul_grads`). The ratios above are of an earlier
XLA:CPU: with jax 0.10.2, which runs convolutions and their gradients through YNNPACK, the
default step is within 2% with either gradient (`benchmarks/step_vs_torch.py`'s `+xla_conv`
lever; docs/simclr.md, "Step speed").

Mixed precision (`Conv.dtype`, `compute.py`): the input and the kernel are cast to the compute
dtype (bfloat16) for the products, while the kernel parameter and its gradient stay float32:
`kernel_grad` accumulates its chunked products in float32 (`preferred_element_type`) and the
custom VJP hands the float32 sum to the float32 kernel without rounding it to bfloat16.
"""

import contextlib
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from contrastive.models import compute

DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
# im2col elements per chunk: 2^18 float32 = 1 MiB, so that a chunk's patches stay in cache.
MAX_SIZE = 2**18


def same_padding(spatial: Sequence[int], window: Sequence[int], strides: Sequence[int]):
  """'SAME' padding [(lo, hi)] per spatial dim, as lax and nn.Conv compute it."""
  return lax.padtype_to_pads(tuple(spatial), tuple(window), tuple(strides), 'SAME')


def _lax_conv(x, kernel, strides):
  return lax.conv_general_dilated(x, kernel, strides, same_padding(x.shape[1:3], kernel.shape[:2],
                                                                   strides),
                                  dimension_numbers=DIMENSION_NUMBERS)


def im2col(x, window, strides):
  """Patches of x [N, H, W, C] under 'SAME' padding -> [N, Ho, Wo, kh * kw * C], ordered
  (kh, kw, C) like a kernel [kh, kw, C, O] reshaped to [kh * kw * C, O]."""
  (kh, kw), (sh, sw) = window, strides
  pads = same_padding(x.shape[1:3], window, strides)
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  ho, wo = -(-x.shape[1] // sh), -(-x.shape[2] // sw)
  cols = [xp[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw]  # [N, Ho, Wo, C] each
          for i in range(kh) for j in range(kw)]
  return jnp.concatenate(cols, axis=-1)


def num_chunks(batch: int, size_per_example: int, max_size: int) -> int:
  """The fewest chunks dividing `batch` with at most max_size im2col elements each (or batch)."""
  for chunks in range(1, batch + 1):
    if batch % chunks == 0 and (batch // chunks) * size_per_example <= max_size:
      return chunks
  return batch


def default_groups(batch: int) -> int:
  """Partial sums kept apart in `kernel_grad`: one per device (the batch's contiguous shards
  under the `data` mesh axis), gcd'd with the batch so it divides it; 1 on one device."""
  return math.gcd(batch, jax.device_count())


def kernel_grad(x, dy, window, strides, max_size=MAX_SIZE, groups=None, accum_dtype=None):
  """dL/dW [kh, kw, C, O] of y = conv(x, W) ('SAME'), from x [N, H, W, C] and dy [N, Ho, Wo, O].

  The batch is cut into `groups` contiguous blocks (default `default_groups`: one per device,
  so each device's rows form one block) and each block into chunks; a loop over chunks adds
  P_c^T @ dY_c, P_c [m Ho Wo, kh kw C] of at most max_size elements, to the block's own
  partial sum [groups, kh kw C, O]. The blocks are summed once after the loop, so a sharded
  batch needs one cross-device reduction per convolution, none inside the loop.

  The products and sums are in `accum_dtype`, by default the inputs' dtype promoted to at
  least float32: bfloat16 x and dy accumulate in float32 (`preferred_element_type`), which
  the result keeps.
  """
  n, ho, wo, o = dy.shape
  c = x.shape[-1]
  k = window[0] * window[1] * c
  groups = default_groups(n) if groups is None else groups
  if n % groups:
    raise ValueError(f'groups={groups} must divide the batch {n}.')
  per_group = n // groups
  chunks = num_chunks(per_group, ho * wo * k, max_size)
  m = per_group // chunks
  # [N, ...] -> [groups, m, chunks, ...] -> [chunks, groups, m, ...]: chunk j of a block holds
  # the block's rows j, j + chunks, ...
  split = lambda a: jnp.moveaxis(a.reshape(groups, m, chunks, *a.shape[1:]), 2, 0)

  def accumulate(acc, xy):
    xc, dyc = xy  # [groups, m, H, W, C], [groups, m, Ho, Wo, O]
    p = im2col(xc.reshape(groups * m, *xc.shape[2:]), window, strides)
    p = p.reshape(groups, m * ho * wo, k)  # [groups, m Ho Wo, kh kw C]
    # per group g: (m Ho Wo, kh kw C)^T . (m Ho Wo, O) -> (kh kw C, O)
    return acc + lax.dot_general(p, dyc.reshape(groups, m * ho * wo, o),
                                 (((1,), (1,)), ((0,), (0,))),
                                 preferred_element_type=accum_dtype), None

  if accum_dtype is None:
    accum_dtype = jnp.promote_types(jnp.result_type(x, dy), jnp.float32)
  acc = jnp.zeros((groups, k, o), accum_dtype)
  xs = (split(x), split(dy))
  if chunks == 1:
    acc, _ = accumulate(acc, (xs[0][0], xs[1][0]))
  else:
    acc, _ = lax.scan(accumulate, acc, xs)
  return acc.sum(axis=0).reshape(*window, c, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_im2col_grad(x, kernel, strides, max_size=MAX_SIZE):
  """XLA's 'SAME' convolution x [N, H, W, C] * kernel [kh, kw, C, O] -> [N, Ho, Wo, O] in
  x's dtype (the kernel is cast to it), whose kernel gradient is `kernel_grad`'s chunked
  matmuls, in the kernel's dtype (input gradient: XLA's)."""
  return _lax_conv(x, kernel.astype(x.dtype), strides)


def _conv_fwd(x, kernel, strides, max_size):
  return _lax_conv(x, kernel.astype(x.dtype), strides), (x, kernel)


def _conv_bwd(strides, max_size, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: _lax_conv(x_, kernel.astype(x.dtype), strides), x)
  dx, = input_vjp(dy)
  dk = kernel_grad(x, dy, kernel.shape[:2], strides, max_size).astype(kernel.dtype)
  return dx, dk


conv_im2col_grad.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x, kernel, strides=(1, 1), max_size=MAX_SIZE):
  """'SAME' convolution without bias, x [N, H, W, C] * kernel [kh, kw, C, O] -> [N, Ho, Wo, O],
  Ho = ceil(H / sh): a strided matmul for 1x1 kernels, else `conv_im2col_grad`.

  Computes in x's dtype; the kernel may be wider (float32 parameters under bfloat16 compute):
  it is cast to x's dtype for the product, and its gradient comes back in its own dtype.
  """
  strides = tuple(strides)
  if kernel.shape[:2] == (1, 1):  # 'SAME' pads nothing: a subsampling and a matmul
    # (N, Ho, Wo, C) . (C, O) -> (N, Ho, Wo, O); the gradients are matmuls as well.
    if not compute.is_narrow(x.dtype):
      return x[:, ::strides[0], ::strides[1]] @ kernel[0, 0].astype(x.dtype)
    # bfloat16: products accumulated in float32, whose transpose (the kernel gradient)
    # accumulates in float32 too before the cast to the kernel's dtype.
    return jnp.matmul(x[:, ::strides[0], ::strides[1]], kernel[0, 0].astype(x.dtype),
                      preferred_element_type=jnp.float32).astype(x.dtype)
  return conv_im2col_grad(x, kernel, strides, max_size)


_TARGET_BACKEND = [None]  # the innermost `target_backend`, or None: jax.default_backend()


@contextlib.contextmanager
def target_backend(platform):
  """Within it, `Conv(matmul_grads=None)` takes the path of `platform` ('cpu', 'tpu', 'gpu')
  rather than of this process's backend: a step traced here to be compiled for TPUs
  (contrastive/aot.py) gets XLA's convolution gradients, as it would on the TPU."""
  _TARGET_BACKEND.append(platform)
  try:
    yield
  finally:
    _TARGET_BACKEND.pop()


class Conv(nn.Module):
  """`nn.Conv(features, kernel_size, strides, use_bias=False)` ('SAME', NHWC) with `conv2d`.

  Same parameter (`kernel` [kh, kw, C, O]), initialiser and dtype promotion as nn.Conv, so
  parameters and checkpoints are interchangeable with it. `matmul_grads`: None (default) uses
  `conv2d` where the default backend is the CPU and XLA's convolution (as nn.Conv) elsewhere,
  where its gradients are fast (TPU, GPU); True / False force either. `dtype`: the compute
  dtype (`compute.py`; float32 = that of x and the kernel, as nn.Conv's dtype=None).
  """
  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  kernel_init: Callable = nn.initializers.lecun_normal()
  param_dtype: Any = jnp.float32
  max_size: int = MAX_SIZE
  matmul_grads: bool | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x [N, H, W, C] -> [N, ceil(H / sh), ceil(W / sw), features] in the compute dtype."""
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    kernel = self.param('kernel', self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    dtype = compute.flax_dtype(self.dtype)
    x = jnp.asarray(x, dtype or jnp.result_type(x, kernel))
    matmul_grads = self.matmul_grads
    if matmul_grads is None:
      matmul_grads = (_TARGET_BACKEND[-1] or jax.default_backend()) == 'cpu'
    if not matmul_grads:
      return _lax_conv(x, kernel.astype(x.dtype), strides)
    # The kernel stays in param_dtype: conv2d casts it and returns its gradient uncast.
    return conv2d(x, kernel, strides, self.max_size)
