"""NT-Xent, the normalized temperature-scaled cross-entropy of SimCLR."""

import jax
import jax.numpy as jnp

from contrastive.losses import common


def nt_xent(z1, z2, *, temperature):
  """NT-Xent loss over the 2B views of a batch (SimCLR, Chen et al. 2020, eq. 1).

  Both views are L2-normalised (see `common.normalize`: bfloat16 kept), stacked into
  v = [z1; z2] of 2B rows, and s_ij = v_i . v_j. View i's positive is its pair p(i) = i +- B;
  its negatives are the other 2B - 2 views:

      l_i = -s_{i,p(i)}/tau + log sum_{j != i} exp(s_ij / tau),     loss = mean_i l_i.

  Written on logical global arrays: under `jax.jit` with z1, z2 sharded along a mesh axis,
  every device's views are negatives for every other's. With B = 1 there are no negatives,
  the sum holds only the positive, and the loss is exactly 0 (accuracy 1).

  Args:
    z1: [B, D] embeddings of the first view.
    z2: [B, D] embeddings of the second view; row i is the positive of z1's row i.
    temperature: tau > 0, a Python float or a traced scalar.

  Returns:
    (loss, metrics): loss a float32 scalar; metrics with `accuracy` (fraction of views whose
    positive has the largest similarity), `pos_sim` (mean s_{i,p(i)}), `neg_sim` (mean s_ij
    over negatives) and `logsumexp` (mean log-denominator).

  >>> z = jax.random.normal(jax.random.key(0), (8, 16))
  >>> loss, metrics = nt_xent(z, z, temperature=0.5)
  """
  common.check_pair(z1, z2, 'z1', 'z2')
  common.check_temperature(temperature)
  sim, self_mask, pos_mask = common.two_view_similarities(z1, z2)  # (2B, 2B) each
  logits = jnp.where(self_mask, -jnp.inf, sim / temperature)
  lse = jax.nn.logsumexp(logits, axis=1)
  pos_logit = jnp.sum(jnp.where(pos_mask, logits, 0.0), axis=1)
  loss = jnp.mean(lse - pos_logit)
  neg_mask = ~(self_mask | pos_mask)
  metrics = common.similarity_metrics(sim, pos_mask, neg_mask, exclude=self_mask)
  metrics['logsumexp'] = jnp.mean(lse)
  return loss, metrics
