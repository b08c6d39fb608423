r"""CLIP on emoji and WordNet in one run: configs/siglip_emoji_wordnet.py's mixture (128 emoji
image -> name rows and 128 WordNet word -> gloss rows per batch, one text tower) with CLIP's
softmax loss and learned logit scale (Radford et al. 2021), without mined negatives (they join
SigLIP's loss only).

  python -m contrastive.main --config configs/clip_emoji_wordnet.py --workdir /tmp/clip_mix

Variants: `runlocal` (tiny, seconds), `lit` (the image tower locked).
"""

from contrastive import config_lib


def get_config(arg=None):
  mixture = config_lib.sibling(__file__, 'siglip_emoji_wordnet.py')
  return mixture.mixture_config('clip', arg)
