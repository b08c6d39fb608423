"""Encoders and heads."""

from contrastive.models.compute import REMAT_POLICIES
from contrastive.models.heads import build_model
from contrastive.models.heads import ContrastiveModel
from contrastive.models.heads import ProjectionHead
from contrastive.models.resnet import PRESETS
from contrastive.models.resnet import ResNet
from contrastive.models.text import TEXT_B
from contrastive.models.text import TEXT_PRESETS
from contrastive.models.text import TEXT_SMALL
from contrastive.models.text import TextTransformer
from contrastive.models.transformer import MAPHead
from contrastive.models.two_tower import build_tower
from contrastive.models.two_tower import build_two_tower
from contrastive.models.two_tower import LogitParams
from contrastive.models.two_tower import TwoTower
from contrastive.models.vit import VIT_B16
from contrastive.models.vit import VIT_PRESETS
from contrastive.models.vit import VIT_SMALL
from contrastive.models.vit import ViT
