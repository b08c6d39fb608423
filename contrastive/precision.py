"""config.dtype: the precision of the train state and of the towers' computation.

  'float32'   everything float32 (the default).
  'bfloat16'  mixed precision: parameters, optimizer slots, BatchNorm statistics and the queue
              stay float32; every tower computes in bfloat16 (activations, matmuls,
              convolutions; norms and softmax in float32: contrastive/models/compute.py) and the
              losses multiply bfloat16 embeddings with float32 accumulation, keeping
              log-sum-exps and the loss in float32 (contrastive/losses/common.py).
  'float64'   everything float64 (jax_enable_x64 for the run): the reference precision the
              device-count tests compare in.
"""

import jax.numpy as jnp

DTYPES = ('float32', 'bfloat16', 'float64')


def state_dtype(name):
  """The dtype of every float leaf of the train state for config.dtype `name`: float64 for
  'float64', else float32."""
  return jnp.float64 if name == 'float64' else jnp.float32


def compute_dtype(name):
  """The towers' compute dtype for the model builders' `dtype=`: bfloat16 for 'bfloat16', else
  None (the towers' own configs, by default the parameters' dtype)."""
  return jnp.bfloat16 if name == 'bfloat16' else None
