"""SigLIP's pairwise sigmoid loss: every (a_i, b_j) pair is an independent binary classification.

Unlike the softmax losses there is no normalisation over the batch, so each pair's term only
needs its own logit; the price is a bias b, which starts strongly negative (SigLIP: b = -10,
tau = 0.1) because B - 1 of every B pairs are negatives.
"""

import jax
import jax.numpy as jnp

from contrastive.losses import blockwise
from contrastive.losses import common
from contrastive.losses.info_nce import check_candidates


def sigmoid_loss(za, zb, *, temperature, bias, extra_negatives=None, negative_mask=None,
                 mask_ids=None, block_size=None, mesh=None,
                 collective=blockwise.DEFAULT_COLLECTIVE):
  """Pairwise sigmoid loss of SigLIP, per-row sum and mean over rows as in big_vision.

  With s_ij the cosine similarity of za_i and zb_j, logits z_ij = s_ij/tau + b and labels
  y_ij = +1 on the diagonal, -1 elsewhere:

      loss = -(1/B) sum_i sum_j log sigmoid(y_ij z_ij).

  The loss is symmetric in (za, zb): swapping them transposes z and keeps the diagonal. With
  B = 1 only the positive pair is left: loss = -log sigmoid(s_11/tau + b).

  In SigLIP tau and b are learned: they are model parameters (e.g. `temperature =
  jnp.exp(-params['t'])`, `bias = params['b']`), and this function accepts them as traced
  scalars with gradients. The config-driven recipe (`registry.PAIR_LOSSES['sigmoid_loss']`)
  passes fixed Python floats instead.

  Extra negatives add M columns with label -1 to every row; a negative_mask drops pairs from
  the sum altogether (neither positive nor negative), e.g. duplicate captions.

  Args:
    za: [B, D] embeddings of one modality or view.
    zb: [B, D] embeddings of the other; row i pairs with za's row i.
    temperature: tau > 0, a Python float or a traced scalar.
    bias: b, a Python float or a traced scalar (SigLIP initialises it to -10).
    extra_negatives: optional [M, D] embeddings, negatives of every za row.
    negative_mask, mask_ids: as in `info_nce.info_nce`, [B, B + M] masks, ([B], [B + M]) ids.
    block_size, mesh, collective: the blockwise path, as in `info_nce.info_nce`. It computes
      the loss and its gradients in one pass over the tiles (no normaliser to wait for).

  Returns:
    (loss, metrics): loss a float32 scalar; metrics with `accuracy` (fraction of za rows whose
    most similar zb row is their pair), `pos_sim`, `neg_sim` and `pos_prob` (mean
    sigmoid(z_ii), the predicted probability of the positive pairs).

  References:
    Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training" (ICCV), Algorithm 1;
    big_vision `trainers/proj/image_text/siglip.py`.

  >>> za, zb = jax.random.normal(jax.random.key(0), (2, 8, 16))
  >>> loss, metrics = sigmoid_loss(za, zb, temperature=0.1, bias=-10.0)
  """
  common.check_pair(za, zb, 'za', 'zb')
  common.check_temperature(temperature)
  check_candidates(za, extra_negatives, negative_mask)
  blockwise.check_args(block_size, mesh, collective, negative_mask)
  b = za.shape[0]
  a, c = common.normalize(za), common.normalize(zb)  # bfloat16 kept (mixed precision)
  extra = None if extra_negatives is None else common.normalize(extra_negatives)
  if block_size is not None:
    pos_sim = common.rowwise_dot(a, c)  # (B,) float32
    loss_sum, row_neg_max, neg_sum, neg_count = blockwise.sigmoid_stats(
        a, c, scale=1.0 / temperature, bias=bias, extra=extra, negative_mask=negative_mask,
        mask_ids=mask_ids, block_size=block_size, mesh=mesh, collective=collective)
    metrics = blockwise.similarity_metrics(pos_sim, row_neg_max, neg_sum, neg_count)
    metrics['pos_prob'] = jnp.mean(jax.nn.sigmoid(pos_sim / temperature + bias))
    return loss_sum / b, metrics
  if extra is not None:
    c = jnp.concatenate([c, extra])  # (B + M, D)
  sim = common.matmul(a, c.T)  # (B, D) . (D, B + M) -> (B, B + M), float32 accumulated
  logits = sim / temperature + bias
  eye = jnp.eye(b, sim.shape[1], dtype=bool)
  labels = jnp.where(eye, 1.0, -1.0)
  terms = jax.nn.log_sigmoid(labels * logits)
  negative_mask = blockwise.dense_mask(negative_mask, mask_ids, sim)
  if negative_mask is None:
    loss = -jnp.mean(jnp.sum(terms, axis=1))
    metrics = common.similarity_metrics(sim, eye, ~eye)
  else:
    keep = negative_mask | eye
    loss = -jnp.mean(jnp.sum(jnp.where(keep, terms, 0.0), axis=1))
    metrics = common.similarity_metrics(sim, eye, keep & ~eye, exclude=~keep)
  metrics['pos_prob'] = jnp.mean(jax.nn.sigmoid(jnp.diagonal(logits)))
  return loss, metrics
