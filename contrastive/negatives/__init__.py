"""Negatives for dual encoders: pure functions of embeddings or captions, as opposed
to the in-step samplers of `contrastive/samplers`.

  corpus_mining   each query's hardest non-positive, non-false-negative candidates in a whole
                  corpus (ANCE / STAR), exact tiled top-k, optionally sharded over the queries
  negclip         word-order perturbations of captions as extra text negatives (NegCLIP), and
                  the order sensitivity of a model (ARO)
  geodesic_mixup  slerp of matched image-text pairs on the sphere as hard negatives (m^3-Mix)
"""

from contrastive.negatives.corpus_mining import mine_hard_negatives
from contrastive.negatives.geodesic_mixup import geodesic_negatives
from contrastive.negatives.geodesic_mixup import slerp
from contrastive.negatives.negclip import negative_captions
from contrastive.negatives.negclip import order_sensitivity
from contrastive.negatives.negclip import perturb_order
