r"""SigLIP on WordNet 3.0: a word (or collocation) <-> its gloss, text-text two towers.

  python -m contrastive.main --config configs/siglip_wordnet.py --workdir /tmp/siglip_wordnet

186k training pairs (Debian `wordnet-base`); held out: 10% of the words, with every sense of
each (contrastive/data/wordnet.py). Synonyms share a synset id, so they are not each other's
negatives (the loss's id mask). One text tower (shared weights) embeds words and glosses on
one SentencePiece vocabulary: by default a bag of pieces (width 256, no blocks, no position
table, mean pooling: each piece's learned embedding, layer-normalised, averaged; StarSpace's
model, Wu et al. 2018), which takes ~0.2 s a step on 2 cores, so 4 epochs fit the 15 minutes
(`transformer`: the 2-block text transformer with mean pooling, 1 epoch in the same time;
`lit`: separate towers, the word tower locked). Evaluated by retrieval both ways (word -> its
glosses, gloss -> its words) and zero-shot classification of glosses into the 45 lexicographer
categories, prompts through the word tower.

Variants: those of siglip_emoji.py (`runlocal`, `lit` locks tower a, `pod`) and `transformer`.
"""

from contrastive import config_lib


def bag_tower():
  """The recipe's text tower: a bag of pieces (each piece's learned 256-d embedding, averaged;
  no blocks, no position table)."""
  return dict(name='text', preset='small', pool='mean', depth=0, positions=False, width=256)


def get_config(arg=None):
  siglip = config_lib.sibling(__file__, 'siglip_emoji.py')
  variants = set(filter(None, (arg or '').split(',')))
  transformer = 'transformer' in variants
  variants.discard('transformer')
  config = siglip.base_config('siglip')
  config.dataset = dict(name='wordnet_gloss', data_dir='', examples=True, max_examples=0)
  config.tokenizer.update(vocab_size=8000, context=32)
  # One text tower for words and glosses (shared weights and token embeddings) with mean
  # pooling: a word's tokens in a gloss count from the first step. Separate towers with EOS
  # pooling reached recall@1 0.003 in the same 15 minutes (README); `model.text` is tower b
  # where share is False (the `lit` variant). The bag of pieces (depth 0) beats the 2-block
  # transformer at the same 15 minutes (README: 4 epochs against 1).
  config.model.a = bag_tower()
  config.num_epochs = 4.0  # 2,910 steps
  if transformer:
    config.model.a = dict(name='text', preset='small', pool='mean')
    config.num_epochs = 1.0  # 727 steps: ~13 min on 2 cores
  del config.model['image']
  config.model.text.pool = 'mean'
  config.model.share = True
  config.eval.batch_size = 1024
  # A refresh of the mined negatives (num_hard > 0) embeds 110k glosses (the transformer's
  # take ~70 s on 2 cores): every 250 steps it stays within 15% of a run's wall time (README).
  config.hard_negatives.refresh_every = 250
  if 'resnet' in variants:
    raise ValueError('siglip_wordnet has no image tower: the `resnet` variant does not apply.')
  config = siglip.apply_variants(config, variants)
  for side in ('a', 'text'):  # the variants' text towers pool as this recipe does
    config.model[side].pool = 'mean'
  if 'lit' in variants:  # a locked word tower and a trained gloss tower: two towers
    config.model.share = False
  if 'runlocal' in variants:
    config.dataset.max_examples = 300
    if not transformer:  # the recipe's bag of pieces, small
      config.model.a = dict(name='text', pool='mean', depth=0, positions=False, width=32,
                            heads=2, mlp_dim=64)
  return config
