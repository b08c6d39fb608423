r"""SigLIP on emoji: Noto Color Emoji images <-> their CLDR English names and keywords.

  python -m contrastive.main --config configs/siglip_emoji.py --workdir /tmp/siglip_emoji
  python -m contrastive.main --config configs/siglip_emoji.py:runlocal --workdir /tmp/tt_local

Two towers (contrastive/models/two_tower.py): a small ViT on 32x32 renders and a text
transformer on SentencePiece tokens, projected to a shared 128-d space; SigLIP's pairwise
sigmoid loss with a learned temperature t' and bias b (Zhai et al. 2023) over the global batch.
Held out: 12% of the distinct emoji (all their skin tones), evaluated by retrieval both ways
and zero-shot classification into the 9 emoji groups (contrastive/two_tower_eval.py), also on
the same emoji drawn as another font's monochrome glyphs (`zero_shot_cross_style/`).

Variants (comma-separated after the colon): `runlocal` (tiny, seconds), `resnet` (the SimCLR
ResNet as the image tower), `lit` (the image tower locked: LiT; initialise it with
--config.model_init.workdir=W --config.model_init.mapping=tower_a:tower_a,proj_a:proj_a from a
trained run W), `pod` (ViT-B/16 at 224 px + a text transformer B, batch 32,768, blockwise ring
loss: a pod job, built but not run here), `clip_b32` (open_clip's ViT-B-32 image tower at 224 px
and embed 512: with `lit`, LiT on a checkpoint imported by `python -m contrastive.weights`:
--config.model_init.workdir=W --config.model_init.mapping=tower_a:tower_a,proj_a:proj_a), `dense` (the loss without blocks, block_size None:
e.g. `:pod,dense`, the dense row of the README's TPU compile table), `sketch` (a third of the
training images as line drawings of their edges, a third in grey: zero-shot on the held-out
emoji drawn in another font's monochrome glyphs, docs/two_towers.md), `styles` (the training
emoji also drawn in two other monochrome fonts, GNU Unifont and Noto Sans Symbols: 1,555 more
training images in the plain recipe's 890 steps; contrastive/data/glyphs.py). Fields:
`--config.loss.block_size=1024` (blockwise), `--config.dataset.languages='("en","de")'`
(multilingual pairs).
"""

import ml_collections
from ml_collections import config_dict

VARIANTS = ('runlocal', 'resnet', 'vit', 'lit', 'pod', 'dense', 'clip_b32', 'sketch', 'styles')


