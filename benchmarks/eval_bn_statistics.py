"""Does the evaluation's BatchNorm cost the SimCLR recipe kNN accuracy?

The evaluator embeds clean test images with the BatchNorm population statistics that training
estimated on augmented views (crops, colour jitter). This script restores a trained
`configs/simclr_fmnist.py` workdir with the config it was run with (its config.json) and
scores its features four ways, one JSON line each:

  running      the checkpoint's statistics (what `contrastive.main` reports);
  precise_bn   statistics recomputed on the clean training images ("precise BN", Wu & Johnson
               2021, "Rethinking 'Batch' in BatchNorm": population statistics from the
               inference-time input distribution), the batch means and variances of 60 batches
               of 1,000 averaged;
  ..._centred  the same features with the training mean subtracted before the kNN's cosine.

  python -m contrastive.main --config configs/simclr_fmnist.py --workdir /tmp/ep2 \
      --config.num_epochs=2 --config.eval.random_init_baseline=False
  python benchmarks/eval_bn_statistics.py --workdir /tmp/ep2
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp

from contrastive import checkpoint, evaluate, inference, parallel, train
from contrastive.data import augment, pipeline
from contrastive.recipes import image_views


def clean_batch_stats(model, state, images, batch=1000):
  """The encoder's BatchNorm statistics over clean `images` [N, H, W, C] uint8: the mean over
  batches of each batch's mean and variance (BatchNorm's own, from a zero state: with momentum
  m one training-mode apply leaves (1 - m) x the batch's statistics)."""
  momentum = 0.9  # contrastive/models/resnet.py

  @jax.jit
  def one(x):
    zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
    _, upd = model.apply({'params': state.params, 'batch_stats': zeros},
                         augment.center_view(x), train=True, mutable=['batch_stats'],
                         method=lambda m, x, train: m.encoder(x, train=train))
    return jax.tree.map(lambda v: v / (1 - momentum), upd['batch_stats'])

  total = [one(images[s:s + batch]) for s in range(0, len(images) - batch + 1, batch)]
  return jax.tree.map(lambda *v: sum(v) / len(v), *total)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', required=True)
  args = p.parse_args()
  cfg = inference.load_config(args.workdir)  # the run's own: encoder, pool, schedule length
  mesh = parallel.make_mesh(cfg.mesh)
  source = pipeline.get_source(cfg.dataset, 'train')
  model, state, _ = image_views.step(image_views.settings(cfg), mesh, source[0]['image'].shape,
                                     train.total_steps(cfg, len(source)), jax.random.key(cfg.seed))
  ckpt = checkpoint.Checkpointer(os.path.join(args.workdir, 'checkpoints'), save_every=10**9,
                                 keep=cfg.checkpoint_keep)
  state, _ = ckpt.restore_latest(state)
  evaluator = evaluate.Evaluator(cfg.eval, cfg.dataset, model, parallel.batch_mesh(mesh))
  for name, st in (('running', state), ('precise_bn', state.replace(
      batch_stats=clean_batch_stats(model, state, evaluator.train['image'])))):
    tr, te = (evaluator.features(st, evaluator.train['image']),
              evaluator.features(st, evaluator.test['image']))
    mean = tr.mean(0)
    for suffix, (a, b) in (('', (tr, te)), ('_centred', (tr - mean, te - mean))):
      print(json.dumps(dict(statistics=name + suffix, step=int(state.step),
                            **evaluator.score(a, b))), flush=True)


if __name__ == '__main__':
  main()
