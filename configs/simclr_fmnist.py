r"""SimCLR on Fashion-MNIST with global in-batch negatives (NT-Xent), sized for a 2-core CPU.

Run (the README's `make train` runs the default):

  python -m contrastive.main --config configs/simclr_fmnist.py --workdir /tmp/simclr_fmnist
  python -m contrastive.main --config configs/simclr_fmnist.py:runlocal --workdir /tmp/simclr_local
  python -m contrastive.main --config configs/simclr_fmnist.py:resnet18 --workdir gs://...  # accelerators

Variants (comma-separated after the colon): `runlocal` (tiny, seconds), `resnet18`/`resnet50`
(the full-width presets and SimCLR's batch/optimizer for accelerators). Single fields from the
command line: `--config.batch_size=1024 --config.loss.temperature=0.2`.
"""

import ml_collections


def get_config(arg=None):
  """Returns the config; `arg` is a comma-separated list of variants."""
  variants = set(filter(None, (arg or '').split(',')))
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.mesh = [('data', -1)]

  config.dataset = dict(name='fashion_mnist_idx', data_dir='',  # '' = ~/tensorflow_datasets
                       
                        idx_dir='/usr/share/datasets/fashion-mnist')
  config.batch_size = 512
  config.num_epochs = 4
  config.total_steps = 0  # > 0 overrides num_epochs

  config.augment = dict(crop_scale=(0.2, 1.0), flip=True, jitter_prob=0.8, brightness=0.4,
                        contrast=0.4, saturation=0.4, hue=0.1, gray_prob=0.2, blur_prob=0.0)

  config.model = dict(preset='', stage_sizes=(1, 1, 1), width=16, block='basic',
                      stem_strides=1, head_hidden_dims=(256,), head_out_dim=128)
  config.loss = dict(name='nt_xent', temperature=0.2)
  config.optimizer = dict(name='lars', lr=1.0, scale_lr_by_batch=True, warmup_steps=50,
                          weight_decay=1e-6, momentum=0.9, grad_clip_norm=0.0)

  config.eval = dict(every=0, split='test', batch_size=1000, knn_k=200, knn_temperature=0.1,
                     linear_steps=500, linear_lr=0.05, linear_l2=1e-4,
                     random_init_baseline=True, max_train_examples=0, max_test_examples=0)  # 0 = all
  config.log_every = 20
  config.checkpoint_every = 500
  config.checkpoint_keep = 2

  if 'resnet18' in variants or 'resnet50' in variants:
    name = 'resnet50' if 'resnet50' in variants else 'resnet18'
    config.model.update(preset=name, stage_sizes=(), width=0, block='',
                        head_hidden_dims=(2048,))
    config.batch_size = 4096
    config.num_epochs = 200
    config.optimizer.update(lr=0.3, warmup_steps=500)
    config.eval.every = 5000
    config.checkpoint_every = 1000
  if 'runlocal' in variants:
    config.batch_size = 64
    config.total_steps = 6
    config.model.update(preset='', stage_sizes=(1,), width=8, block='basic', head_out_dim=32,
                        head_hidden_dims=(32,))
    config.optimizer.update(warmup_steps=1)
    config.eval.update(batch_size=200, linear_steps=50, random_init_baseline=False,
                       max_train_examples=2000, max_test_examples=400)
    config.log_every = 1
    config.checkpoint_every = 3
  return config