def base_config(loss_params='siglip'):
  """The emoji two-tower recipe with the loss of `loss_params` ('siglip' or 'clip')."""
  config = ml_collections.ConfigDict()
  config.family = 'two_tower'
  config.seed = 0
  config.mesh = (('data', -1),)  # or e.g. (('data', 2), ('fsdp', 4)): contrastive/parallel.py
  config.dtype = 'float32'  # or 'bfloat16' (mixed precision: contrastive/precision.py)
  # max_examples > 0: that many distinct emoji (small runs); styles: the training emoji also
  # drawn in these monochrome fonts (contrastive/data/glyphs.py: 'unifont', 'noto_symbols').
  config.dataset = dict(name='emoji_cldr', data_dir='', image_size=32, languages=('en',),
                        max_examples=0, styles=())
  config.tokenizer = dict(vocab_size=1000, context=16, model_type='unigram',
                          character_coverage=0.9995)  # rarer characters: byte pieces
  config.batch_size = 256
  config.num_epochs = 15.0  # 890 steps: ~13 min on 2 cores
  config.total_steps = 0  # > 0 overrides num_epochs
  config.model = dict(
      # Patches of 8 px (16 tokens): 3x faster steps than the preset's 4 px, more steps in 15 min.
      image=dict(name='vit', preset='small', patch=8, pool='map'),
      text=dict(name='text', preset='small', pool='eos'),
      embed_dim=128, loss_params=loss_params,
      remat='',  # every tower's blocks, e.g. 'nothing_saveable' (models/compute.py)
      # SigLIP's published init (t' = log 10, b = -10) spends a short run escaping it
      # (docs/two_towers.md, temperature and bias): a larger logit learning rate (below) moves it.
      logit_scale_init=10.0 if loss_params == 'siglip' else 1 / 0.07, logit_bias_init=-10.0)
  config.loss = dict(name='sigmoid_loss' if loss_params == 'siglip' else 'clip_loss',
                     block_size=config_dict.placeholder(int),  # None: dense
                     collective=config_dict.placeholder(str))  # None: 'ring'
  # Which rows share a batch (contrastive/batching/from_config.py): 'random', 'tas_b' (each
  # batch from one of num_topics k-means topics of side a), 'clusters' (NGAME: whole clusters
  # of cluster_size rows) or 'neighbours' (Sample4Geo: rows next to num_neighbours nearest),
  # the last two recomputed from the current towers every recluster_every epochs;
  # no_duplicates: one row per group id.
  config.batching = dict(method='random', num_topics=0, no_duplicates=False, cluster_size=0,
                         num_neighbours=0, per_seed=1, recluster_every=1)
  # NegCLIP (contrastive/negatives/negclip.py): > 0 word-order perturbations of each text b as
  # extra negatives of the batch (sigmoid_loss), and order sensitivity in the evaluation.
  config.negclip = dict(num_negatives=0)
  # ANCE / STAR corpus-mined negatives (contrastive/negatives/corpus_index.py): num_hard > 0
  # hardest texts b of each row, re-mined from the whole training split every refresh_every
  # steps, from step 0 with from_start (sigmoid_loss; with lit.locked_tower=text the index is fixed:
  # ADORE); same_part: a mixture's rows mine their own dataset's texts only (MM-Embed).
  # The interval is the recipe's: a refresh re-embeds the corpus (emoji: ~6 s, 3% of a run at
  # 100 steps; siglip_wordnet's 110k glosses take ~70 s through its transformer, so that
  # recipe refreshes every 250).
  config.hard_negatives = dict(num_hard=0, refresh_every=100, from_start=False,
                               block_size=1024, same_part=True)
  # m^3-Mix (objectives.geodesic_mixup_loss): alpha > 0 adds slerp(za_j, zb_j, lam), lam ~
  # Beta(alpha, alpha), as negatives of both sides' rows (sigmoid_loss).
  config.geodesic_mixup = dict(alpha=0.0)
  # SPN4CIR's static negatives (contrastive/negatives/static_bank.py): a second stage whose
  # loss adds num_static > 0 texts b (sides='ab': also images) embedded once by the frozen
  # towers of from_workdir (a finished run), all of them (topk=0) or each row's topk most
  # similar, as extra negatives of every row (sigmoid_loss); e.g. with
  # --config.model_init.workdir=W --config.model_init.mapping=tower_a:tower_a,proj_a:proj_a,
  # tower_b:tower_b,proj_b:proj_b,logit:logit --config.static_negatives.from_workdir=W.
  config.static_negatives = dict(num_static=0, from_workdir='', topk=0, sides='b')
  # The training images' augmentation, on device (contrastive/recipes/two_tower_augment.py):
  # SimCLR's crop, flip, colour jitter, greyscale and blur, and line drawings; these values: off.
  config.augment = dict(crop_scale=(1.0, 1.0), flip=False, jitter_prob=0.0, brightness=0.4,
                        contrast=0.4, saturation=0.4, hue=0.1, gray_prob=0.0, blur_prob=0.0,
                        sketch_prob=0.0)
  # 'image' (or 'a') / 'text' (or 'b'): that tower is frozen; it must be loaded by model_init
  # unless allow_random_locked (a random frozen tower learns nothing: a baseline only)
  config.lit = dict(locked_tower='', allow_random_locked=False)
  config.model_init = dict(workdir='', mapping='')  # e.g. 'tower_a:tower_a,proj_a:proj_a'
  config.optimizer = dict(name='adamw', lr=1e-3, scale_lr_by_batch=False, warmup_steps=50,
                          weight_decay=1e-4, momentum=0.9, grad_clip_norm=1.0,
                          logit_lr_mult=10.0)
  # tasks: the standard zero-shot / retrieval benchmarks at every evaluation, e.g.
  # 'zeroshot:imagefolder:/data/val,retrieval:jsonl:/data/coco.jsonl' (contrastive/eval_tasks/);
  # templates: a file of prompt templates ('': CLIP's 80); classnames: a file of class names;
  # data_dir: tfds datasets' folder.
  config.eval = dict(every=0, split='test', batch_size=512, ks=(1, 5, 10), block_size=1024,
                     random_init_baseline=True, tasks='', templates='', classnames='',
                     data_dir='')
  config.log_every = 20
  # (first, last): a jax.profiler trace of these steps in WORKDIR/profile (process 0); () = off.
  config.profile_steps = ()
  # GradCache (contrastive/grad_cache.py): > 0 embeds the global batch this many rows at a
  # time and takes the loss over all of it: the same gradient in less activation memory.
  config.grad_cache = dict(micro_batch_size=0)
  config.checkpoint_every = 200
  config.checkpoint_keep = 2
  config.nonfinite = 'error'
  config.max_consecutive_skips = 10
  config.allow_config_changes = ''
  return config


