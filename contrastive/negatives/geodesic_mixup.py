"""Geodesic multi-modal mixup (m^3-Mix): hard negatives on the hypersphere between the image and
the text embedding of a pair.

CLIP's image and text embeddings occupy two separate regions of the unit sphere. m^3-Mix mixes
the image and the text embedding of each pair j along the great circle joining them,

    m_j = slerp(a_j, b_j, lam),   lam ~ Beta(alpha, alpha),

a point between the two modalities, and uses m_j as a negative of every other pair's image and
text (i != j): closer to the anchors than the plain in-batch negatives, hence harder.
"""

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from contrastive.losses import common


def _unit(x):
  """x / |x| along the last axis, exactly (no epsilon: near-antipodal inputs need <x, y> to
  full precision); a zero vector stays zero."""
  ss = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.where(ss > 0, ss, 1.0))


def slerp(x, y, lam):
  """Spherical linear interpolation: the point at fraction lam of the great-circle arc x -> y.

  With x, y L2-normalised first and theta = arccos(<x, y>) in [0, pi]:

      slerp(x, y, lam) = x sin((1 - lam) theta) / sin(theta) + y sin(lam theta) / sin(theta),

  computed as cos(lam theta) x + sin(lam theta) v / |v| with v = y - <x, y> x (|v| = sin theta,
  theta = atan2(|v|, <x, y>): accurate at small angles, where arccos is not). The result has
  unit norm and makes the angle lam * theta with x (lam = 0: x; lam = 1: y; lam outside [0, 1]
  extrapolates along the same circle). When |v| < sqrt(eps) of the dtype (theta within ~1e-8
  (float64) or ~3e-4 (float32) of 0 or pi) the direction v / |v| is rounding noise, so:

    theta ~ 0:   the normalised linear mix normalize((1 - lam) x + lam y), equal to the slerp up
                 to O(theta^3);
    theta ~ pi:  x and y are (nearly) antipodal and every half great circle joins them; the one
                 through e_k, the coordinate axis least aligned with x (k = argmin_k |x_k|), is
                 taken: cos(lam pi) x + sin(lam pi) normalize(e_k - x_k x), still of unit norm,
                 at angle lam * pi from x and ending at -x.

  Values and gradients are finite everywhere (the branches are selected with a double `where`).

  Args:
    x: [..., D] embeddings, D >= 2 (the start, lam = 0); a zero row gives a finite but
      meaningless result.
    y: [..., D] embeddings of the same shape (the end, lam = 1).
    lam: [...] or a scalar, broadcastable to x.shape[:-1].

  Returns:
    [..., D] unit vectors, float32 (float64 for float64 inputs).

  References:
    Shoemake 1985, "Animating rotation with quaternion curves" (SIGGRAPH): slerp.

  >>> x, y = jnp.eye(2)
  >>> m = slerp(x, y, 0.5)  # [0.7071, 0.7071]: 45 degrees from each
  """
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.ndim < 1 or x.shape != y.shape or x.shape[-1] < 2:
    raise ValueError(f'x and y must be [..., D] with D >= 2 and the same shape; got x: '
                     f'{tuple(x.shape)}, y: {tuple(y.shape)}.')
  try:
    lam_ok = jnp.broadcast_shapes(jnp.shape(lam), x.shape[:-1]) == x.shape[:-1]
  except ValueError:
    lam_ok = False
  if not lam_ok:
    raise ValueError(f'lam must broadcast to x.shape[:-1] = {x.shape[:-1]}; got '
                     f'{tuple(jnp.shape(lam))}.')
  dtype = jnp.result_type(common.at_least_float32(x), common.at_least_float32(y))
  x, y = _unit(x.astype(dtype)), _unit(y.astype(dtype))
  lam = jnp.asarray(lam, dtype)[..., None]  # (..., 1)
  c = jnp.clip(jnp.sum(x * y, axis=-1, keepdims=True), -1.0, 1.0)  # (..., 1) cos(theta)
  v = y - c * x  # (..., D) the part of y orthogonal to x
  ss = jnp.sum(v * v, axis=-1, keepdims=True)  # sin(theta)^2
  small = ss < np.finfo(dtype).eps  # |v| < sqrt(eps): theta ~ 0 or theta ~ pi
  s = jnp.sqrt(jnp.where(small, 1.0, ss))  # |v|, 1 where it is not used (finite gradients)
  theta = jnp.arctan2(s, c)
  general = jnp.cos(lam * theta) * x + (jnp.sin(lam * theta) / s) * v
  linear = (1.0 - lam) * x + lam * y  # theta ~ 0
  axis = jax.nn.one_hot(jnp.argmin(jnp.abs(x), axis=-1), x.shape[-1], dtype=dtype)  # (..., D)
  u = _unit(axis - jnp.sum(axis * x, axis=-1, keepdims=True) * x)  # u . x = 0 (norm^2 >= 1/2)
  antipodal = jnp.cos(lam * jnp.pi) * x + jnp.sin(lam * jnp.pi) * u  # theta ~ pi
  out = jnp.where(small, jnp.where(c > 0, linear, antipodal), general)
  return _unit(out)


