"""Few-shot evaluation of frozen features: N-way K-shot episodes, nearest-prototype
classification, and BECLR's optimal-transport prototype alignment (OpTA).

Poulakakis-Daktylidis & Jamali-Rad, "BECLR: Batch Enhanced Contrastive Few-Shot Learning",
ICLR 2024, section 4 (OpTA). An episode draws n_way classes and, from each, k_shot support
and n_query query examples; a class's prototype is the mean of its support features. A
support set of a few examples sits away from where the query features lie (the sample bias
of section 4); OpTA moves each prototype to the barycenter of the queries that the entropic
optimal transport plan sends it, i.e. into the queries' distribution.

The authors fit a logistic regression on the (transported) prototypes; here queries go to the
nearest prototype by cosine similarity (ProtoNet's classifier, Snell et al. 2017), which
needs no solver and runs vectorised over episodes.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from contrastive.losses import l2_normalize

# The authors' evaluation (BECLR evaluate.py): OpTA passes for 1-shot and for k_shot > 1
# episodes, and the share of the transported prototypes for k_shot > 1.
ONE_SHOT_PASSES = 5
MULTI_SHOT_PASSES = 1
MIX = 0.7


def sample_episodes(labels, rng, *, n_way, k_shot, n_query, num_episodes):
  """Random N-way K-shot episodes over a labelled pool.

  Each episode draws n_way distinct classes, and from each class k_shot + n_query distinct
  examples (the first k_shot the support, the rest the queries). Vectorised: the draws are
  the smallest of uniform keys, per episode and per (episode, class).

  Args:
    labels: [N] int class of each example.
    rng: np.random.Generator or a seed.
    n_way, k_shot, n_query, num_episodes: ints >= 1.

  Returns:
    (support [E, n_way, k_shot], query [E, n_way, n_query]) int indices into labels; row w
    of an episode holds examples of one class, its episode-local label w.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be [N]; got shape {labels.shape}.')
  for name, value in (('n_way', n_way), ('k_shot', k_shot), ('n_query', n_query),
                      ('num_episodes', num_episodes)):
    if value < 1:
      raise ValueError(f'{name}={value} must be >= 1.')
  classes, counts = np.unique(labels, return_counts=True)
  per_class = k_shot + n_query
  if len(classes) < n_way:
    raise ValueError(f'{n_way}-way episodes need {n_way} classes; the labels hold '
                     f'{len(classes)}.')
  if counts.min() < per_class:
    short = classes[counts < per_class]
    raise ValueError(f'class {short[0]} has {counts[counts < per_class][0]} examples; '
                     f'{k_shot}-shot episodes with {n_query} queries need {per_class} of '
                     f'every class (classes short of it: {short[:10].tolist()}).')
  by_class = np.argsort(labels, kind='stable')  # indices grouped by class, classes ascending
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  rng = np.random.default_rng(rng)
  ways = np.argsort(rng.random((num_episodes, len(classes))), axis=1)[:, :n_way]  # [E, W]
  keys = rng.random((num_episodes, n_way, counts.max()))  # [E, W, max count]
  keys[np.arange(counts.max()) >= counts[ways][..., None]] = np.inf  # past the class's end
  picks = np.argpartition(keys, per_class - 1, axis=-1)[..., :per_class]
  # argpartition's order within the picks is not random: order them by their keys.
  picks = np.take_along_axis(picks, np.argsort(np.take_along_axis(keys, picks, -1), -1), -1)
  idx = by_class[starts[ways][..., None] + picks]  # [E, W, k_shot + n_query]
  return idx[..., :k_shot], idx[..., k_shot:]


def standardize(features):
  """Each feature vector standardised over its own F entries, as the authors do before
  few-shot evaluation: (f - mean(f)) / std(f), std with Bessel's correction (torch.std).
  [..., F] -> [..., F] in at least float32."""
  f = features.astype(jnp.promote_types(features.dtype, jnp.float32))
  f = f - jnp.mean(f, axis=-1, keepdims=True)
  std = jnp.std(f, axis=-1, keepdims=True, ddof=1)
  return f / jnp.maximum(std, jnp.finfo(f.dtype).tiny)  # a constant row stays 0, not NaN


