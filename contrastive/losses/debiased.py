"""Debiased and hard-negative InfoNCE: InfoNCE with a corrected estimate of the negatives' mass.

Both replace InfoNCE's negative sum by an estimate Ng of what it would be over true negatives
only, then score l_i = -log(pos / (pos + Ng)) with pos = exp(s_ii/tau). Ng is clamped from
below at N e^{-1/tau} (its value if every negative had similarity -1), so it stays positive.
Everything is computed in log space (log Ng from log-sum-exps and a stable log-difference),
so tau = 0.01 does not overflow float32: exp(1/0.01) = e^100 would.

Row i of `key` is the positive of row i of `query`; its N = B - 1 other rows are the
negatives N(i). Like the other losses they are written on logical global arrays.
"""

import jax
import jax.numpy as jnp
import numpy as np

from contrastive.losses import blockwise
from contrastive.losses import common


def _check_tau_plus(tau_plus):
  """Raises ValueError for a concrete class prior outside [0, 1) (traced values pass)."""
  if isinstance(tau_plus, (int, float, np.number)) and not 0 <= tau_plus < 1:
    raise ValueError(f'tau_plus must be in [0, 1), got {tau_plus}.')


def _similarities(query, key, temperature):
  """Checks the inputs; returns sim [B, B], logits = sim / tau, the positive logits [B], eye."""
  common.check_pair(query, key, 'query', 'key')
  common.check_temperature(temperature)
  sim = common.matmul(common.normalize(query), common.normalize(key).T)  # (B, D) . (D, B) -> (B, B)
  logits = sim / temperature
  return sim, logits, jnp.diagonal(logits), jnp.eye(query.shape[0], dtype=bool)


def _blockwise_log_sums(query, key, temperature, mults, **blocks):
  """Streamed log sum_{j in N(i)} exp(mult s_ij / tau) per multiplier, the positive logits
  and the metrics: what the two losses need, without the [B, B] matrix."""
  common.check_pair(query, key, 'query', 'key')
  common.check_temperature(temperature)
  q, k = common.normalize(query), common.normalize(key)  # bfloat16 kept (mixed precision)
  stats = blockwise.softmax_stats(q, k, scale=1.0 / temperature, row_mult=mults,
                                  row_positive=(False,) * len(mults), **blocks)
  pos_sim = stats.pos_sim  # (B,) float32 s_ii, differentiated with the tiles
  metrics = blockwise.similarity_metrics(pos_sim, stats.row_neg_max, stats.neg_sum,
                                         stats.neg_count)
  return pos_sim / temperature, stats.row_lse, metrics


def _debiased_rows(pos_logit, log_sum, n, temperature, tau_plus):
  """Per-row l_i = log(1 + Ng / pos) and whether the floor N e^{-1/tau} was used.

      Ng = max((S - N tau+ pos) / (1 - tau+), N e^{-1/tau}),   S = exp(log_sum),

  in log space: log(S - N tau+ pos) = log_sum + log(-expm1(d)), d = log(N tau+) + pos_logit -
  log_sum. Which branch of the max applies is decided without gradient, and the unused branch
  is evaluated at a harmless point, so neither pass sees log(0) or a negative log argument.
  With N = 0 (B = 1) there is nothing to correct: Ng = 0 and l_i = 0.

  Args:
    pos_logit: [B] s_ii / tau.
    log_sum: [B] log of the (possibly reweighted) sum over the N negatives of exp(s_ij / tau).
    n: the static number N of negatives per row.
    temperature: tau > 0.
    tau_plus: class prior tau+ in [0, 1).

  Returns:
    ([B] per-row losses, [B] bool: Ng took the floor).
  """
  if n == 0:
    return jnp.zeros_like(pos_logit), jnp.zeros(pos_logit.shape, bool)
  log_floor = jnp.log(n) - 1.0 / temperature

  def log_corrected(d):
    return log_sum + jnp.log(-jnp.expm1(d)) - jnp.log1p(-tau_plus)

  d = jnp.log(n * tau_plus) + pos_logit - log_sum  # log(N tau+ pos / S); -inf when tau+ = 0
  use = jax.lax.stop_gradient((d < 0) & (log_corrected(jnp.where(d < 0, d, -1.0)) > log_floor))
  log_ng = jnp.where(use, log_corrected(jnp.where(use, d, -1.0)), log_floor)
  return jax.nn.softplus(log_ng - pos_logit), ~use  # log(1 + Ng/pos) = -log(pos / (pos + Ng))


