"""Multistage Contrastive Learning (MCL): later stages draw negatives from the anchor's cluster.

Stage 1 trains the configured recipe as usual. Its frozen features of the training set are
clustered with k-means (jnp, sharded over the data axis); stage s > 1 trains a fresh model
whose negatives for an anchor are only the candidates of the anchor's cluster in every earlier
stage, so it must learn the features the earlier stages did not separate. The final
representation concatenates the features of all stages ("cross-stage representation
integration"), evaluated with the same kNN and linear probe.

Reference: "Multistage Contrastive Learning" (MCL; feature-aware negative sampling against
feature suppression). Run with the `mcl` variant of any recipe:

  python -m contrastive.main --config configs/simclr_fmnist.py:mcl --workdir /tmp/mcl
"""

import os

import jax
import numpy as np

from contrastive import evaluate
from contrastive import metric_writer
from contrastive import parallel
from contrastive import train
from contrastive.models import build_model
from contrastive.samplers import kmeans


def cluster_table(features, ids, num_clusters, *, iters, seed, mesh):
  """k-means of features [N, F] -> [max id + 1] int32 cluster of each example id (-1: none).

  The last N mod (data devices) examples are left out (cluster -1) so the rows split evenly.
  """
  n = features.shape[0] - features.shape[0] % mesh.shape[parallel.DATA]
  _, assignments, _ = kmeans.kmeans(jax.random.key(seed), features[:n], num_clusters,
                                    num_iters=iters, cosine=True, mesh=mesh)
  table = np.full(int(ids.max()) + 1, -1, np.int32)
  table[ids[:n]] = np.asarray(assignments)
  return table


def combine_clusters(previous, new, num_clusters):
  """One id per combination of earlier clusters: anchors share a cluster only if they shared
  one in every stage so far."""
  if previous is None:
    return new
  return np.where((previous < 0) | (new < 0), -1, previous * num_clusters + new).astype(np.int32)


def train_stages(config, workdir):
  """Trains config.mcl.stages stages in workdir/stage{s}; returns the concatenated features'
  metrics ({'mcl/knn_top1', 'mcl/linear_top1', ...}), also written to workdir/metrics.jsonl."""
  mesh = parallel.batch_mesh(parallel.make_mesh(config.mesh))
  evaluator = evaluate.Evaluator(config.eval, config.dataset, build_model(config.model), mesh)
  clusters, train_feats, test_feats = None, [], []
  for stage in range(1, config.mcl.stages + 1):
    print(f'MCL stage {stage}/{config.mcl.stages}', flush=True)
    state, _ = train.train_and_evaluate(config, os.path.join(workdir, f'stage{stage}'),
                                        clusters=clusters)
    train_feats.append(evaluator.features(state, evaluator.train['image']))
    test_feats.append(evaluator.features(state, evaluator.test['image']))
    if stage < config.mcl.stages:
      new = cluster_table(train_feats[-1], evaluator.train['id'], config.mcl.num_clusters,
                          iters=config.mcl.kmeans_iters, seed=config.seed + stage, mesh=mesh)
      clusters = combine_clusters(clusters, new, config.mcl.num_clusters)
  metrics = {f'mcl/{k}': v for k, v in evaluator.score(np.concatenate(train_feats, 1),
                                                       np.concatenate(test_feats, 1)).items()}
  writer = metric_writer.MetricWriter(workdir, enabled=jax.process_index() == 0)
  writer.write(0, metrics)
  writer.close()
  print(metric_writer.format_metrics(config.mcl.stages, metrics), flush=True)
  return metrics
