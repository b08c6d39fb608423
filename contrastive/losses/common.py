"""Input checks, normalisation and metrics shared by the contrastive losses."""

import jax.numpy as jnp
import numpy as np

# Added to the squared norm before the rsqrt, so a zero vector maps to zero (not NaN) and
# its gradient stays finite. Small enough to be invisible for any unit-scale embedding.
NORM_EPS = 1e-12


def l2_normalize(x, axis=-1):
  """x / sqrt(|x|^2 + NORM_EPS) in float32: [..., D] -> [..., D]."""
  x = x.astype(jnp.float32)
  return x * jnp.reciprocal(jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True) + NORM_EPS))


def check_pair(a, b, name_a, name_b):
  """Raises ValueError unless a and b are both [B, D] with the same shape."""
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f'{name_a} and {name_b} must both be [B, D] with the same shape; '
                     f'got {name_a}: {tuple(a.shape)}, {name_b}: {tuple(b.shape)}.')


def check_temperature(temperature):
  """Raises ValueError for a concrete non-positive temperature (traced values pass)."""
  if isinstance(temperature, (int, float, np.number)) and not temperature > 0:
    raise ValueError(f'temperature must be > 0, got {temperature}.')


def similarity_metrics(sim, pos_mask, neg_mask, exclude=None):
  """Retrieval accuracy and mean positive / negative similarity of a [N, M] similarity matrix.

  Args:
    sim: [N, M] cosine similarities.
    pos_mask: [N, M] bool, exactly one True per row (the positive).
    neg_mask: [N, M] bool, the negatives of each row.
    exclude: optional [N, M] bool of entries that are neither (e.g. self-similarity).
  """
  ranked = sim if exclude is None else jnp.where(exclude, -jnp.inf, sim)
  top1 = jnp.argmax(ranked, axis=1)
  accuracy = jnp.mean(jnp.take_along_axis(pos_mask, top1[:, None], axis=1))
  pos_sim = jnp.sum(jnp.where(pos_mask, sim, 0.0)) / jnp.maximum(jnp.sum(pos_mask), 1)
  neg_sim = jnp.sum(jnp.where(neg_mask, sim, 0.0)) / jnp.maximum(jnp.sum(neg_mask), 1)
  return {'accuracy': accuracy.astype(jnp.float32), 'pos_sim': pos_sim, 'neg_sim': neg_sim}
