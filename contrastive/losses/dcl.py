"""Decoupled Contrastive Learning (Yeh et al. 2022): NT-Xent with no positive in the denominator.

`dcl` and `dclw` are the paper's losses, eq. 6 and its weighted form, over the 2B views of a
two-view batch (both views are anchors, each with the 2B - 2 other views' negatives), the
set-up of `nt_xent`. `decoupled_info_nce` is a one-direction query/key relative that is not
the paper's loss: it keeps only the B - 1 keys as negatives.
"""

import jax
import jax.numpy as jnp
import numpy as np

from contrastive.losses import common


def _check_sigma(sigma):
  """Raises ValueError for a concrete non-positive sigma (traced values pass)."""
  if isinstance(sigma, (int, float, np.number)) and not sigma > 0:
    raise ValueError(f'sigma must be > 0, got {sigma}.')


def _decoupled_two_view(z1, z2, temperature, positive_weight):
  """Eq. 6 over v = [z1; z2] with the positive logit of view i scaled by positive_weight[i]."""
  sim, self_mask, pos_mask = common.two_view_similarities(z1, z2)  # (2B, 2B) each
  neg_mask = ~(self_mask | pos_mask)
  logits = sim / temperature
  pos_logit = jnp.sum(jnp.where(pos_mask, logits, 0.0), axis=1)  # (2B,)
  lse_neg = common.masked_logsumexp(logits, neg_mask)  # (2B,); -inf, zero gradient when B = 1
  has_neg = jnp.isfinite(lse_neg)
  loss = jnp.mean(jnp.where(has_neg, lse_neg - positive_weight * pos_logit, 0.0))
  metrics = common.similarity_metrics(sim, pos_mask, neg_mask, exclude=self_mask)
  metrics['logsumexp'] = jnp.mean(jnp.where(has_neg, lse_neg, 0.0))
  return loss, metrics


def dcl(z1, z2, *, temperature):
  """Decoupled Contrastive Learning loss (DCL), eq. 6 of Yeh et al. 2022.

  Both views are L2-normalised, stacked into v = [z1; z2] of 2B rows, and s_ij = v_i . v_j.
  Every view i is an anchor; its positive is its pair p(i) = i +- B and its negatives are the
  other 2B - 2 views of both halves. Unlike `nt_xent`, the positive is not in the denominator:

      l_i = -s_{i,p(i)}/tau + log sum_{j not in {i, p(i)}} exp(s_ij / tau),
      loss = 1/(2B) sum_{i=1}^{2B} l_i.

  The paper sums over views k in {1, 2} and items i; this is that sum divided by 2B. The loss
  is symmetric in (z1, z2). Dropping the positive removes InfoNCE's negative-positive coupling
  (the factor 1 - p_{i,p(i)} on every gradient, which fades once positives are easy), so small
  batches learn faster. l_i is not a log-probability: it can be negative, down to
  -2/tau + log(2B - 2). With B = 1 there are no negatives (log sum = -inf): the loss is then
  defined as 0, with a zero gradient.

  Args:
    z1: [B, D] embeddings of the first view.
    z2: [B, D] embeddings of the second view; row i is the positive of z1's row i.
    temperature: tau > 0, a Python float or a traced scalar.

  Returns:
    (loss, metrics): loss a float32 scalar; metrics as `nt_xent`'s: `accuracy` (fraction of the
    2B views whose positive is the most similar of the other 2B - 1 views), `pos_sim` (mean
    s_{i,p(i)}), `neg_sim` (mean s_ij over negatives) and `logsumexp` (mean log-sum over the
    negatives only; 0 when B = 1).

  References:
    Yeh et al. 2022, "Decoupled Contrastive Learning" (ECCV; arXiv:2110.06848), eq. 6.

  >>> z1, z2 = jax.random.normal(jax.random.key(0), (2, 8, 16))
  >>> loss, metrics = dcl(z1, z2, temperature=0.1)
  """
  common.check_pair(z1, z2, 'z1', 'z2')
  common.check_temperature(temperature)
  return _decoupled_two_view(z1, z2, temperature, 1.0)


def vmf_weights(z1, z2, *, sigma=0.5):
  """DCLW's negative von Mises-Fisher weights of the B positive pairs, without gradient.

      w_i = 2 - exp(s_i / sigma) / mean_k exp(s_k / sigma) = 2 - B softmax_i(s / sigma),

  with s_i the cosine similarity of z1's and z2's rows i. The weights average 1; easy pairs
  (large s_i) get less weight than hard ones. Wrapped in `stop_gradient`: the paper's weight is
  a constant of each step (lightly's DCLWLoss detaches it too).

  Args:
    z1, z2: [B, D] embeddings of the two views.
    sigma: sigma > 0, the concentration's inverse (0.5 in the paper).

  Returns:
    [B] float32 weights.
  """
  common.check_pair(z1, z2, 'z1', 'z2')
  _check_sigma(sigma)
  pos_sim = jnp.sum(common.l2_normalize(z1) * common.l2_normalize(z2), axis=1)  # (B,)
  weights = 2.0 - z1.shape[0] * jax.nn.softmax(pos_sim / sigma)
  return jax.lax.stop_gradient(weights)