def apply_variants(config, variants):
  """The VARIANTS shared by the two-tower recipes (see the module docstring)."""
  unknown = set(variants) - set(VARIANTS)
  if unknown:
    raise ValueError(f'Unknown config variant(s) {sorted(unknown)}; choose from {VARIANTS}.')
  if 'resnet' in variants and config.model.get('image') is not None:
    config.model.image = dict(name='resnet', stage_sizes=(1, 1, 1), width=32, block='basic',
                              stem_strides=1)
  if 'lit' in variants:
    config.lit.locked_tower = 'a'
  if 'pod' in variants:
    if config.model.get('image') is not None:
      config.model.image = dict(name='vit', preset='B/16', pool='map')
      config.dataset.image_size = 224
    config.model.text = dict(name='text', preset='B', pool='eos')
    if config.model.get('a') is not None:
      config.model.a = dict(name='text', preset='B', pool='eos')
    config.model.embed_dim = 768
    config.tokenizer.update(vocab_size=32000, context=64)
    config.batch_size = 32768
    config.loss.block_size = 2048
    config.optimizer.update(lr=1e-3, warmup_steps=2000, weight_decay=1e-4)
    config.eval.update(every=2000, batch_size=4096)
    config.checkpoint_every = 1000
  if 'dense' in variants:
    config.loss.block_size = None
  if 'sketch' in variants:
    config.augment.update(sketch_prob=0.3, gray_prob=0.3)
  if 'styles' in variants:  # the emoji dataset's fields: a mixture's emoji_cldr part
    emoji_fields = config.dataset.get('emoji_cldr') or config.dataset
    emoji_fields.styles = ('unifont', 'noto_symbols')
    if not config.total_steps:  # the plain recipe's 890 steps (15 epochs of the Noto rows)
      config.total_steps = 890
  if 'clip_b32' in variants:
    config.model.image = dict(name='vit', preset='open_clip/ViT-B-32')
    config.model.embed_dim = 512
    config.dataset.image_size = 224
  if 'runlocal' in variants:
    config.dataset.max_examples = 64
    config.tokenizer.update(vocab_size=400, context=12)
    config.batch_size = 32
    config.total_steps = 6
    if config.model.get('image') is not None and config.model.image.name == 'vit':
      config.model.image = dict(name='vit', patch=8, width=32, depth=1, heads=2, mlp_dim=64,
                                pool='gap')
    for side in ('text', 'a'):
      if config.model.get(side) is not None and config.model[side].get('name') == 'text':
        config.model[side] = dict(name='text', width=32, depth=1, heads=2, mlp_dim=64,
                                  pool='eos')
    config.model.embed_dim = 32
    config.optimizer.warmup_steps = 1
    config.eval.update(batch_size=64, random_init_baseline=False)
    config.log_every = 1
    config.checkpoint_every = 3
  return config


def get_config(arg=None):
  """The SigLIP emoji config; `arg`: comma-separated VARIANTS."""
  variants = set(filter(None, (arg or '').split(',')))
  return apply_variants(base_config('siglip'), variants)