def geodesic_negatives(za, zb, key, *, alpha):
  """m^3-Mix hard negatives: for each pair i, the geodesic mixes of the other pairs j != i.

  With a, b the L2-normalised rows of za, zb (row i of each is pair i) and one
  lam ~ Beta(alpha, alpha) per call (as in the authors' code; for one lam per pair call
  `slerp(za, zb, lam)` with lam [B]):

      m_j = slerp(a_j, b_j, lam),        negatives[i] = (m_j for j != i, in increasing j),

  so negatives[i, k] = m_k for k < i and m_{k+1} for k >= i. The same negatives serve both
  directions: `info_nce(za, zb, query_negatives=negatives)` and `info_nce(zb, za,
  query_negatives=negatives)` add them to the in-batch negatives. The paper's m^3-Mix term
  keeps only the positive and these negatives in each denominator (add `negative_mask=
  jnp.zeros((B, B), bool)` to both calls) and is added, weighted, to CLIP's loss (the authors'
  code also gives the mixed logits their own temperature). Gradients flow through the mixes
  into both towers, as in the paper (no stop-gradient, unlike the FT and MoCHi samplers).
  Memory is O(B^2 D); the same loss in O(B D): `extra_negatives=slerp(za, zb, lam)` with
  `negative_mask=jnp.concatenate([keep, ~jnp.eye(B, dtype=bool)], 1)`, keep = ones((B, B))
  or zeros((B, B)) as above.

  Args:
    za: [B, D] embeddings of one modality (images), B >= 2, D >= 2.
    zb: [B, D] embeddings of the other (texts); row i pairs with za's row i.
    key: a jax PRNG key for the lam draw.
    alpha: the Beta parameter > 0 (alpha = 1: lam uniform; alpha < 1: lam near 0 or 1, mixes
      near one modality; alpha > 1: near the middle of the arc).

  Returns:
    (negatives, lam): negatives [B, B - 1, D] unit vectors float32 (float64 for float64 inputs),
    for the loss's `query_negatives`; lam the scalar mixing ratio drawn.

  References:
    Oh, So, Byun, Lim, Shin, Jeon & Song 2023, "Geodesic Multi-Modal Mixup for Robust
    Fine-Tuning" (NeurIPS, arXiv:2203.03897), Section 4 (m^3-Mix); code:
    github.com/changdaeoh/multimodal-mixup.

  >>> za, zb = jax.random.normal(jax.random.key(0), (2, 8, 16))
  >>> negatives, lam = geodesic_negatives(za, zb, jax.random.key(1), alpha=0.5)
  """
  if za.ndim != 2 or za.shape != zb.shape or za.shape[0] < 2 or za.shape[1] < 2:
    raise ValueError(f'za and zb must both be [B, D] with B >= 2, D >= 2 and the same shape; '
                     f'got za: {tuple(za.shape)}, zb: {tuple(zb.shape)}.')
  if isinstance(alpha, bool) or (isinstance(alpha, numbers.Number) and not alpha > 0):
    raise ValueError(f'alpha must be > 0; got {alpha!r}.')
  b = za.shape[0]
  dtype = jnp.result_type(common.at_least_float32(za), common.at_least_float32(zb))
  lam = jax.random.beta(key, alpha, alpha, (), dtype)
  mixes = slerp(za, zb, lam)  # (B, D): pair j's image-text mix
  k = jnp.arange(b - 1)[None, :]  # (1, B - 1)
  j = k + (k >= jnp.arange(b)[:, None])  # (B, B - 1): the pairs j != i, in increasing order
  return mixes[j], lam  # (B, B - 1, D)
