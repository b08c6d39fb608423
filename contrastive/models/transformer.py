"""Pre-LayerNorm Transformer encoder blocks and the MAP pooling head, shared by the ViT and the
text tower.

One block (Vaswani et al. 2017, with the LayerNorm moved in front of each sub-layer as in
ViT, Dosovitskiy et al. 2021, eq. 2-3, and big_vision `models/vit.py`):

    x <- x + MHA(LN(x), mask)
    x <- x + MLP(LN(x)),   MLP(y) = W2 gelu(W1 y + b1) + b2.

Kernels are Xavier-uniform and MLP biases ~N(0, 1e-6) as in big_vision. `act` is the MLP's
activation ('gelu_tanh', flax's and big_vision's default; 'gelu', the exact erf form of torch's
nn.GELU that open_clip uses; 'quick_gelu', x sigmoid(1.702 x) of OpenAI's CLIP weights) and
`ln_eps` the LayerNorms' epsilon (1e-6 as flax and big_vision; torch's and open_clip's 1e-5). `dtype` is the
compute dtype (`compute.py`): float32, the default, computes in the dtype of the inputs and
parameters (float32, or float64 when the parameters are cast to float64 by
`create_train_state(dtype=jnp.float64)`); bfloat16 casts activations and matmuls to bfloat16
with float32 parameters, LayerNorm statistics and attention softmax.

Dropout (off by default) is applied after the attention and the MLP when `train=True` and
`dropout > 0`; it then needs a 'dropout' rng in `apply(..., rngs={'dropout': key})`.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive.models import compute

_KERNEL_INIT = nn.initializers.xavier_uniform()
ACTIVATIONS = {'gelu_tanh': lambda x: nn.gelu(x, approximate=True),
               'gelu': lambda x: nn.gelu(x, approximate=False),
               'quick_gelu': lambda x: x * nn.sigmoid(1.702 * x)}


def check_sizes(width, depth, heads, mlp_dim):
  """Raises ValueError unless width, heads, mlp_dim >= 1, depth >= 0 (ints) and heads divides
  width."""
  sizes = dict(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim)
  for name, value in sizes.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < (name != 'depth'):
      raise ValueError(f'{name}={value!r} must be an int >= {int(name != "depth")}.')
  if width % heads:
    raise ValueError(f'width={width} is not a multiple of heads={heads}.')



def layer_norm(eps, dtype, name):
  """The blocks' LayerNorm with its epsilon (`ln_eps`)."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name)


def dot_product_attention(query, key, value, mask=None, *, dtype=None, precision=None):
  """Softmax attention, `nn.dot_product_attention` with the softmax in at least float32.

  query [N, Lq, H, d], key and value [N, Lk, H, d] -> [N, Lq, H, d]:

      w = softmax(q k^T / sqrt(d), masked keys -> -inf),   out = w v.

  The logits q k^T and the product w v are in the compute dtype; in a dtype narrower than
  float32 (bfloat16) the softmax's exp and sum are taken in float32 and its output w cast
  back, so that the normalisation does not round (flax's `force_fp32_for_softmax`, whose w
  would stay float32 and make w v a float32 product). In float32 and float64 this is exactly
  `nn.dot_product_attention` (deterministic: no attention dropout).
  """
  query, key, value = nn.dtypes.promote_dtype(query, key, value, dtype=dtype)
  weights = nn.dot_product_attention_weights(
      query, key, mask=mask, deterministic=True, dtype=query.dtype, precision=precision,
      force_fp32_for_softmax=compute.is_narrow(query.dtype))
  # (N, H, Lq, Lk) . (N, Lk, H, d) -> (N, Lq, H, d)
  return jnp.einsum('...hqk,...khd->...qhd', weights.astype(value.dtype), value,
                    precision=precision, _dot_general=jax.lax.dot_general)


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> act -> Dense(width): [..., width] -> [..., width]."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  act: str = 'gelu_tanh'

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    width = x.shape[-1]
    dense = functools.partial(nn.Dense, kernel_init=_KERNEL_INIT, dtype=compute.flax_dtype(
        self.dtype), bias_init=nn.initializers.normal(stddev=1e-6))
    y = ACTIVATIONS[self.act](dense(self.mlp_dim, name='fc1')(x))
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return dense(width, name='fc2')(y)


class EncoderBlock(nn.Module):
  """One pre-LN block: x [N, L, width] -> [N, L, width].

  `mask` ([N, 1, L, L] or broadcastable, True = may attend) hides keys such as padding.
  `train` may be passed positionally (the remat'd block of `Encoder` takes it as a static
  argument, position 3).
  """
  heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  act: str = 'gelu_tanh'
  ln_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, mask=None, train: bool = False):
    dtype = compute.flax_dtype(self.dtype)
    y = layer_norm(self.ln_eps, dtype, 'norm1')(x)
    y = attention(self.heads, dtype, name='attention')(y, y, mask=mask, deterministic=True)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = layer_norm(self.ln_eps, dtype, 'norm2')(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.act, name='mlp')(y, train=train)
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


def attention(heads, dtype, name):
  """The blocks' and MAPHead's multi-head attention: float32 softmax in narrow dtypes."""
  return nn.MultiHeadDotProductAttention(num_heads=heads, kernel_init=_KERNEL_INIT,
                                         dtype=dtype, attention_fn=dot_product_attention,
                                         name=name)


class Encoder(nn.Module):
  """`depth` pre-LN blocks and a final LayerNorm: x [N, L, width] -> [N, L, width].

  `remat`: '' or a name of `compute.REMAT_POLICIES`, applied to each block (same parameters).
  """
  depth: int
  heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: str = ''
  act: str = 'gelu_tanh'
  ln_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False):
    if self.act not in ACTIVATIONS:
      raise ValueError(f'act must be one of {tuple(ACTIVATIONS)}, got {self.act!r}.')
    block_cls = compute.maybe_remat(EncoderBlock, self.remat, static_argnums=(3,))  # train
    for i in range(self.depth):
      x = block_cls(self.heads, self.mlp_dim, self.dropout, self.dtype, self.act, self.ln_eps,
                    name=f'block{i}')(x, mask, train)
    return layer_norm(self.ln_eps, compute.flax_dtype(self.dtype), 'encoder_norm')(x)


class MAPHead(nn.Module):
  """Multihead attention pooling: x [N, L, width] -> [N, width].

  A learned probe q [1, 1, width] attends over the L tokens, then a residual MLP:

      y = MHA(q, x, mask);   out = y + MLP(LN(y)).

  `mask` ([N, 1, 1, L], True = token may be attended) excludes padding.

  References:
    Lee et al. 2019, "Set Transformer" (ICML), pooling by multihead attention (PMA);
    big_vision `models/vit.py` `MAPHead`, the pooling of SigLIP (Zhai et al. 2023).
  """
  heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  act: str = 'gelu_tanh'
  ln_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, mask=None):
    n, _, width = x.shape
    dtype = compute.flax_dtype(self.dtype)
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, width))
    probe = jnp.broadcast_to(probe.astype(x.dtype), (n, 1, width))
    y = attention(self.heads, dtype, name='attention')(probe, x, mask=mask)
    y = y + MlpBlock(self.mlp_dim, dtype=self.dtype, act=self.act, name='mlp')(
        layer_norm(self.ln_eps, dtype, 'norm')(y))
    return y[:, 0]
