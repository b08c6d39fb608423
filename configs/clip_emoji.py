r"""CLIP on emoji: the same towers, data and budget as configs/siglip_emoji.py with CLIP's
softmax loss (symmetric InfoNCE over the global batch) and its learned logit scale, initialised
to 1/0.07 and clipped at 100 (Radford et al. 2021).

  python -m contrastive.main --config configs/clip_emoji.py --workdir /tmp/clip_emoji
  python -m contrastive.main --config configs/clip_emoji.py:amcl --workdir /tmp/clip_emoji_amcl

Variants: those of siglip_emoji.py (`runlocal`, `resnet`, `lit`, `pod`, ...), and `amcl`: AMCL
(Wang et al. 2024, contrastive/losses/amcl.py) in place of CLIP's loss: each tower's projection
gives AMCL_HEADS heads of embed_dim, each with its own learned temperature (initial 0.1), the
symmetric InfoNCE of each head plus beta (kappa log tau + 1 / tau) per head; retrieval scores
are the heads' mean cosine similarity.
"""

from contrastive import config_lib

AMCL_HEADS = 4


def get_config(arg=None):
  siglip = config_lib.sibling(__file__, 'siglip_emoji.py')
  variants = set(filter(None, (arg or '').split(',')))
  config = siglip.apply_variants(siglip.base_config('clip'), variants - {'amcl'})
  if 'amcl' in variants:
    config.model.update(loss_params='amcl', head_count=AMCL_HEADS, logit_scale_init=10.0)
    config.loss.name = 'amcl'
    config.loss.beta = 0.1  # the penalty's weight and its log tau weight (the authors')
    config.loss.kappa = 0.5
  return config
