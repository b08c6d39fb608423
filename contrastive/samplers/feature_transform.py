"""Feature Transformation (FT): extrapolated positives, interpolated negatives, and the
positive / negative score histograms the method is read from.

Zhu et al. make the positive pair harder by pushing the two views apart along their chord
(positive extrapolation) and make the negatives more diverse by mixing pairs of them (negative
interpolation). Both act on L2-normalised embeddings; the losses normalise again afterwards.
"""

import jax
import jax.numpy as jnp
import numpy as np

from contrastive.losses import at_least_float32
from contrastive.losses import l2_normalize


def beta_lambdas(rng, shape, alpha, dtype=jnp.float32):
  """lam ~ Beta(alpha, alpha), [shape] of dtype in [0, 1]: the draws both transforms use (in
  the embeddings' dtype: float32, or float64 for float64 inputs)."""
  if isinstance(alpha, (int, float)) and not alpha > 0:
    raise ValueError(f'alpha must be > 0; got {alpha}.')
  return jax.random.beta(rng, alpha, alpha, tuple(shape), dtype)


def extrapolate_positives(rng, z1, z2, alpha):
  """Positive extrapolation: moves each view away from its partner along their chord.

  With z1, z2 L2-normalised first and lam_i = beta_lambdas(rng, (B,), alpha)[i] in [0, 1]:

      z1'_i = z1_i + lam_i (z1_i - z2_i),     z2'_i = z2_i + lam_i (z2_i - z1_i),

  i.e. the paper's z1' = lam_ex z1 + (1 - lam_ex) z2 with lam_ex = 1 + lam ~ 1 + Beta(a, a).
  The pair's similarity drops (a harder positive); gradients flow through to z1 and z2.

  Args:
    rng: a PRNG key, used as is for the lam draw (so `beta_lambdas` reproduces it, given the
      embeddings' dtype).
    z1: [B, D] embeddings of the first view.
    z2: [B, D] embeddings of the second view.
    alpha: Beta parameter > 0.

  Returns:
    (z1' [B, D], z2' [B, D]) float32 (float64 for float64 inputs), not renormalised.

  References:
    Zhu, Zhao, Liu, Sun & Chen 2021, "Improving Contrastive Learning by Visualizing Feature
    Transformation" (ICCV, arXiv:2108.02982): extrapolation of positives.

  >>> z1, z2 = jax.random.normal(jax.random.key(0), (2, 8, 16))
  >>> z1x, z2x = extrapolate_positives(jax.random.key(1), z1, z2, alpha=2.0)
  """
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(f'z1 and z2 must both be [B, D] with the same shape; got z1: '
                     f'{tuple(z1.shape)}, z2: {tuple(z2.shape)}.')
  z1, z2 = l2_normalize(z1), l2_normalize(z2)
  lam = beta_lambdas(rng, z1.shape[:1], alpha, jnp.result_type(z1, z2))[:, None]  # [B, 1]
  return z1 + lam * (z1 - z2), z2 + lam * (z2 - z1)


def interpolation_pairs(rng, m, num, alpha, dtype=jnp.float32):
  """The random mixes of `interpolate_negatives`: (a [num], b [num] int32 with a != b,
  lam [num] of dtype)."""
  rng_a, rng_b, rng_lam = jax.random.split(rng, 3)
  a = jax.random.randint(rng_a, (num,), 0, m)
  b = (a + jax.random.randint(rng_b, (num,), 1, m)) % m  # uniform over the other m - 1 rows
  return a.astype(jnp.int32), b.astype(jnp.int32), beta_lambdas(rng_lam, (num,), alpha, dtype)


