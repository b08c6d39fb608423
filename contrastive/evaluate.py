"""Evaluation of frozen features: weighted kNN and a linear probe on a labelled test split.

`python -m contrastive.evaluate --workdir W --tasks ...` runs the standard zero-shot and
retrieval tasks on a two-tower workdir (contrastive/eval_tasks/runner.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from contrastive import fewshot
from contrastive import parallel
from contrastive.probe import linear_probe  # pylint: disable=unused-import (re-exported)
from contrastive.data import augment
from contrastive.data import pipeline
from contrastive.losses import l2_normalize


def widen(x):
  """x in at least float32 (bfloat16 features of mixed-precision towers become float32)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def extract_features(embed_fn, images, mesh, batch_size):
  """Runs jitted embed_fn over images [N, H, W, C] in sharded chunks -> features [N, F] (numpy).

  The last chunk is zero-padded to batch_size (which the mesh's data axis must divide) and
  the padding dropped from the output.
  """
  n = images.shape[0]
  sharding = parallel.data_sharding(mesh)
  out = []
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    x = jax.make_array_from_callback(chunk.shape, sharding, lambda idx, c=chunk: c[idx])
    out.append(np.asarray(jax.device_get(embed_fn(x)))[:batch_size - pad])
  return np.concatenate(out)


def extract_token_features(embed_fn, tokens, mesh, batch_size, *, min_length=8):
  """extract_features over texts tokens [N, L] int (0 = padding), each row embedded at the
  shortest length L' in (min_length, 2 min_length, 4 min_length, ..., L) that holds its
  tokens: the padding after a text's first 0 does not change its features (the text tower's
  contract, contrastive/models/text.py), so short texts (words, names) cost a fraction of
  the context. Rows keep their order; one compile per length used.
  """
  tokens = np.asarray(tokens)
  n, context = tokens.shape
  lengths = np.cumprod(tokens != 0, axis=1).sum(axis=1)
  sizes, size = [], min(min_length, context)
  while size < context:
    sizes.append(size)
    size *= 2
  sizes.append(context)
  bucket = np.searchsorted(np.array(sizes), lengths)  # the first size >= the length
  out = None
  for b in np.unique(bucket):
    rows = np.flatnonzero(bucket == b)
    feats = extract_features(embed_fn, tokens[rows, :sizes[b]], mesh, batch_size)
    if out is None:
      out = np.empty((n, feats.shape[1]), feats.dtype)
    out[rows] = feats
  return out


@functools.partial(jax.jit, static_argnames=('k', 'num_classes', 'chunk'))
def knn_predict(train_feats, train_labels, test_feats, *, k=200, temperature=0.1,
                num_classes=10, chunk=500):
  """Weighted kNN (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination", section 3.5): class score_c = sum over the k nearest train features by cosine
  similarity s of exp(s / temperature) [label = c].

  Args:
    train_feats: [N, F]; train_labels: [N] int; test_feats: [M, F] (M a multiple of chunk,
      or smaller than it).

  Returns:
    [M] int predicted labels.
  """
  bank = l2_normalize(train_feats)
  queries = l2_normalize(test_feats)
  k = min(k, bank.shape[0])

  def predict(q):  # (c, F) . (F, N) -> (c, N)
    sim, idx = jax.lax.top_k(q @ bank.T, k)
    weights = jnp.exp(sim / temperature)
    votes = jax.nn.one_hot(train_labels[idx], num_classes) * weights[..., None]
    return jnp.argmax(jnp.sum(votes, axis=1), axis=-1)

  m = queries.shape[0]
  c = min(chunk, m)
  pad = (-m) % c
  q = jnp.pad(queries, ((0, pad), (0, 0))).reshape(-1, c, queries.shape[1])
  return jax.lax.map(predict, q).reshape(-1)[:m]




def encoder_features(model, variables, images):
  """[N, F] float32 features h of uint8 images [N, H, W, C]: the encoder's output before the
  projection head, on the center view, BatchNorm in inference mode (bfloat16 towers widened
  to float32 for the kNN and the linear probe)."""
  return widen(model.apply(variables, augment.center_view(images), method='embed'))


class Evaluator:
  """Loads the train and test splits once; `evaluator(state)` returns kNN and linear-probe accuracy,
  and with `cfg.fewshot` (e.g. {'num_episodes': 600}) few-shot accuracy on the test split, with
  and without OpTA (contrastive/fewshot.py).

  Features are the encoder's output h (before the projection head), BatchNorm in inference mode.
  """

  def __init__(self, cfg, dataset_cfg, model, mesh):
    self.cfg = cfg
    self.mesh = mesh
    self.fewshot = fewshot.settings(cfg.get('fewshot'))  # None: off
    self.train = pipeline.load_arrays(pipeline.get_source(dataset_cfg, 'train'),
                                      max_examples=cfg.get('max_train_examples'))
    self.test = pipeline.load_arrays(pipeline.get_source(dataset_cfg, cfg.split),
                                     max_examples=cfg.get('max_test_examples'))
    self.num_classes = int(max(self.train['label'].max(), self.test['label'].max())) + 1
    if self.fewshot:  # a test split too small for the episodes fails here, not after training
      fewshot.check_pool(self.test['label'], **self.fewshot)
    self._embed = jax.jit(functools.partial(encoder_features, model),
                          out_shardings=parallel.replicated(mesh))

  def features(self, state, images):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    return extract_features(functools.partial(self._embed, variables), images, self.mesh,
                            self.cfg.batch_size)

  def __call__(self, state):
    return self.score(self.features(state, self.train['image']),
                      self.features(state, self.test['image']))

  def score(self, train_f, test_f):
    """kNN and linear-probe accuracy of given train [N, F] and test [M, F] features, and the
    few-shot metrics of the test features (fewshot.evaluate_few_shot) when cfg.fewshot is set."""
    knn = knn_predict(train_f, self.train['label'], test_f, k=self.cfg.knn_k,
                      temperature=self.cfg.knn_temperature, num_classes=self.num_classes)
    lin, lin_train = linear_probe(train_f, self.train['label'], test_f,
                                  num_classes=self.num_classes, steps=self.cfg.linear_steps,
                                  lr=self.cfg.linear_lr, l2=self.cfg.linear_l2)
    metrics = {'knn_top1': float(np.mean(np.asarray(knn) == self.test['label'])),
               'linear_top1': float(np.mean(np.asarray(lin) == self.test['label'])),
               'linear_train_top1': float(lin_train)}
    if self.fewshot:
      metrics.update(fewshot.evaluate_few_shot(test_f, self.test['label'], **self.fewshot))
    return metrics


if __name__ == '__main__':
  from contrastive.eval_tasks import runner  # pylint: disable=g-import-not-at-top
  runner.main()
