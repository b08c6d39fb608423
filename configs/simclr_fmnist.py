r"""SimCLR on Fashion-MNIST with global in-batch negatives (NT-Xent), sized for a 2-core CPU.

Run (the README's `make train` runs the default):

  python -m contrastive.main --config configs/simclr_fmnist.py --workdir /tmp/simclr_fmnist
  python -m contrastive.main --config configs/simclr_fmnist.py:runlocal --workdir /tmp/simclr_local
  python -m contrastive.main --config configs/simclr_fmnist.py:resnet18 --workdir gs://...  # accelerators

Variants (comma-separated after the colon): `runlocal` (tiny, seconds), `resnet18`/`resnet50`
(the full-width presets and SimCLR's batch/optimizer for accelerators), `vit` (a small ViT
encoder instead of the ResNet), `loss=NAME` (any loss of
`contrastive.losses.PAIR_LOSSES`, with the arguments below, e.g. `:loss=sigmoid_loss`), and the
negative samplers of SAMPLERS (e.g. `:mochi`, `:mining,threshold`; they switch the loss to
InfoNCE, the loss they act on). Single fields from the command line:
`--config.batch_size=1024 --config.loss.temperature=0.2 --config.loss.block_size=1024`.
"""

import ml_collections
from ml_collections import config_dict

# Each selectable loss with its arguments (`:loss=NAME`); values are common starting points.
LOSSES = {
    'nt_xent': dict(temperature=0.2),
    'info_nce': dict(temperature=0.2),
    'clip_loss': dict(temperature=0.2),
    'sigmoid_loss': dict(temperature=0.1, bias=-10.0),  # SigLIP's initial t' = 10, b = -10
    'dcl': dict(temperature=0.2),
    'dclw': dict(temperature=0.2, sigma=0.5),  # sigma of the paper's weights
    'debiased_info_nce': dict(temperature=0.2, tau_plus=0.1),  # 10 balanced classes
    'hard_negative_info_nce': dict(temperature=0.2, beta=1.0, tau_plus=0.1),
    'supcon': dict(temperature=0.2),
    # AMCL: model.head_count heads, each with a learned temperature (set with the loss below)
    'amcl': dict(beta=0.1, kappa=0.5),
    # PamC: the negatives as K meta-nodes (soft k-means of the keys), O(B K D): num_clusters <=
    # batch_size, e.g. --config.loss.num_clusters=256 (contrastive/losses/pamc.py)
    'pamc_info_nce': dict(temperature=0.2, num_clusters=32, iterations=3,
                          assignment_temperature=0.02),
}
# These also take `block_size`: unset (None) is the dense path; an int, the tile side of the
# blockwise path (O(B D) memory), e.g. --config.loss.block_size=1024.
BLOCKWISE_LOSSES = ('info_nce', 'clip_loss', 'sigmoid_loss', 'debiased_info_nce',
                    'hard_negative_info_nce', 'amcl')
AMCL_HEADS = 4  # `:loss=amcl`: the heads of AMCL's loss (contrastive/losses/amcl.py)

# Each sampler variant with the config.samplers fields it sets (contrastive/samplers/objective.py).
SAMPLERS = {
    # Top-k hardest of batch u queue (Sample4Geo, ANCE); `mining_skip_top` skips the top-r as
    # suspected false negatives (the pooling-bias paper).
    'mining': dict(mining_k=128),
    # MoCHi: from the 128 hardest, 64 mixes of two and 32 mixes with the query per query.
    'mochi': dict(mochi=dict(num_hard=128, num_mix=64, num_query_mix=32, start_epoch=0.0)),
    # Feature transformation: positive extrapolation, 256 interpolated negatives, histograms.
    'ft': dict(pos_alpha=2.0, neg_mix=256, neg_mix_alpha=1.6, histograms=True),
    'threshold': dict(threshold=0.8),  # drop candidates more similar than 0.8
    'gist': dict(gist=True, gist_margin=0.0),  # guide: the momentum encoder (momentum 0.99),
    # or a frozen checkpoint: --config.samplers.gist_guide=WORKDIR --config.momentum.base=0
    # BECLR's DyCE: a memory of 4,096 keys in 100 clusters (the authors' 40 items per cluster);
    # each key's 5 nearest items of its cluster are extra positives from epoch 0.5 on.
    'beclr': dict(dyce=dict(size=4096, num_clusters=100, topk=5, start_epoch=0.5)),
}
VARIANTS = ('runlocal', 'resnet18', 'resnet50', 'vit', 'mcl')


