"""How the towers compute: the compute dtype (mixed precision) and rematerialisation.

Compute dtype. Every model module has a field `dtype` (default float32), flax's `dtype=`
convention: parameters stay in `param_dtype` (float32) and are cast to `dtype` where they are
used, so activations and matmuls / convolutions run in `dtype` (e.g. bfloat16) while the
optimizer updates float32 parameters with float32 gradients (the cast's transpose). flax's
LayerNorm / BatchNorm compute their statistics in at least float32 whatever `dtype` is
(`force_float32_reductions`), and `transformer.dot_product_attention` takes its softmax in
float32 (Micikevicius et al. 2018, "Mixed Precision Training", ICLR: narrow products,
float32 reductions).

float32, the default, is "full precision": modules then compute in the dtype of their inputs
and parameters (flax's `dtype=None`), bitwise as before the field existed; float32 by default
and float64 when the parameters and inputs are float64 (tests/float64.py). Any other dtype
(bfloat16, float16; float64 explicitly) casts to it.

Rematerialisation (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost";
`jax.checkpoint`). A tower's field `remat` names a policy of `REMAT_POLICIES` ('' = none):
each Transformer block / residual block is wrapped in `nn.remat` with that policy, so its
intermediate activations that the policy does not save are recomputed in the backward pass
instead of being stored. The wrapped blocks keep their names: parameter trees (and so
checkpoints) are the same with and without remat.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Names of the `remat` field -> which intermediates of a block the backward pass may keep.
REMAT_POLICIES = {
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,  # recompute everything
    'dots_saveable': jax.checkpoint_policies.dots_saveable,  # keep matmul outputs
    'dots_with_no_batch_dims_saveable':
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep x @ W, not q @ k
    'everything_saveable': jax.checkpoint_policies.everything_saveable,  # as no remat
}


def as_dtype(dtype: Any) -> jnp.dtype:
  """A dtype from a dtype or its name ('bfloat16', 'float32', ...), as jnp.dtype."""
  return jnp.dtype(dtype)


def flax_dtype(dtype: Any) -> jnp.dtype | None:
  """The `dtype=` to give flax layers for compute dtype `dtype`: None (follow the inputs and
  parameters, as before mixed precision existed) for float32, else the dtype itself."""
  dtype = as_dtype(dtype)
  return None if dtype == jnp.float32 else dtype


def is_narrow(dtype: Any) -> bool:
  """True for floating dtypes narrower than float32 (bfloat16, float16), whose reductions and
  softmax must be taken in float32."""
  return jnp.finfo(as_dtype(dtype)).bits < 32


def remat_policy(remat: str):
  """The `jax.checkpoint` policy of a `remat` name; ValueError listing the names if unknown."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be '' (none) or one of {tuple(REMAT_POLICIES)}, "
                     f'got {remat!r}.')
  return REMAT_POLICIES[remat]


def maybe_remat(block_cls: type[nn.Module], remat: str, static_argnums: tuple[int, ...]):
  """`block_cls` itself if remat == '', else `nn.remat(block_cls)` with the named policy.

  static_argnums: the positions of Python-valued arguments of `__call__` (`self` is 0), such
  as the `train` flag, which must not be traced; they must be passed positionally.
  """
  if not remat:
    return block_cls
  return nn.remat(block_cls, policy=remat_policy(remat), static_argnums=static_argnums)
