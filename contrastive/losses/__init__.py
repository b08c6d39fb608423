"""Contrastive losses: pure functions of embeddings returning (loss, metrics)."""

from contrastive.losses.common import l2_normalize
from contrastive.losses.common import NORM_EPS
from contrastive.losses.nt_xent import nt_xent
from contrastive.losses.registry import check_loss_config
from contrastive.losses.registry import pair_loss_from_config
from contrastive.losses.registry import PAIR_LOSSES