def default_samplers():
  """config.samplers with every sampler off."""
  return dict(threshold=1.0, gist=False, gist_margin=0.0, gist_guide='', mining_k=0,
              mining_skip_top=0,
              mochi=dict(num_hard=0, num_mix=0, num_query_mix=0, start_epoch=0.0),
              pos_alpha=0.0, neg_mix=0, neg_mix_alpha=1.0, histograms=False,
              # BECLR's DyCE memory (contrastive/samplers/dyce.py); size 0: off. momentum: of the
              # prototypes' EMA (the authors' 0); epsilon, sinkhorn_iterations: the balanced
              # assignment's; kmeans_iters: the first partition's Lloyd iterations.
              dyce=dict(size=0, num_clusters=100, topk=5, start_epoch=0.0, momentum=0.0,
                        epsilon=0.05, sinkhorn_iterations=10, kmeans_iters=10))


def apply_sampler_variants(config, variants):
  """Turns on the SAMPLERS named in `variants` (and `mcl`); they need the InfoNCE loss."""
  chosen = [v for v in variants if v in SAMPLERS or v == 'mcl']
  for name in chosen:
    if name == 'mcl':  # stage 1 as configured, k-means, stage 2 with cluster negatives
      config.mcl.stages = 2
    else:
      config.samplers.update(SAMPLERS[name])
  if 'gist' in chosen and not config.momentum.base:
    config.momentum.base = 0.99
  if chosen and config.loss.name not in ('info_nce', 'amcl'):  # amcl: refused by validation
    config.loss = loss_config('info_nce', temperature=config.loss.temperature)