def debiased_info_nce(query, key, *, temperature, tau_plus, block_size=None, mesh=None,
                      collective=blockwise.DEFAULT_COLLECTIVE):
  """Debiased contrastive loss: InfoNCE corrected for negatives that share the query's class.

  With pos = exp(s_ii/tau), N = B - 1 and tau+ the prior probability that a "negative" is in
  fact of the query's class:

      Ng  = max((sum_{j in N(i)} exp(s_ij/tau) - N tau+ pos) / (1 - tau+), N e^{-1/tau}),
      l_i = -log(pos / (pos + Ng)),     loss = mean_i l_i.

  tau+ = 0 gives InfoNCE exactly. With B = 1 there are no negatives: Ng = 0 and the loss is 0.

  Args:
    query: [B, D] embeddings.
    key: [B, D] embeddings; row i is the positive of query i, the other rows its negatives.
    temperature: tau > 0, a Python float or a traced scalar.
    tau_plus: class prior tau+ in [0, 1), e.g. 0.1 for 10 balanced classes.
    block_size, mesh, collective: the blockwise path (see `info_nce.info_nce`): the negatives'
      sum is streamed tile by tile.

  Returns:
    (loss, metrics): loss a float32 scalar; metrics with `accuracy`, `pos_sim`, `neg_sim` and
    `clamped` (fraction of rows where Ng took the floor N e^{-1/tau}; near 1 means tau+ is too
    large for the data).

  References:
    Chuang et al. 2020, "Debiased Contrastive Learning" (NeurIPS), eq. 6 and the reference
    code's clamp.

  >>> q, k = jax.random.normal(jax.random.key(0), (2, 8, 16))
  >>> loss, metrics = debiased_info_nce(q, k, temperature=0.5, tau_plus=0.1)
  """
  _check_tau_plus(tau_plus)
  blockwise.check_args(block_size, mesh, collective, None)
  n = query.shape[0] - 1
  if block_size is None:
    sim, logits, pos_logit, eye = _similarities(query, key, temperature)
    log_sum = common.masked_logsumexp(logits, ~eye)  # log sum_{j != i} exp(s_ij / tau)
    metrics = common.similarity_metrics(sim, eye, ~eye)
  else:
    pos_logit, log_sums, metrics = _blockwise_log_sums(
        query, key, temperature, (1.0,), block_size=block_size, mesh=mesh, collective=collective)
    log_sum = log_sums[:, 0]
  rows, clamped = _debiased_rows(pos_logit, log_sum, n, temperature, tau_plus)
  metrics['clamped'] = jnp.mean(clamped.astype(pos_logit.dtype))
  return jnp.mean(rows), metrics


def hard_negative_info_nce(query, key, *, temperature, beta, tau_plus, block_size=None,
                           mesh=None, collective=blockwise.DEFAULT_COLLECTIVE):
  """Hard-negative InfoNCE: debiased InfoNCE with negatives reweighted towards the similar ones.

  Each negative's term is importance-weighted by how hard it is,

      w_ij = exp(beta s_ij/tau) / mean_{k in N(i)} exp(beta s_ik/tau),
      R_i  = sum_{j in N(i)} w_ij exp(s_ij/tau),
      Ng   = max((R_i - N tau+ pos) / (1 - tau+), N e^{-1/tau}),
      l_i  = -log(pos / (pos + Ng)),     loss = mean_i l_i,

  so log R_i = logsumexp_j((1 + beta) s_ij/tau) - logsumexp_k(beta s_ik/tau) + log N. The
  weights are differentiated through (no stop-gradient, as in the formula and the paper's
  code): negatives easier than the weighted average get a small negative gradient weight, i.e.
  are pulled towards the query (plotted in notebooks/explore_losses.ipynb). beta = 0 gives
  `debiased_info_nce`; beta = 0 and tau+ = 0 give `info_nce`. With B = 1 the loss is 0.

  Args:
    query: [B, D] embeddings.
    key: [B, D] embeddings; row i is the positive of query i, the other rows its negatives.
    temperature: tau > 0, a Python float or a traced scalar.
    beta: concentration beta >= 0 of the weights on hard negatives (the paper uses 0.5-1).
    tau_plus: class prior tau+ in [0, 1); 0 disables the debiasing.
    block_size, mesh, collective: the blockwise path (see `info_nce.info_nce`): the two sums
      over negatives, of exp((1 + beta) s/tau) and exp(beta s/tau), are streamed tile by tile;
      beta must then be a Python float >= 0.

  Returns:
    (loss, metrics): as `debiased_info_nce`: `accuracy`, `pos_sim`, `neg_sim`, `clamped`.

  References:
    Robinson et al. 2021, "Contrastive Learning with Hard Negative Samples" (ICLR), eq. 5 and
    the reference code.

  >>> q, k = jax.random.normal(jax.random.key(0), (2, 8, 16))
  >>> loss, metrics = hard_negative_info_nce(q, k, temperature=0.5, beta=1.0, tau_plus=0.1)
  """
  _check_tau_plus(tau_plus)
  blockwise.check_args(block_size, mesh, collective, None)
  n = query.shape[0] - 1
  if block_size is None:
    sim, logits, pos_logit, eye = _similarities(query, key, temperature)
    log_reweighted = (common.masked_logsumexp((1.0 + beta) * logits, ~eye)
                      - common.masked_logsumexp(beta * logits, ~eye) + jnp.log(max(n, 1)))
    metrics = common.similarity_metrics(sim, eye, ~eye)
  else:
    if not isinstance(beta, (int, float, np.number)) or beta < 0:
      raise ValueError(f'With block_size, beta must be a Python float >= 0, got {beta!r}.')
    pos_logit, log_sums, metrics = _blockwise_log_sums(
        query, key, temperature, (1.0 + beta, float(beta)), block_size=block_size, mesh=mesh,
        collective=collective)
    log_reweighted = log_sums[:, 0] - log_sums[:, 1] + jnp.log(max(n, 1))
  rows, clamped = _debiased_rows(pos_logit, log_reweighted, n, temperature, tau_plus)
  metrics['clamped'] = jnp.mean(clamped.astype(pos_logit.dtype))
  return jnp.mean(rows), metrics
