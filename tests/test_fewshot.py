"""Few-shot episodes, OpTA's Sinkhorn and the Evaluator's few-shot metrics against plain NumPy
re-derivations (contrastive/fewshot.py)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from contrastive import evaluate
from contrastive import fewshot
from contrastive import parallel
from tests import float64


# ---------------------------------------------------------------- NumPy re-derivations


def reference_sinkhorn(p, q, epsilon=0.05, max_iterations=1000, tolerance=1e-4):
  """Sinkhorn's scaling form (Cuturi 2013, algorithm 1): u = a / (K v), v = b / (K^T u),
  K = exp(-C / epsilon), stopping when epsilon * sum |log u - log u'| < tolerance."""
  cost = ((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)
  cost = cost / cost.max()
  kernel = np.exp(-cost / epsilon)
  a, b = np.full(len(p), 1 / len(p)), np.full(len(q), 1 / len(q))
  u, v = np.ones(len(p)), np.ones(len(q))
  for _ in range(max_iterations):
    u_prev = u
    u = a / (kernel @ v)
    v = b / (kernel.T @ u)
    if epsilon * np.abs(np.log(u) - np.log(u_prev)).sum() < tolerance:
      break
  return u[:, None] * kernel * v[None, :]


def reference_accuracy(features, support, query, use_opta):
  """One episode: standardised features, class-mean prototypes (OpTA: 5 passes for 1 shot,
  else 1 pass mixed 0.7 / 0.3), nearest prototype by cosine similarity."""
  f = (features - features.mean(1, keepdims=True)) / features.std(1, ddof=1, keepdims=True)
  n_way, k_shot = support.shape
  protos = f[support].mean(1)
  queries = f[query.reshape(-1)]
  if use_opta:
    moved = protos
    for _ in range(5 if k_shot == 1 else 1):
      plan = reference_sinkhorn(moved, queries)
      moved = plan / plan.sum(1, keepdims=True) @ queries
    protos = moved if k_shot == 1 else 0.7 * moved + 0.3 * protos
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  pred = np.argmax(unit(queries) @ unit(protos).T, axis=1)
  return np.mean(pred == np.repeat(np.arange(n_way), query.shape[1]))


def clusters(rng, num_classes, per_class, dim, noise):
  labels = np.repeat(np.arange(num_classes), per_class)
  centres = rng.normal(size=(num_classes, dim))
  return centres[labels] + noise * rng.normal(size=(len(labels), dim)), labels


# ---------------------------------------------------------------- Sinkhorn


def test_sinkhorn_matches_the_scaling_form():
  """The log-domain plan equals the scaling-form one in float64, after 1, 7 and 60 iterations
  and at the authors' stopping rule; one iteration fewer than 7 (the counterexample) differs."""
  rng = np.random.default_rng(0)
  p, q = rng.normal(size=(5, 16)), rng.normal(size=(75, 16)) + 0.5
  with float64.enabled():
    for iterations in (1, 7, 60):
      got = fewshot.sinkhorn_plan(p, q, max_iterations=iterations, tolerance=0.0)
      want = reference_sinkhorn(p, q, max_iterations=iterations, tolerance=0.0)
      np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15, err_msg=f'{iterations}')
    want = reference_sinkhorn(p, q, max_iterations=7, tolerance=0.0)
    other = reference_sinkhorn(p, q, max_iterations=6, tolerance=0.0)
    assert np.abs(other - want).max() > 1e-3 * want.max()
    got = fewshot.sinkhorn_plan(p, q)  # tolerance 1e-4, at most 1000 iterations
    np.testing.assert_allclose(got, reference_sinkhorn(p, q), rtol=1e-9, atol=1e-15)
    # OpTA's passes: barycenters of the queries under the plan, from the reference plan.
    moved = p
    for _ in range(3):
      plan = reference_sinkhorn(moved, q)
      moved = plan / plan.sum(1, keepdims=True) @ q
    np.testing.assert_allclose(fewshot.opta(p, q, passes=3), moved, rtol=1e-9, atol=1e-12)


def test_plan_has_the_uniform_marginals():
  """Columns sum to 1/M exactly (the last half-step fixes them), rows to 1/N within the
  stopping rule's slack; with a tight tolerance both to 1e-9 relative (float64)."""
  rng = np.random.default_rng(1)
  p, q = rng.normal(size=(5, 8)), rng.normal(size=(40, 8))
  with float64.enabled():
    plan = np.asarray(fewshot.sinkhorn_plan(p, q))
    np.testing.assert_allclose(plan.sum(0), 1 / 40, rtol=1e-12)
    np.testing.assert_allclose(plan.sum(1), 1 / 5, rtol=1e-2)
    tight = np.asarray(fewshot.sinkhorn_plan(p, q, tolerance=1e-13, max_iterations=20000))
    np.testing.assert_allclose(tight.sum(1), 1 / 5, rtol=1e-9)
    np.testing.assert_allclose(tight.sum(), 1.0, rtol=1e-12)
    assert (plan >= 0).all()


# ---------------------------------------------------------------- episodes