@functools.partial(jax.jit, static_argnames=('max_iterations',))
def sinkhorn_plan(prototypes, queries, *, epsilon=0.05, max_iterations=1000, tolerance=1e-4):
  """Entropic optimal transport plan between prototypes and queries, uniform marginals.

    C_ij = |p_i - q_j|^2 / max_ij |p_i - q_j|^2,   a = 1/N,   b = 1/M,
    pi = argmin_{pi 1 = a, pi^T 1 = b} <pi, C> - epsilon H(pi)
       = exp((f_i + g_j - C_ij) / epsilon),

  by log-domain Sinkhorn (Cuturi 2013; Peyre & Cuturi 2019, remark 4.23) from g = 0:
    f_i = epsilon (log a_i - logsumexp_j (g_j - C_ij) / epsilon),
    g_j = epsilon (log b_j - logsumexp_i (f_i - C_ij) / epsilon),
  until sum_i |f_i - f_i'| < tolerance (the authors' stopping rule, 1e-4) or after
  max_iterations (1000). The columns then sum to b exactly, the rows to a within tolerance.

  Args:
    prototypes: [N, F]; queries: [M, F].

  Returns:
    pi: [N, M], summing to 1.
  """
  p, q = prototypes, queries
  cost = jnp.sum((p[:, None, :] - q[None, :, :]) ** 2, axis=-1)  # (N, 1, F) - (1, M, F) -> (N, M)
  cost = cost / jnp.maximum(jnp.max(cost), jnp.finfo(cost.dtype).tiny)
  log_a, log_b = -jnp.log(p.shape[0]), -jnp.log(q.shape[0])

  def body(carry):
    i, f, g, _ = carry
    f_new = epsilon * (log_a - jax.nn.logsumexp((g[None, :] - cost) / epsilon, axis=1))
    g = epsilon * (log_b - jax.nn.logsumexp((f_new[:, None] - cost) / epsilon, axis=0))
    return i + 1, f_new, g, jnp.sum(jnp.abs(f_new - f))

  def keep_going(carry):
    i, _, _, err = carry
    return (i < max_iterations) & (err >= tolerance)

  zero = jnp.zeros((), cost.dtype)
  init = (0, jnp.zeros(cost.shape[0], cost.dtype), jnp.zeros(cost.shape[1], cost.dtype),
          zero + jnp.inf)
  _, f, g, _ = jax.lax.while_loop(keep_going, body, init)
  return jnp.exp((f[:, None] + g[None, :] - cost) / epsilon)


@functools.partial(jax.jit, static_argnames=('passes', 'max_iterations'))
def opta(prototypes, queries, *, epsilon=0.05, passes=1, max_iterations=1000, tolerance=1e-4):
  """Optimal-transport prototype alignment (BECLR, ICLR 2024, section 4, algorithm 2).

  Each pass moves every prototype to the barycenter of the queries the plan sends it:
    p <- diag(pi 1)^{-1} pi q,   pi = sinkhorn_plan(p, q)
  (the queries stay). The authors run 5 passes in 1-shot episodes, 1 pass otherwise.

  Args:
    prototypes: [N, F]; queries: [M, F].

  Returns:
    transported prototypes [N, F].
  """
  for _ in range(passes):
    plan = sinkhorn_plan(prototypes, queries, epsilon=epsilon, max_iterations=max_iterations,
                         tolerance=tolerance)  # (N, M)
    prototypes = (plan / jnp.sum(plan, axis=1, keepdims=True)) @ queries  # (N, M) . (M, F)
  return prototypes


def nearest_prototype(prototypes, queries):
  """[M] index of each query's prototype of highest cosine similarity (ProtoNet's rule).
  prototypes: [N, F]; queries: [M, F]."""
  return jnp.argmax(l2_normalize(queries) @ l2_normalize(prototypes).T, axis=-1)  # (M, N)


