r"""SigLIP on emoji and WordNet in one run: emoji image -> its names, word -> its glosses, with
MM-Embed's modality-aware mined negatives.

  python -m contrastive.main --config configs/siglip_emoji_wordnet.py --workdir /tmp/mm_embed

One model for two tasks (Lin et al. 2024, "MM-Embed"): the ViT embeds emoji images, one text
transformer (mean pooling) embeds CLDR names, WordNet words and glosses on one SentencePiece
vocabulary trained on all of them. Every global batch of 256 holds 128 emoji rows and 128
WordNet rows (contrastive/data/mixture.py), so SigLIP's in-batch negatives mix the tasks. The
corpus-mined negatives (ANCE, contrastive/negatives/corpus_index.py) of an emoji row are
emoji names only and those of a word are glosses only: a query's hard negatives come from
its target kind (MM-Embed's modality-aware mining), never an easy negative of the other task.
Evaluated per dataset as the single-dataset recipes are (metrics 'emoji_cldr/...' and
'wordnet_gloss/...': retrieval both ways, zero-shot groups and lexicographer categories).

Variants: `runlocal` (tiny, seconds), `lit` (the image tower locked), `unmined` (no mined
negatives: the mixture alone), `bag` / `transformer` (the text tower: siglip_wordnet's bag of
pieces, or the 2-block transformer, this recipe's default), `sketch` (siglip_emoji.py's: line
drawings and grey among the training images), `styles` (siglip_emoji.py's: the training emoji
also drawn in two other monochrome fonts).
"""

from contrastive import config_lib

VARIANTS = ('runlocal', 'lit', 'unmined', 'bag', 'transformer', 'sketch', 'styles')


def get_config(arg=None):
  return mixture_config('siglip', arg)


def mixture_config(loss_params, arg=None, *, bag=False):
  """The emoji + WordNet recipe with the loss of `loss_params` ('siglip' or 'clip': mined
  negatives join sigmoid_loss only, so CLIP's is `unmined`); `bag`: the text tower without a
  `bag` or `transformer` variant is the bag of pieces, else the transformer."""
  siglip = config_lib.sibling(__file__, 'siglip_emoji.py')
  variants = set(filter(None, (arg or '').split(',')))
  if variants - set(VARIANTS):
    raise ValueError(f'Unknown config variant(s) {sorted(variants - set(VARIANTS))}; choose '
                     f'from {VARIANTS}.')
  if loss_params != 'siglip':
    variants.add('unmined')
  config = siglip.base_config(loss_params)
  config.dataset = dict(name='mixture', data_dir='', parts=('emoji_cldr', 'wordnet_gloss'),
                        fractions=(0.5, 0.5),
                        emoji_cldr=dict(image_size=32, languages=('en',), max_examples=0,
                                        styles=()),
                        wordnet_gloss=dict(examples=True, max_examples=0))
  config.tokenizer.update(vocab_size=8000, context=32)  # WordNet's: glosses are long
  config.model.text.pool = 'mean'  # as siglip_wordnet: a word's pieces count in a gloss
  config.total_steps = 600  # a mixture has no common epoch
  config.hard_negatives.update(num_hard=2, refresh_every=200)
  config.eval.batch_size = 1024
  if 'bag' in variants or (bag and 'transformer' not in variants):
    config.model.text = config_lib.sibling(__file__, 'siglip_wordnet.py').bag_tower()
  config = siglip.apply_variants(config, variants - {'unmined', 'bag', 'transformer'})
  if 'unmined' in variants:
    config.hard_negatives.update(num_hard=0, refresh_every=0)
  if 'runlocal' in variants:
    del config.dataset['max_examples']  # (set by apply_variants for one dataset)
    config.dataset.emoji_cldr.max_examples = 64
    config.dataset.wordnet_gloss.max_examples = 300
    config.model.text.pool = 'mean'
    config.hard_negatives.refresh_every = 3
  return config
