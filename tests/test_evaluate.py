"""kNN and linear probe against plain NumPy re-derivations."""

import numpy as np

from contrastive import evaluate


def reference_knn(train, labels, test, k, t, num_classes):
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  preds = []
  for q in test:
    sim = train @ q
    top = np.argsort(-sim)[:k]
    votes = np.zeros(num_classes)
    for i in top:
      votes[labels[i]] += np.exp(sim[i] / t)
    preds.append(np.argmax(votes))
  return np.array(preds)


def test_knn_matches_reference():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(4, 8)) * 2
  labels = rng.integers(0, 4, 300)
  train = centers[labels] + rng.normal(size=(300, 8))
  test_labels = rng.integers(0, 4, 123)
  test = centers[test_labels] + rng.normal(size=(123, 8))
  got = np.asarray(evaluate.knn_predict(train.astype(np.float32), labels,
                                        test.astype(np.float32), k=20, temperature=0.1,
                                        num_classes=4, chunk=50))
  want = reference_knn(train, labels, test, 20, 0.1, 4)
  assert np.mean(got == want) >= 0.99  # ties in float32 vs float64 may flip a vote
  assert np.mean(got == test_labels) > 0.8


def test_linear_probe_learns_a_linear_rule():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(16, 5))
  x = rng.normal(size=(2000, 16)).astype(np.float32)
  y = np.argmax(x @ w, axis=1)
  preds, train_acc = evaluate.linear_probe(x[:1500], y[:1500], x[1500:], num_classes=5,
                                           steps=300, lr=0.05, l2=0.0)
  assert float(train_acc) > 0.95
  assert np.mean(np.asarray(preds) == y[1500:]) > 0.9
  # Labels unrelated to the features: the probe can't beat chance on held-out data.
  y_rand = rng.integers(0, 5, 2000)
  preds, _ = evaluate.linear_probe(x[:1500], y_rand[:1500], x[1500:], num_classes=5, steps=300)
  assert np.mean(np.asarray(preds) == y_rand[1500:]) < 0.3


def reference_linear_probe(x, labels, x_test, num_classes, steps, lr, l2, cosine=True):
  """Softmax regression on standardised features by full-batch Adam (Kingma & Ba 2015,
  algorithm 1, eps outside the root) with a cosine learning-rate decay, in NumPy."""
  mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
  x, x_test = (x - mean) / std, (x_test - mean) / std
  w, b = np.zeros((x.shape[1], num_classes)), np.zeros(num_classes)
  moments = [[np.zeros_like(w), np.zeros_like(w)], [np.zeros_like(b), np.zeros_like(b)]]
  onehot = np.eye(num_classes)[labels]
  for t in range(steps):
    logits = x @ w + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    grads = (x.T @ (p - onehot) / len(x) + l2 * w, (p - onehot).mean(axis=0))
    rate = lr * 0.5 * (1 + np.cos(np.pi * t / steps)) if cosine else lr
    for param, g, (m, v) in zip((w, b), grads, moments):
      m[:] = 0.9 * m + 0.1 * g
      v[:] = 0.999 * v + 0.001 * g**2
      param -= rate * (m / (1 - 0.9**(t + 1))) / (np.sqrt(v / (1 - 0.999**(t + 1))) + 1e-8)
  return np.argmax(x_test @ w + b, axis=1), np.mean(np.argmax(x @ w + b, axis=1) == labels)


def test_linear_probe_matches_reference():
  """The probe equals the NumPy derivation in float64, prediction for prediction, on random
  labels (where the decision boundaries depend on every step); a constant learning rate
  instead of the cosine decay (the counterexample) changes tens of the 3,000."""
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3400, 24)) * rng.uniform(0.1, 3.0, size=24) + rng.normal(size=24)
  y = rng.integers(0, 5, 3400)
  args = (x[:400], y[:400], x[400:])
  with jax.enable_x64(True):
    preds, train_acc = evaluate.linear_probe(*args, num_classes=5, steps=60, lr=0.05, l2=1e-2)
  want, want_acc = reference_linear_probe(*args, num_classes=5, steps=60, lr=0.05, l2=1e-2)
  np.testing.assert_array_equal(np.asarray(preds), want)
  assert abs(float(train_acc) - want_acc) < 1e-6  # a fraction of 400 rows, in float32
  other, _ = reference_linear_probe(*args, num_classes=5, steps=60, lr=0.05, l2=1e-2,
                                    cosine=False)
  assert np.sum(other != want) >= 10, np.sum(other != want)  # of 3,000 (0 above)


def test_token_features_by_length_equal_the_full_context():
  """Texts embedded at their bucket's trimmed length give the full-context features (the
  text tower ignores everything after a text's first 0), in float64; rows keep their order."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from contrastive import models, parallel  # pylint: disable=g-import-not-at-top
  with jax.enable_x64(True):
    model = models.TextTransformer(vocab_size=40, context=32, width=16, depth=1, heads=2,
                                   mlp_dim=32, pool='mean', dtype=jnp.float64)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 33, 50)  # every bucket: 8, 16, 32
    tokens = rng.integers(1, 40, (50, 32)).astype(np.int32)
    tokens[np.arange(32)[None] >= lengths[:, None]] = 0
    params = jax.tree.map(lambda x: x.astype(jnp.float64),
                          model.init(jax.random.key(0), tokens[:2])['params'])
    fn = jax.jit(functools.partial(model.apply, {'params': params}))
    mesh = parallel.make_mesh([('data', 1)], devices=jax.devices()[:1])
    full = evaluate.extract_features(fn, tokens, mesh, 16)
    by_length = evaluate.extract_token_features(fn, tokens, mesh, 16)
    np.testing.assert_allclose(by_length, full, rtol=1e-12, atol=1e-12)
    # Counterexample: cutting inside a text (not only its padding) changes its features.
    cut = evaluate.extract_features(fn, tokens[:, :8], mesh, 16)
    assert np.abs(cut[lengths > 8] - full[lengths > 8]).max() > 1e-3
