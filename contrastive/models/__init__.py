"""Encoders and heads."""

from contrastive.models.heads import build_model
from contrastive.models.heads import ContrastiveModel
from contrastive.models.heads import ProjectionHead
from contrastive.models.resnet import PRESETS
from contrastive.models.resnet import ResNet
