"""Contrastive losses: pure functions of embeddings returning (loss, metrics)."""

from contrastive.losses.blockwise import distinct_ids
from contrastive.losses.common import at_least_float32
from contrastive.losses.common import l2_normalize
from contrastive.losses.common import NORM_EPS
from contrastive.losses.dcl import dcl
from contrastive.losses.dcl import dclw
from contrastive.losses.dcl import decoupled_info_nce
from contrastive.losses.dcl import vmf_weights
from contrastive.losses.debiased import debiased_info_nce
from contrastive.losses.debiased import hard_negative_info_nce
from contrastive.losses.info_nce import clip_loss
from contrastive.losses.info_nce import info_nce
from contrastive.losses.nt_xent import nt_xent
from contrastive.losses.pamc import pamc_info_nce
from contrastive.losses.registry import check_compute_dtype
from contrastive.losses.registry import check_loss_config
from contrastive.losses.registry import pair_loss_from_config
from contrastive.losses.registry import PAIR_LOSSES
from contrastive.losses.sigmoid import sigmoid_loss
from contrastive.losses.supcon import supcon