def test_episodes_are_disjoint_distinct_and_seeded():
  labels = np.repeat(np.arange(7), [6, 10, 30, 8, 12, 9, 7])
  np.random.default_rng(2).shuffle(labels)
  kw = dict(n_way=4, k_shot=2, n_query=4, num_episodes=300)
  support, query = fewshot.sample_episodes(labels, 5, **kw)
  assert support.shape == (300, 4, 2) and query.shape == (300, 4, 4)
  rows = np.concatenate([support, query], axis=2)  # [E, W, 6]
  row_labels = labels[rows]
  assert (row_labels == row_labels[..., :1]).all()  # one class per way
  assert all(len(set(c)) == 4 for c in row_labels[..., 0])  # n_way distinct classes
  assert all(len(set(e)) == 24 for e in rows.reshape(300, -1))  # support and query disjoint
  again = fewshot.sample_episodes(labels, np.random.default_rng(5), **kw)
  np.testing.assert_array_equal(again[0], support)
  np.testing.assert_array_equal(again[1], query)
  other = fewshot.sample_episodes(labels, 6, **kw)
  assert (other[0] != support).any()


def test_episodes_draw_every_example_alike():
  """Each of a class's 20 examples is drawn with probability 4/20, and is the support with
  probability 1/20: no position in the class, nor in the draw, is favoured."""
  labels = np.repeat(np.arange(5), 20)
  support, query = fewshot.sample_episodes(labels, 0, n_way=5, k_shot=1, n_query=3,
                                           num_episodes=4000)
  drawn = np.bincount(np.concatenate([support.ravel(), query.ravel()]), minlength=100)
  as_support = np.bincount(support.ravel(), minlength=100)
  assert 700 < drawn.min() and drawn.max() < 900, (drawn.min(), drawn.max())  # 800 expected
  assert 140 < as_support.min() and as_support.max() < 260  # 200 expected


def test_episodes_refuse_small_pools():
  labels = np.repeat(np.arange(4), [20, 20, 5, 20])
  with pytest.raises(ValueError, match=r'class 2 has 5 examples.*need 6'):
    fewshot.sample_episodes(labels, 0, n_way=3, k_shot=1, n_query=5, num_episodes=2)
  with pytest.raises(ValueError, match=r'5-way episodes need 5 classes; the labels hold 4'):
    fewshot.sample_episodes(labels, 0, n_way=5, k_shot=1, n_query=2, num_episodes=2)


# ---------------------------------------------------------------- accuracy


def test_episode_accuracy_matches_reference():
  """Per-episode accuracy with and without OpTA, 1 and 3 shots, equals the NumPy derivation
  (float64; the reference standardises each gathered feature itself)."""
  rng = np.random.default_rng(3)
  features, labels = clusters(rng, 6, 30, 12, noise=1.2)
  with float64.enabled():
    feats = fewshot.standardize(jnp.asarray(features))
    for k_shot in (1, 3):
      support, query = fewshot.sample_episodes(labels, k_shot, n_way=4, k_shot=k_shot,
                                               n_query=5, num_episodes=6)
      for use_opta in (False, True):
        got = fewshot.episode_accuracies(feats, support, query, use_opta=use_opta, chunk=4)
        want = [reference_accuracy(features, s, q, use_opta) for s, q in zip(support, query)]
        np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=f'{k_shot} {use_opta}')


@pytest.mark.parametrize('k_shot', [1, 5])
def test_opta_undoes_a_shift_of_the_support(k_shot):
  """Five classes a step apart along a line; the support features are offset from the
  queries' domain by one constant step, so each class's prototype sits on the next class's
  queries and nearest prototype gets ~1/5 right. The transport plan, which a common shift
  does not change (up to the cost's scale), pairs each prototype with its own class's
  queries: OpTA brings 1-shot accuracy to ~1 (5-shot keeps 0.3 of the shifted means)."""
  rng = np.random.default_rng(4)
  labels = np.repeat(np.arange(5), 40)
  base, step = 3 * rng.normal(size=16), rng.normal(size=16)
  step = 1.5 * (step - step @ base / (base @ base) * base) / np.linalg.norm(step)
  queries = base + labels[:, None] * step + 0.2 * rng.normal(size=(200, 16))
  feats = fewshot.standardize(jnp.asarray(np.concatenate([queries, queries + step]),
                                          jnp.float32))
  support, query = fewshot.sample_episodes(labels, 0, n_way=5, k_shot=k_shot, n_query=15,
                                           num_episodes=40)
  support = support + len(labels)  # the shifted copies
  plain = float(fewshot.episode_accuracies(feats, support, query, use_opta=False).mean())
  moved = float(fewshot.episode_accuracies(feats, support, query, use_opta=True).mean())
  assert plain < 0.3 and moved > 0.85 and moved > plain + 0.5, (plain, moved)