@functools.partial(jax.jit, static_argnames=('use_opta', 'chunk'))
def episode_accuracies(features, support, query, *, use_opta=True, epsilon=0.05, chunk=100):
  """Query accuracy of each episode by nearest prototype, with or without OpTA.

  Prototypes are the means of the support features. With OpTA they are transported
  (ONE_SHOT_PASSES passes when k_shot = 1; else MULTI_SHOT_PASSES, then mixed as
  MIX * transported + (1 - MIX) * original, as the authors do). Episodes run vmapped in
  chunks of `chunk` (memory: chunk * n_way * (k_shot + n_query) * F features at once).

  Args:
    features: [N, F] (standardised by the caller, e.g. `standardize`).
    support: [E, n_way, k_shot] and query: [E, n_way, n_query] int indices into features.

  Returns:
    [E] fraction of each episode's n_way * n_query queries classified right (features' dtype).
  """
  n_way, k_shot = support.shape[1:]
  truth = jnp.repeat(jnp.arange(n_way), query.shape[2])  # [W * Q]

  def accuracy(episode):
    s, q = episode
    prototypes = jnp.mean(features[s], axis=1)  # (W, K, F) -> (W, F)
    queries = features[q].reshape(-1, features.shape[1])  # (W * Q, F)
    if use_opta:
      passes = ONE_SHOT_PASSES if k_shot == 1 else MULTI_SHOT_PASSES
      moved = opta(prototypes, queries, epsilon=epsilon, passes=passes)
      prototypes = moved if k_shot == 1 else MIX * moved + (1 - MIX) * prototypes
    return jnp.mean((nearest_prototype(prototypes, queries) == truth).astype(features.dtype))

  return jax.lax.map(accuracy, (support, query), batch_size=chunk)


# pylint: disable-next=redefined-outer-name (`opta`: whether to run the function `opta`)
def evaluate_few_shot(features, labels, *, n_way=5, shots=(1, 5), n_query=15,
                      num_episodes=600, seed=0, opta=True, chunk=100):
  """Mean accuracy and 95% confidence interval of n_way-way few-shot episodes.

  The episodes are drawn once with max(shots) support examples per class; a k-shot episode
  uses the first k of them and the same queries (so do the authors), and the runs with and
  without OpTA see the same episodes. Features are standardised per vector (`standardize`).

  Args:
    features: [N, F]; labels: [N] int.
    opta: also report the accuracies with OpTA.

  Returns:
    {'fewshot_{n_way}w{k}s': mean accuracy over episodes, '..._ci95': 1.96 std / sqrt(E)}
    for each k in shots, and the same with '_opta' after 's' (e.g. 'fewshot_5w1s_opta_ci95').
  """
  support, query = sample_episodes(labels, seed, n_way=n_way, k_shot=max(shots),
                                   n_query=n_query, num_episodes=num_episodes)
  feats = standardize(jnp.asarray(features))
  metrics = {}
  for k in shots:
    for suffix, use_opta in (('', False), ('_opta', True))[:2 if opta else 1]:
      acc = np.asarray(episode_accuracies(feats, support[..., :k], query, use_opta=use_opta,
                                          chunk=chunk), np.float64)
      name = f'fewshot_{n_way}w{k}s{suffix}'
      metrics[name] = float(acc.mean())
      metrics[f'{name}_ci95'] = float(1.96 * acc.std() / np.sqrt(acc.size))
  return metrics


_CHECKS = {
    'n_way': (lambda v: v >= 2, 'be >= 2'),
    'shots': (lambda v: len(v) > 0 and all(k >= 1 for k in v), 'hold shots >= 1'),
    'n_query': (lambda v: v >= 1, 'be >= 1'),
    'num_episodes': (lambda v: v >= 1, 'be >= 1 (or 0: off)'),
    'seed': (lambda v: v >= 0, 'be >= 0'),
    'opta': (lambda v: isinstance(v, bool), 'be True or False'),
}


def settings(cfg):
  """evaluate_few_shot's keyword arguments from config.eval.fewshot (a ConfigDict or dict of
  _CHECKS' fields), every field present (evaluate_few_shot's defaults for those not given);
  None when it is absent, empty, or num_episodes is 0. Raises ValueError naming a field out
  of range or unknown."""
  fields = {} if cfg is None else (cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg))
  if not fields or fields.get('num_episodes') == 0:
    return None
  for name, value in fields.items():
    if name not in _CHECKS:
      raise ValueError(f'config.eval.fewshot.{name} is not a field; fields: {sorted(_CHECKS)}.')
    if name == 'shots':
      value = fields[name] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    ok, requirement = _CHECKS[name]
    if not ok(value):
      raise ValueError(f'config.eval.fewshot.{name}={value!r} must {requirement}.')
  defaults = {k: p.default for k, p in inspect.signature(evaluate_few_shot).parameters.items()
              if k in _CHECKS}
  return {**defaults, **fields}


def check_pool(labels, *, n_way, shots, n_query, **_):
  """Raises sample_episodes' ValueError now if `labels` cannot hold the episodes of
  `settings` (too few classes, or a class with fewer than max(shots) + n_query examples)."""
  sample_episodes(labels, 0, n_way=n_way, k_shot=max(shots), n_query=n_query, num_episodes=1)