def dclw(z1, z2, *, temperature, sigma=0.5):
  """Weighted Decoupled Contrastive Learning loss (DCLW), Yeh et al. 2022.

  `dcl` (eq. 6) with each positive term weighted by `vmf_weights`, a constant of the step:

      w_i = 2 - exp(s_{i,p(i)} / sigma) / mean_k exp(s_{k,p(k)} / sigma),
      l_i = -w_i s_{i,p(i)}/tau + log sum_{j not in {i, p(i)}} exp(s_ij / tau),
      loss = 1/(2B) sum_{i=1}^{2B} l_i,

  on the 2B views v = [z1; z2] as in `dcl` (the mean over k runs over the B positive pairs;
  views i and p(i) share a weight). Hard positives (low s) get w > 1, easy ones w < 1. No
  gradient flows through w. With B = 1, w = 1 and the loss is 0 as in `dcl`.

  Args:
    z1: [B, D] embeddings of the first view.
    z2: [B, D] embeddings of the second view; row i is the positive of z1's row i.
    temperature: tau > 0, a Python float or a traced scalar.
    sigma: sigma > 0 of the weights (0.5 in the paper).

  Returns:
    (loss, metrics): as `dcl`'s.

  References:
    Yeh et al. 2022, "Decoupled Contrastive Learning" (ECCV; arXiv:2110.06848), eq. 6 with the
    von Mises-Fisher weighting function (DCLW).

  >>> z1, z2 = jax.random.normal(jax.random.key(0), (2, 8, 16))
  >>> loss, metrics = dclw(z1, z2, temperature=0.1, sigma=0.5)
  """
  common.check_pair(z1, z2, 'z1', 'z2')
  common.check_temperature(temperature)
  weights = vmf_weights(z1, z2, sigma=sigma)  # (B,)
  return _decoupled_two_view(z1, z2, temperature, jnp.concatenate([weights, weights]))


def decoupled_info_nce(query, key, *, temperature):
  """One-direction decoupled InfoNCE: each query against the B - 1 other keys, no positive below.

      l_i = -s_ii/tau + log sum_{j != i} exp(s_ij / tau),     loss = mean_i l_i,

  with s_ij the cosine similarity of query i and key j. This is NOT the paper's eq. 6 (`dcl`):
  the queries are the only anchors, and their negatives come from the key side alone (B - 1
  of them, not 2B - 2). Its per-anchor term is eq. 6's with the negative set restricted to the
  keys, which suits query/key set-ups where only the keys are candidates (e.g. keys from a
  momentum encoder, as in MoCo). Averaging it over both directions does not give eq. 6 either.
  l_i can be negative, down to -2/tau + log(B - 1). With B = 1 the loss is 0, with a zero
  gradient.

  Args:
    query: [B, D] embeddings.
    key: [B, D] embeddings; row i is the positive of query i, the other rows its negatives.
    temperature: tau > 0, a Python float or a traced scalar.

  Returns:
    (loss, metrics): loss a float32 scalar; metrics with `accuracy` (fraction of queries whose
    positive has the largest similarity), `pos_sim`, `neg_sim` and `logsumexp` (mean log-sum
    over the negatives only).

  References:
    The decoupled denominator of Yeh et al. 2022, "Decoupled Contrastive Learning", applied to
    InfoNCE's query/key form (van den Oord et al. 2018).

  >>> q, k = jax.random.normal(jax.random.key(0), (2, 8, 16))
  >>> loss, metrics = decoupled_info_nce(q, k, temperature=0.1)
  """
  common.check_pair(query, key, 'query', 'key')
  common.check_temperature(temperature)
  b = query.shape[0]
  sim = common.matmul(common.normalize(query), common.normalize(key).T)  # (B, D) . (D, B) -> (B, B)
  eye = jnp.eye(b, dtype=bool)
  logits = sim / temperature
  lse_neg = common.masked_logsumexp(logits, ~eye)  # -inf (zero gradient) when B = 1
  has_neg = jnp.isfinite(lse_neg)
  loss = jnp.mean(jnp.where(has_neg, lse_neg - jnp.diagonal(logits), 0.0))
  metrics = common.similarity_metrics(sim, eye, ~eye)
  metrics['logsumexp'] = jnp.mean(jnp.where(has_neg, lse_neg, 0.0))
  return loss, metrics