def test_evaluate_few_shot_metrics_and_ci():
  """Every metric equals the reference over the same episodes (sampled once with max(shots)
  support examples), the interval 1.96 std / sqrt(E) with the population std."""
  rng = np.random.default_rng(5)
  features, labels = clusters(rng, 5, 20, 10, noise=1.5)
  kw = dict(n_way=3, shots=(1, 2), n_query=4, num_episodes=30, seed=7)
  with float64.enabled():
    metrics = fewshot.evaluate_few_shot(features, labels, **kw)
  support, query = fewshot.sample_episodes(labels, 7, n_way=3, k_shot=2, n_query=4,
                                           num_episodes=30)
  want = {}
  for k in (1, 2):
    for suffix, use_opta in (('', False), ('_opta', True)):
      acc = np.array([reference_accuracy(features, s[:, :k], q, use_opta)
                      for s, q in zip(support, query)])
      want[f'fewshot_3w{k}s{suffix}'] = acc.mean()
      want[f'fewshot_3w{k}s{suffix}_ci95'] = 1.96 * acc.std() / np.sqrt(30)
  assert sorted(metrics) == sorted(want)
  for name, value in want.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-12, err_msg=name)
  assert 0 < metrics['fewshot_3w1s_ci95'] < 0.2
  without = fewshot.evaluate_few_shot(features, labels, **kw, opta=False)
  assert sorted(without) == ['fewshot_3w1s', 'fewshot_3w1s_ci95', 'fewshot_3w2s',
                             'fewshot_3w2s_ci95']


# ---------------------------------------------------------------- the Evaluator's hook


def make_evaluator(monkeypatch, fewshot_cfg):
  """An Evaluator over tiny in-memory splits (no dataset, no model: `score` only)."""
  rng = np.random.default_rng(6)
  splits = {split: {'image': np.zeros((n, 2, 2, 1), np.uint8),
                    'label': np.repeat(np.arange(4), n // 4)} for split, n in
            (('train', 40), ('test', 48))}
  monkeypatch.setattr(evaluate.pipeline, 'get_source', lambda cfg, split: split)
  monkeypatch.setattr(evaluate.pipeline, 'load_arrays', lambda src, **kw: splits[src])
  cfg = ml_collections.ConfigDict(dict(
      split='test', batch_size=8, knn_k=5, knn_temperature=0.1, linear_steps=5,
      linear_lr=0.05, linear_l2=0.0))
  if fewshot_cfg != 'absent':
    cfg.fewshot = fewshot_cfg
  mesh = parallel.make_mesh([('data', 1)], devices=jax.devices()[:1])
  evaluator = evaluate.Evaluator(cfg, ml_collections.ConfigDict(), None, mesh)
  feats = {s: (rng.normal(size=(4, 8)) * 3)[a['label']] + rng.normal(size=(len(a['label']), 8))
           for s, a in splits.items()}
  return evaluator, feats['train'].astype(np.float32), feats['test'].astype(np.float32)


BASE = ['knn_top1', 'linear_top1', 'linear_train_top1']


@pytest.mark.parametrize('fewshot_cfg', ['absent', None, {}, {'num_episodes': 0}])
def test_evaluator_without_fewshot_is_unchanged(monkeypatch, fewshot_cfg):
  evaluator, train_f, test_f = make_evaluator(monkeypatch, fewshot_cfg)
  assert sorted(evaluator.score(train_f, test_f)) == BASE


def test_evaluator_adds_fewshot_on_the_test_split(monkeypatch):
  fields = dict(n_way=3, shots=(1, 2), n_query=3, num_episodes=20, seed=1)
  evaluator, train_f, test_f = make_evaluator(monkeypatch, ml_collections.ConfigDict(fields))
  metrics = evaluator.score(train_f, test_f)
  want = fewshot.evaluate_few_shot(test_f, evaluator.test['label'], **fields)
  assert len(want) == 8 and sorted(metrics) == sorted(BASE + list(want))
  assert all(metrics[k] == v for k, v in want.items())


@pytest.mark.parametrize('field,value', [('n_way', 1), ('shots', (1, 0)), ('shots', ()),
                                         ('n_query', 0), ('num_episodes', -1),
                                         ('opta', 1), ('ways', 5)])
def test_evaluator_refuses_bad_fewshot_fields(monkeypatch, field, value):
  with pytest.raises(ValueError, match=rf'^config\.eval\.fewshot\.{field}'):
    make_evaluator(monkeypatch, {'num_episodes': 5, field: value})


def test_evaluator_checks_the_test_split_up_front(monkeypatch):
  """12 examples a class hold 2 + 10 but not 2 + 11: the Evaluator refuses at construction."""
  make_evaluator(monkeypatch, {'n_way': 4, 'shots': (1, 2), 'n_query': 10})
  with pytest.raises(ValueError, match=r'class 0 has 12 examples.*need 13'):
    make_evaluator(monkeypatch, {'n_way': 4, 'shots': (1, 2), 'n_query': 11})


def test_settings_fill_the_defaults():
  assert fewshot.settings(ml_collections.ConfigDict({'n_way': 3, 'shots': 2})) == dict(
      n_way=3, shots=(2,), n_query=15, num_episodes=600, seed=0, opta=True)
