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
