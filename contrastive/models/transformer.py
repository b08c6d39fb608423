"""Pre-LayerNorm Transformer encoder blocks and the MAP pooling head, shared by the ViT and the
text tower.

One block (Vaswani et al. 2017, with the LayerNorm moved in front of each sub-layer as in
ViT, Dosovitskiy et al. 2021, eq. 2-3, and big_vision `models/vit.py`):

    x <- x + MHA(LN(x), mask)
    x <- x + MLP(LN(x)),   MLP(y) = W2 gelu(W1 y + b1) + b2.

Kernels are Xavier-uniform and MLP biases ~N(0, 1e-6) as in big_vision. Modules compute in
the dtype of their inputs and parameters (flax `dtype=None`): float32 by default, float64
when the parameters are cast to float64 (`create_train_state(dtype=jnp.float64)`).

Dropout (off by default) is applied after the attention and the MLP when `train=True` and
`dropout > 0`; it then needs a 'dropout' rng in `apply(..., rngs={'dropout': key})`.
"""

import flax.linen as nn
import jax.numpy as jnp

_KERNEL_INIT = nn.initializers.xavier_uniform()


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> gelu -> Dense(width): [..., width] -> [..., width]."""
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    width = x.shape[-1]
    y = nn.Dense(self.mlp_dim, kernel_init=_KERNEL_INIT,
                 bias_init=nn.initializers.normal(stddev=1e-6), name='fc1')(x)
    y = nn.gelu(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return nn.Dense(width, kernel_init=_KERNEL_INIT,
                    bias_init=nn.initializers.normal(stddev=1e-6), name='fc2')(y)


class EncoderBlock(nn.Module):
  """One pre-LN block: x [N, L, width] -> [N, L, width].

  `mask` ([N, 1, L, L] or broadcastable, True = may attend) hides keys such as padding.
  """
  heads: int
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False):
    y = nn.LayerNorm(name='norm1')(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, kernel_init=_KERNEL_INIT,
                                        name='attention')(y, y, mask=mask, deterministic=True)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(name='norm2')(x)
    y = MlpBlock(self.mlp_dim, dropout=self.dropout, name='mlp')(y, train=train)
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class Encoder(nn.Module):
  """`depth` pre-LN blocks and a final LayerNorm: x [N, L, width] -> [N, L, width]."""
  depth: int
  heads: int
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False):
    for i in range(self.depth):
      x = EncoderBlock(self.heads, self.mlp_dim, self.dropout, name=f'block{i}')(
          x, mask, train=train)
    return nn.LayerNorm(name='encoder_norm')(x)


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

  @nn.compact
  def __call__(self, x, mask=None):
    n, _, width = x.shape
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, width))
    probe = jnp.broadcast_to(probe.astype(x.dtype), (n, 1, width))
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, kernel_init=_KERNEL_INIT,
                                        name='attention')(probe, x, mask=mask)
    y = y + MlpBlock(self.mlp_dim, name='mlp')(nn.LayerNorm(name='norm')(y))
    return y[:, 0]