def interpolate_negatives(rng, negatives, num, alpha):
  """Negative interpolation: num convex mixes of random pairs of distinct negatives.

  With n the L2-normalised negatives and (a_j, b_j, lam_j) = interpolation_pairs(rng, M, num,
  alpha), a_j != b_j uniform, lam_j ~ Beta(alpha, alpha) (alpha = 1: uniform on (0, 1)):

      n'_j = lam_j n_{a_j} + (1 - lam_j) n_{b_j}.

  The mixes are constants for the loss (stop-gradient), like the queue they come from.

  Args:
    rng: a PRNG key.
    negatives: [M, D] negatives (a MoCo queue or candidate set), M >= 2.
    num: number of mixes to return, >= 1 (static).
    alpha: Beta parameter > 0.

  Returns:
    [num, D] float32 mixes (float64 for float64 inputs), inside the unit ball, not
    renormalised, e.g. appended to the loss's extra negatives.

  References:
    Zhu et al. 2021 (ICCV, arXiv:2108.02982): interpolation among negatives.
  """
  if negatives.ndim != 2 or negatives.shape[0] < 2:
    raise ValueError(f'negatives must be [M, D] with M >= 2; got {tuple(negatives.shape)}.')
  if num < 1:
    raise ValueError(f'num must be >= 1; got {num}.')
  n = l2_normalize(jax.lax.stop_gradient(negatives))
  a, b, lam = interpolation_pairs(rng, negatives.shape[0], num, alpha, n.dtype)
  lam = lam[:, None]
  return lam * n[a] + (1.0 - lam) * n[b]  # (num, D)


_CLIP_TOL = 1e-3  # scores this close outside [-1, 1] are rounding errors, clipped into the range


def score_histograms(pos_sim, neg_sim, bins=20):
  """Counts of positive and negative cosine scores in `bins` equal bins over [-1, 1].

  Scores within 1e-3 outside [-1, 1] are clipped in (float rounding can put a cosine at
  1 + 1e-7); scores further out are counted in no bin, so a caller can leave entries out by
  setting them to e.g. 3.0. The last bin is closed, as in np.histogram. Jit-able, static bins.

  Args:
    pos_sim: [B] (or any shape) positive-pair similarities s_ii.
    neg_sim: [...] negative similarities, any shape (e.g. [B, B + M] masked rows flattened).
    bins: number of bins.

  Returns:
    dict(pos=[bins] int32, neg=[bins] int32, edges=[bins + 1] float32).
  """
  def counts(s):
    s = jnp.ravel(at_least_float32(s))
    s = jnp.where(jnp.abs(s) <= 1.0 + _CLIP_TOL, jnp.clip(s, -1.0, 1.0), s)
    c, _ = jnp.histogram(s, bins=bins, range=(-1.0, 1.0))
    return c.astype(jnp.int32)

  edges = jnp.linspace(-1.0, 1.0, bins + 1, dtype=jnp.float32)
  return dict(pos=counts(pos_sim), neg=counts(neg_sim), edges=edges)


def plot_score_histograms(history, path):
  """Writes a PNG of the positive and negative score distributions over training.

  Two panels (positives, negatives); each recorded step is one line of bin densities
  (counts / (total * bin width)), coloured from dark (early) to light (late) steps.

  Args:
    history: list of (step, {'pos': [bins], 'neg': [bins], 'edges': [bins + 1]}) with NumPy
      (or device) arrays, e.g. `score_histograms` outputs fetched every few hundred steps.
    path: where to write the PNG.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, no pyplot state
  from matplotlib.figure import Figure
  from matplotlib import cm
  from matplotlib import colors

  if not history:
    raise ValueError('history is empty; record at least one (step, histograms) pair.')
  steps = [int(step) for step, _ in history]
  norm = colors.Normalize(min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1)
  fig = Figure(figsize=(10, 4))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 2, sharex=True)
  for ax, name, title in zip(axes, ('pos', 'neg'), ('positive pairs', 'negatives')):
    for step, hist in history:
      edges = np.asarray(hist['edges'], np.float64)
      c = np.asarray(hist[name], np.float64)
      density = c / max(c.sum(), 1.0) / np.diff(edges)
      ax.plot(0.5 * (edges[1:] + edges[:-1]), density, color=cm.viridis(norm(int(step))))
    ax.set_title(f'{title}: cosine similarity')
    ax.set_xlabel('similarity')
    ax.set_ylabel('density')
  fig.colorbar(cm.ScalarMappable(norm=norm, cmap='viridis'), ax=list(axes), label='step')
  fig.savefig(path, dpi=80)
