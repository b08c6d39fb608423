"""Supervised contrastive loss: every other sample with the anchor's label is a positive."""

import jax.numpy as jnp

from contrastive.losses import common


def supcon(z, labels, *, temperature):
  """SupCon, the "L_out" form: average the log-probability of each positive, then over anchors.

  With s_ia the cosine similarity of samples i and a, P(i) = {p != i : labels_p = labels_i}:

      l_i  = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip/tau) / sum_{a != i} exp(s_ia/tau) ),
      loss = mean of l_i over the anchors with |P(i)| > 0   (0 if there are none).

  With labels = pair ids of two stacked views (z = [z1; z2], labels = [0..B-1, 0..B-1]) every
  anchor has exactly one positive and this is `nt_xent(z1, z2)`. N = 1 (no other sample) and
  all-distinct labels both give loss 0. Written on logical global arrays: sharded along the
  batch under `jax.jit`, positives and negatives cross devices.

  Args:
    z: [N, D] embeddings (all views of all samples, stacked).
    labels: [N] integer class or instance ids.
    temperature: tau > 0, a Python float or a traced scalar.

  Returns:
    (loss, metrics): loss a float32 scalar; metrics with `accuracy` (fraction of anchors with a
    positive whose most similar other sample is a positive), `pos_sim` (mean s_ip over positive
    pairs), `neg_sim` (mean over pairs with different labels), `logsumexp` (mean
    log-denominator) and `num_positives` (mean |P(i)|).

  References:
    Khosla et al. 2020, "Supervised Contrastive Learning" (NeurIPS), eq. 2 (L_out^sup).

  >>> z = jnp.eye(8, 16) + 0.1
  >>> loss, metrics = supcon(z, jnp.array([0, 0, 1, 1, 2, 2, 3, 3]), temperature=0.1)
  """
  if z.ndim != 2 or labels.shape != z.shape[:1]:
    raise ValueError(f'z must be [N, D] and labels [N]; got z: {tuple(z.shape)}, '
                     f'labels: {tuple(labels.shape)}.')
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f'labels must be integers, got {labels.dtype}.')
  common.check_temperature(temperature)
  n = z.shape[0]
  v = common.normalize(z)  # bfloat16 kept (mixed precision, `common.py`)
  sim = common.matmul(v, v.T)  # (N, D) . (D, N) -> (N, N), float32 accumulated
  self_mask = jnp.eye(n, dtype=bool)
  pos_mask = (labels[:, None] == labels[None, :]) & ~self_mask
  logits = sim / temperature
  lse = common.masked_logsumexp(logits, ~self_mask)  # log sum_{a != i}; -inf when N = 1
  num_pos = jnp.sum(pos_mask, axis=1)
  has_pos = num_pos > 0
  mean_pos_logit = jnp.sum(jnp.where(pos_mask, logits, 0.0), axis=1) / jnp.maximum(num_pos, 1)
  rows = jnp.where(has_pos, lse - mean_pos_logit, 0.0)
  loss = jnp.sum(rows) / jnp.maximum(jnp.sum(has_pos), 1)
  metrics = common.similarity_metrics(sim, pos_mask, ~(pos_mask | self_mask), exclude=self_mask)
  metrics['logsumexp'] = jnp.sum(jnp.where(has_pos, lse, 0.0)) / jnp.maximum(jnp.sum(has_pos), 1)
  metrics['num_positives'] = jnp.mean(num_pos.astype(jnp.float32))
  return loss, metrics
