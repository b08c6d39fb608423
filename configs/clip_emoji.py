r"""CLIP on emoji: the same towers, data and budget as configs/siglip_emoji.py with CLIP's
softmax loss (symmetric InfoNCE over the global batch) and its learned logit scale, initialised
to 1/0.07 and clipped at 100 (Radford et al. 2021).

  python -m contrastive.main --config configs/clip_emoji.py --workdir /tmp/clip_emoji

Variants: those of siglip_emoji.py (`runlocal`, `resnet`, `lit`, `pod`).
"""

from contrastive import config_lib


def get_config(arg=None):
  siglip = config_lib.sibling(__file__, 'siglip_emoji.py')
  variants = set(filter(None, (arg or '').split(',')))
  return siglip.apply_variants(siglip.base_config('clip'), variants)
