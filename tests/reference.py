"""Plain NumPy references of the contrastive losses that several test files check against.

Each reference is written from its paper's equation, one anchor (row) at a time, in float64,
with no log-sum-exp or softplus tricks and nothing from the `contrastive` package, so that it
is independent of the code under test. Inputs are embeddings of any scale: every row is
L2-normalised here, so s_ij = <a_i, b_j> / (|a_i| |b_j|) is a cosine similarity.

Masks follow one convention: `mask[i, j]` False drops column j from row i's negatives; the
positive (i, i) is always kept, whatever the mask says.
"""

import numpy as np


def unit(x):
  """x [..., D] as float64 with every row scaled to unit L2 norm."""
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def info_nce(query, key, tau, extra=None, mask=None, own=None, own_mask=None):
  """InfoNCE (van den Oord et al. 2018, "Representation Learning with Contrastive Predictive
  Coding", eq. 4), one query at a time:

    l_i = -log( e^{s_ii / tau} / sum_{j in {i} u N(i)} e^{s_ij / tau} ),   loss = mean_i l_i

  Args:
    query: [B, D] queries q_i.
    key: [B, D] keys; key i is query i's positive, the others its in-batch negatives.
    tau: temperature.
    extra: optional [M, D] negatives shared by every query, as columns B .. B + M - 1.
    mask: optional [B, B + M] bool (or [B, B] without `extra`); False drops column j from N(i).
    own: optional [B, S, D]: own[i] are negatives of query i alone (e.g. MoCHi's mixtures).
    own_mask: optional [B, S] bool; False drops own[i, s] from N(i).

  Returns:
    The mean of l_i over the B queries (a float64 scalar).
  """
  q, cols = unit(query), unit(key)
  if extra is not None:
    cols = np.concatenate([cols, unit(extra)])
  out = []
  for i in range(len(q)):
    logits = [q[i] @ cols[j] / tau for j in range(len(cols))
              if j == i or mask is None or mask[i, j]]
    if own is not None:
      logits += [q[i] @ unit(n) / tau for s, n in enumerate(own[i])
                 if own_mask is None or own_mask[i, s]]
    out.append(np.log(np.sum(np.exp(logits))) - q[i] @ cols[i] / tau)
  return np.mean(out)


def clip_loss(za, zb, tau):
  """CLIP's symmetric loss (Radford et al. 2021, "Learning Transferable Visual Models From
  Natural Language Supervision", Figure 3): InfoNCE from a to b and from b to a, averaged,

    loss = (info_nce(za, zb, tau) + info_nce(zb, za, tau)) / 2

  Args:
    za: [B, D] embeddings of tower a; row i is paired with row i of zb.
    zb: [B, D] embeddings of tower b.
    tau: temperature.

  Returns:
    The loss (a float64 scalar).
  """
  return 0.5 * (info_nce(za, zb, tau) + info_nce(zb, za, tau))


def sigmoid_loss(za, zb, tau, bias, extra=None, mask=None):
  """SigLIP's sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training",
  eq. 1 and Algorithm 1), every (row, column) pair a binary classification:

    loss = -(1/B) sum_i sum_j log sigmoid(y_ij (s_ij / tau + b))
         =  (1/B) sum_i sum_j log(1 + exp(-y_ij (s_ij / tau + b))),

  with y_ij = +1 for the positive j = i and -1 for every other column (1 / tau is the paper's
  scale t).

  Args:
    za: [B, D] embeddings of tower a (the rows).
    zb: [B, D] embeddings of tower b; zb_i is za_i's positive, the others its negatives.
    tau: temperature.
    bias: the logit bias b.
    extra: optional [N, D] further columns B .. B + N - 1 (e.g. mined texts or NegCLIP's
      perturbations), negatives of every row.
    mask: optional [B, B + N] bool (or [B, B] without `extra`); False drops the pair (i, j),
      j != i, from the sum (e.g. the other rows of row i's group).

  Returns:
    The loss (a float64 scalar), normalised by B (not by the number of pairs kept).
  """
  a, cols = unit(za), unit(zb)
  if extra is not None:
    cols = np.concatenate([cols, unit(extra)])
  total = 0.0
  for i in range(len(a)):
    for j in range(len(cols)):
      z = a[i] @ cols[j] / tau + bias
      if j == i:
        total += np.log1p(np.exp(-z))  # the positive: y = +1
      elif mask is None or mask[i, j]:
        total += np.log1p(np.exp(z))  # a negative: y = -1
  return total / len(a)


def soft_kmeans(keys, num_clusters, iterations, assignment_temperature):
  """Soft spherical k-means of the unit keys, as PamC's loss clusters them: centroids start at
  rows 0, s, ..., (K-1) s (s = B // K); `iterations` times the assignments
  C_jc = e^{x_j . u_c / t_a} / sum_c' e^{x_j . u_c' / t_a} (u_c the unit centroid) and the
  centroids c = sum_j C_jc x_j; the final assignments [B, K] are returned."""
  x = unit(keys)
  stride = len(x) // num_clusters
  centroids = [x[c * stride] for c in range(num_clusters)]
  for step in range(iterations + 1):
    assignments = np.zeros((len(x), num_clusters))
    for j in range(len(x)):
      weights = [np.exp(x[j] @ (c / np.linalg.norm(c)) / assignment_temperature)
                 for c in centroids]
      assignments[j] = np.array(weights) / np.sum(weights)
    if step < iterations:
      centroids = [sum(assignments[j, c] * x[j] for j in range(len(x)))
                   for c in range(num_clusters)]
  return assignments


def pamc_info_nce(query, key, tau, assignments):
  """PamC's meta-node InfoNCE (Kulatilleke, Portmann & Chandra 2022, "Efficient block
  contrastive learning via parameter-free meta-node approximation"), one query at a time:
  query i's negatives j != i are replaced by K meta-nodes, each with the mass and centroid of
  the other keys' soft assignments to it,

    w_c = sum_{j != i} C_jc,   mu_c = sum_{j != i} C_jc x_j / w_c,
    l_i = -log( e^{s_ii / tau} / (e^{s_ii / tau} + sum_c w_c e^{q_i . mu_c / tau}) ).

  Args:
    query: [B, D] queries; key: [B, D] keys (key i is query i's positive).
    tau: temperature.
    assignments: [B, K] soft assignments C of the keys (rows on the simplex).

  Returns:
    (the mean of l_i, the fraction of queries whose s_ii beats every meta-node's q_i . mu_c).
  """
  q, x = unit(query), unit(key)
  losses, hits = [], []
  for i in range(len(q)):
    pos = np.exp(q[i] @ x[i] / tau)
    negatives, best = 0.0, -np.inf
    for c in range(assignments.shape[1]):
      others = [j for j in range(len(x)) if j != i]
      mass = sum(assignments[j, c] for j in others)
      if mass > 0:
        centroid = sum(assignments[j, c] * x[j] for j in others) / mass
        negatives += mass * np.exp(q[i] @ centroid / tau)
        best = max(best, q[i] @ centroid)
    losses.append(-np.log(pos / (pos + negatives)))
    hits.append(q[i] @ x[i] > best)
  return np.mean(losses), np.mean(hits)
