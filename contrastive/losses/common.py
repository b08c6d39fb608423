"""Input checks, normalisation, precision and metrics shared by the contrastive losses.

Mixed precision: bfloat16 embeddings [B, D] are L2-normalised in float32, rounded back to
bfloat16 (`normalize`) and multiplied as they are, with float32 accumulation (`matmul`,
`einsum`, `rowwise_dot`): the similarities, log-sum-exps, running statistics, losses and
metrics are float32. Every other dtype keeps its former behaviour: float32 and float64 are
computed in themselves (bitwise as before), float16 and integers in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np

# Added to the squared norm before the rsqrt, so a zero vector maps to zero (not NaN) and
# its gradient stays finite. Small enough to be invisible for any unit-scale embedding.
NORM_EPS = 1e-12


def at_least_float32(x):
  """x as float32, or kept in float64 (bf16, float16 and integers become float32)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def compute_dtype(dtype):
  """The dtype the losses multiply embeddings of `dtype` in: bfloat16 stays bfloat16 (mixed
  precision); any other as `at_least_float32` (float16 and integers -> float32, float64 kept)."""
  dtype = jnp.dtype(dtype)
  return dtype if dtype == jnp.bfloat16 else jnp.promote_types(dtype, jnp.float32)


def accumulation_dtype(dtype):
  """float32 for bfloat16 (and float16, float32) operands, float64 for float64 ones."""
  return jnp.promote_types(dtype, jnp.float32)


def normalize(x, axis=-1):
  """`l2_normalize` computed in float32 (or float64), then in `compute_dtype(x.dtype)`.

  For bfloat16 x: [..., D] -> [..., D] bfloat16, each entry the float32 unit vector's rounded
  to 8 significand bits (relative error <= 2^-8). A no-op cast otherwise.
  """
  x = jnp.asarray(x)
  return l2_normalize(x, axis).astype(compute_dtype(x.dtype))


def _mixed(*xs):
  """The accumulation dtype of xs, or None if they are all in it already (plain products)."""
  acc = accumulation_dtype(jnp.result_type(*xs))
  return None if all(x.dtype == acc for x in xs) else acc


def matmul(a, b):
  """a @ b, accumulated in float32 for bfloat16 operands: [..., M, K], [K, N] -> float32.

  float32 and float64 operands go through `a @ b` exactly as before (bitwise unchanged).
  """
  acc = _mixed(a, b)
  return a @ b if acc is None else jnp.matmul(a, b, preferred_element_type=acc)


def einsum(spec, a, b):
  """jnp.einsum(spec, a, b) with float32 accumulation for bfloat16 operands (see `matmul`)."""
  acc = _mixed(a, b)
  return jnp.einsum(spec, a, b, preferred_element_type=acc) if acc else jnp.einsum(spec, a, b)


def rowwise_dot(a, b):
  """sum_d a_id b_id: [N, D], [N, D] -> [N], products and sum in float32 for bfloat16 rows
  (a product of two bfloat16 numbers is exact in float32), as the matmuls' diagonal."""
  acc = accumulation_dtype(jnp.result_type(a, b))
  return jnp.sum(a.astype(acc) * b.astype(acc), axis=1)


def l2_normalize(x, axis=-1):
  """x / sqrt(|x|^2 + NORM_EPS) in float32 (or float64 inputs' float64): [..., D] -> [..., D]."""
  x = at_least_float32(x)
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


def masked_logsumexp(x, mask, axis=-1):
  """log sum_{j : mask_j} exp(x_j) along `axis`, stabilised by the maximum kept entry.

  An all-False row gives -inf with a zero gradient, never NaN (the inner `where`s keep
  log(0) and exp(-inf - -inf) out of both passes), so each loss can define what an empty
  candidate set means instead of inheriting a NaN.

  Args:
    x: [..., M] logits (float32).
    mask: bool, broadcastable to x; False drops the entry.
    axis: the reduced axis.

  Returns:
    x's shape without `axis`: the masked log-sum-exp, -inf where nothing is kept.
  """
  mask = jnp.broadcast_to(mask, x.shape)
  x = jnp.where(mask, x, -jnp.inf)
  peak = jnp.max(x, axis=axis, keepdims=True)
  peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
  total = jnp.sum(jnp.where(mask, jnp.exp(x - peak), 0.0), axis=axis)
  empty = ~jnp.any(mask, axis=axis)
  log_total = jnp.log(jnp.where(empty, 1.0, total)) + jnp.squeeze(peak, axis)
  return jnp.where(empty, -jnp.inf, log_total)


def similarity_metrics(sim, pos_mask, neg_mask, exclude=None):
  """Retrieval accuracy and mean positive / negative similarity of a [N, M] similarity matrix.

  Args:
    sim: [N, M] cosine similarities.
    pos_mask: [N, M] bool, the positives of each row (usually exactly one). Accuracy is the
      fraction of rows whose most similar candidate is a positive, over rows that have one.
    neg_mask: [N, M] bool, the negatives of each row.
    exclude: optional [N, M] bool of entries that are neither (e.g. self-similarity).
  """
  ranked = sim if exclude is None else jnp.where(exclude, -jnp.inf, sim)
  top1 = jnp.argmax(ranked, axis=1)
  hit = jnp.take_along_axis(pos_mask, top1[:, None], axis=1)[:, 0]
  rows = jnp.any(pos_mask, axis=1)
  accuracy = jnp.sum(hit & rows) / jnp.maximum(jnp.sum(rows), 1)
  pos_sim = jnp.sum(jnp.where(pos_mask, sim, 0.0)) / jnp.maximum(jnp.sum(pos_mask), 1)
  neg_sim = jnp.sum(jnp.where(neg_mask, sim, 0.0)) / jnp.maximum(jnp.sum(neg_mask), 1)
  return {'accuracy': accuracy.astype(sim.dtype), 'pos_sim': pos_sim, 'neg_sim': neg_sim}


def two_view_similarities(z1, z2):
  """The set-up of NT-Xent and DCL: v = [z1; z2] (2B rows) L2-normalised, s_ij = v_i . v_j.

  Args:
    z1, z2: [B, D] the two views; row i of z2 is the positive of row i of z1.

  Returns:
    (sim [2B, 2B], self_mask [2B, 2B] bool (j = i), pos_mask [2B, 2B] bool (j = p(i) = i +- B)).
  """
  b = z1.shape[0]
  v = normalize(jnp.concatenate([z1, z2], axis=0))  # (2B, D), bfloat16 kept (see `normalize`)
  sim = matmul(v, v.T)  # (2B, D) . (D, 2B) -> (2B, 2B), float32 (or float64)
  idx = jnp.arange(2 * b)
  self_mask = idx[:, None] == idx[None, :]
  pos_mask = idx[None, :] == ((idx + b) % (2 * b))[:, None]
  return sim, self_mask, pos_mask
