"""Negatives mined from a whole corpus, between training rounds (ANCE / STAR style): pure
functions of embeddings, as opposed to the in-step samplers of `contrastive/samplers`.

  corpus_mining  each query's hardest non-positive, non-false-negative candidates, exact
                 tiled top-k, optionally sharded over the queries
"""

from contrastive.negatives.corpus_mining import mine_hard_negatives
from contrastive.negatives.geodesic_mixup import geodesic_negatives
from contrastive.negatives.geodesic_mixup import slerp
from contrastive.negatives.negclip import negative_captions
from contrastive.negatives.negclip import order_sensitivity
from contrastive.negatives.negclip import perturb_order
