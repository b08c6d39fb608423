r"""SigLIP on webdataset shards (img2dataset's output: KEY.jpg, KEY.txt, KEY.json per sample).

  python -m contrastive.main --config configs/siglip_webdataset.py --workdir W \
      --config.dataset.train_shards='/data/cc3m/{00000..00331}.tar' \
      --config.dataset.eval_shards='/data/cc3m/val/{00000..00003}.tar'
  python -m contrastive.main --config configs/siglip_webdataset.py:runlocal --workdir W \
      --config.dataset.train_shards='DIR/{00000..00003}.tar' \
      --config.dataset.eval_shards=DIR/00004.tar

Quote a brace pattern in the shell (the code expands it). SigLIP B/16 at 224 px (Zhai et al.
2023): ViT-B/16 with MAP pooling, a 12-block text transformer B on a 32k SentencePiece
vocabulary trained on a sample of the captions, 64 tokens, the pairwise sigmoid loss.
Training images: a random resized crop of scale (0.9, 1.0) (open_clip's CLIP default; big_vision's
SigLIP resizes the whole image: --config.dataset.crop_scale='(1.0, 1.0)' gives its centre
square), decoded in grain worker processes (contrastive/data/webdataset.py). Evaluation:
retrieval both ways on the eval shards, and zero-shot when config.dataset.class_names and
label_key are given.

Variants: `pod` (batch 32,768, blockwise ring loss: the v5e-256 job that
`python -m contrastive.aot` compiles), `runlocal` (a tiny ViT and text transformer at 64 px,
batch 32, 6 steps: small shards on CPU), `dense` (with pod: no blocks).
"""

from contrastive import config_lib

VARIANTS = ('runlocal', 'pod', 'dense')


def get_config(arg=None):
  """The SigLIP webdataset config; `arg`: comma-separated VARIANTS."""
  variants = set(filter(None, (arg or '').split(',')))
  if variants - set(VARIANTS):
    raise ValueError(f'Unknown config variant(s) {sorted(variants - set(VARIANTS))}; choose '
                     f'from {VARIANTS}.')
  siglip = config_lib.sibling(__file__, 'siglip_emoji.py')
  config = siglip.base_config('siglip')
  config.dataset = dict(
      name='webdataset', data_dir='', train_shards='', eval_shards='',
      image_keys='jpg;jpeg;png;webp', text_key='txt', group_key='', index_dir='',
      image_size=224, crop_scale=(0.9, 1.0), worker_count=-1, max_skipped_fraction=0.01,
      tokenizer_sample=100_000, class_names='', label_key='')
  config.model.image = dict(name='vit', preset='B/16', pool='map')
  config.model.text = dict(name='text', preset='B', pool='eos')
  config.model.embed_dim = 768
  config.tokenizer.update(vocab_size=32000, context=64)
  config.batch_size = 1024
  config.num_epochs = 1.0
  config.optimizer.update(lr=1e-3, warmup_steps=2000, weight_decay=1e-4)
  config.eval.update(every=2000, batch_size=1024, random_init_baseline=False)
  config.checkpoint_every = 1000
  config.log_every = 50
  if 'pod' in variants:
    config.batch_size = 32768
    config.loss.block_size = 2048
    config.eval.batch_size = 4096
  if 'dense' in variants:
    config.loss.block_size = None
  if 'runlocal' in variants:
    config.dataset.update(image_size=64, tokenizer_sample=10_000, worker_count=1)
    config.model.image = dict(name='vit', patch=16, width=32, depth=1, heads=2, mlp_dim=64,
                              pool='gap')
    config.model.text = dict(name='text', width=32, depth=1, heads=2, mlp_dim=64, pool='eos')
    config.model.embed_dim = 32
    config.tokenizer.update(vocab_size=400, context=16)
    config.batch_size = 32
    config.total_steps = 6
    config.optimizer.warmup_steps = 1
    config.eval.update(every=0, batch_size=64)
    config.log_every = 1
    config.checkpoint_every = 3
  return config