def shrink_samplers(samplers, factor):
  """Divides the samplers' negative counts by `factor` (small batches: runlocal)."""
  for field in ('mining_k', 'neg_mix'):
    samplers[field] = -(-samplers[field] // factor)
  for field in ('num_hard', 'num_mix', 'num_query_mix'):
    samplers.mochi[field] = -(-samplers.mochi[field] // factor)


def loss_config(name, **changes):
  """config.loss for LOSSES[name] (with an unset, command-line settable block_size)."""
  loss = ml_collections.ConfigDict(dict(name=name, **LOSSES[name]))
  loss.update(changes)
  if name in BLOCKWISE_LOSSES:
    loss.block_size = config_dict.placeholder(int)
    loss.collective = config_dict.placeholder(str)  # None: 'ring'; or 'all_gather'
  return loss


def get_config(arg=None):
  """Returns the config; `arg` is a comma-separated list of variants."""
  variants = set(filter(None, (arg or '').split(',')))
  options = dict(v.split('=', 1) for v in variants if '=' in v)
  unknown = {v for v in variants if '=' not in v} - set(VARIANTS) - set(SAMPLERS)
  if unknown:
    raise ValueError(f'Unknown config variant(s) {sorted(unknown)}; choose from '
                     f'{sorted(VARIANTS + tuple(SAMPLERS))} or loss=NAME.')
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.mesh = (('data', -1),)  # or e.g. (('data', 2), ('fsdp', 4)): contrastive/parallel.py
  # 'bfloat16': mixed precision (float32 state, bfloat16 compute: contrastive/precision.py);
  # 'float64': every parameter and activation in float64 (a reference run whose results do not
  # depend on the order of float32 sums, e.g. across device or process counts).
  config.dtype = 'float32'

  config.dataset = dict(name='fashion_mnist_idx', data_dir='',  # '' = ~/tensorflow_datasets
                        idx_dir='/usr/share/datasets/fashion-mnist')
  # Sized for a 2-core CPU to finish in under 15 minutes (see README, Results); the accelerator
  # variants below restore SimCLR's ResNet, batch and LARS.
  config.batch_size = 256
  config.num_epochs = 3.5
  config.total_steps = 0  # > 0 overrides num_epochs

  config.augment = dict(crop_scale=(0.3, 1.0), flip=True, jitter_prob=0.8, brightness=0.4,
                        contrast=0.4, saturation=0.4, hue=0.1, gray_prob=0.2, blur_prob=0.0)

  # `encoder`, where set (the `vit` variant), is a tower config (models/two_tower.build_tower)
  # that replaces the ResNet of the fields before it. pool='flatten': the features are the
  # last 4 x 4 x 128 map flattened (2,048-d), which keeps where a feature is on these
  # centred, aligned images (kNN +4 points over 'avg' at 2 epochs; README, Results).
  config.model = dict(preset='', stage_sizes=(1, 1, 1), width=32, block='basic',
                      stem_strides=2, pool='flatten', encoder=config_dict.placeholder(dict),
                      head_hidden_dims=(256,), head_out_dim=128,
                      # AMCL (loss amcl): head_count heads, temperatures from head_temperature
                      head_count=1, head_temperature=0.1,
                      remat='')  # e.g. 'nothing_saveable': models/compute.py REMAT_POLICIES
  loss = options.get('loss', 'nt_xent')
  if loss not in LOSSES:
    raise ValueError(f'Variant loss={loss!r} is unknown; choose one of {sorted(LOSSES)}.')
  config.loss = loss_config(loss)
  if loss == 'amcl':
    config.model.head_count = AMCL_HEADS
  # Beyond plain SimCLR (contrastive/step.py): keys from a momentum encoder ('moco'), a memory
  # queue of past keys, negative samplers; MCL's multi-stage run (contrastive/mcl.py).
  config.method = 'simclr'
  config.momentum = dict(base=0.0, schedule='constant')  # base > 0: keep an EMA encoder
  config.queue_size = 0  # K > 0: a multiple of batch_size
  config.symmetric = True  # both directions q1-k2 and q2-k1 (False: MoCo v2's q1-k2 only)
  config.samplers = default_samplers()
  config.mcl = dict(stages=1, num_clusters=10, kmeans_iters=20)
  config.optimizer = dict(name='adamw', lr=4e-3, scale_lr_by_batch=False, warmup_steps=50,
                          weight_decay=1e-4, momentum=0.9, grad_clip_norm=0.0)

  config.eval = dict(every=0, split='test', batch_size=1000, knn_k=200, knn_temperature=0.1,
                     linear_steps=500, linear_lr=0.05, linear_l2=1e-4,
                     random_init_baseline=True, max_train_examples=0, max_test_examples=0)  # 0 = all
  # Few-shot episodes on the test split's features (contrastive/fewshot.py): N-way K-shot
  # nearest-prototype accuracy with its 95% interval, with and without BECLR's OpTA.
  config.eval.fewshot = dict(n_way=5, shots=(1, 5), n_query=15, num_episodes=600, seed=0,
                             opta=True)
  config.log_every = 20
  # (first, last): a jax.profiler trace of these steps in WORKDIR/profile (process 0); () = off.
  config.profile_steps = ()
  # GradCache (contrastive/grad_cache.py): > 0 embeds the global batch this many rows at a
  # time and takes the loss over all of it: the same gradient in less activation memory.
  config.grad_cache = dict(micro_batch_size=0)
  config.checkpoint_every = 500
  config.checkpoint_keep = 2
  config.nonfinite = 'error'  # NaN/inf loss or state: 'error' stops naming the step; 'skip' drops
  config.max_consecutive_skips = 10  # ... the update, and stops after this many skips in a row
  # Resuming a workdir with a changed config (contrastive/run_config.py): fields (or prefixes)
  # that may differ from the saved run's, e.g. 'total_steps,optimizer.lr'.
  config.allow_config_changes = ''

  if 'resnet18' in variants or 'resnet50' in variants:
    name = 'resnet50' if 'resnet50' in variants else 'resnet18'
    config.model.update(preset=name, stage_sizes=(), width=0, block='', pool='avg',
                        head_hidden_dims=(2048,))
    config.batch_size = 4096
    config.num_epochs = 200
    config.model.stem_strides = 1
    config.optimizer.update(name='lars', lr=0.3, scale_lr_by_batch=True, weight_decay=1e-6,
                            warmup_steps=500)
    config.eval.update(every=5000, batch_size=4096)  # divisible by a pod slice's devices
    config.checkpoint_every = 1000
  if 'vit' in variants:  # a ViT on 4 x 4 patches of 7 x 7 px
    config.model.encoder = dict(name='vit', patch=7, width=128, depth=4, heads=4, mlp_dim=256,
                                pool='gap')
  apply_sampler_variants(config, variants)
  if 'runlocal' in variants:
    config.batch_size = 64
    config.total_steps = 6
    config.model.update(preset='', stage_sizes=(1,), width=8, block='basic', head_out_dim=32,
                        head_hidden_dims=(32,))
    if config.model.encoder:
      config.model.encoder.update(width=16, depth=1, heads=2, mlp_dim=32)
    config.optimizer.update(warmup_steps=1)
    config.eval.update(batch_size=200, linear_steps=50, random_init_baseline=False,
                       max_train_examples=2000, max_test_examples=400)
    config.eval.fewshot.num_episodes = 100
    config.log_every = 1
    config.checkpoint_every = 3
    shrink_samplers(config.samplers, factor=8)
    if config.samplers.dyce.size:  # full after two steps, pseudo-positives from the third
      config.samplers.dyce.update(size=128, num_clusters=8, topk=2, start_epoch=0.0)
  return config
