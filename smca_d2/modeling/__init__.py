"""SMCA-DETR modeling: meta-architecture, encoders, modulated decoder, matcher, criterion."""

from .attention import SpatiallyModulatedCoAttention, gaussian_log_weights
from .criterion import SetCriterion, sigmoid_focal_loss
from .decoder import SMCA_DECODER_REGISTRY, DecoderLayer, SMCADecoder
from .denoising import DenoisingQueries
from .encoder import SMCA_ENCODER_REGISTRY, ConvMultiScaleEncoder, DecoderLevels, MultiScaleEncoder, SingleScaleEncoder
from .matcher import HungarianMatcher
from .meta_arch import SMCADETR
from .position_encoding import PositionEmbeddingSine
from .transformer import SMCATransformer

__all__ = [
    "SMCADETR",
    "SMCATransformer",
    "SingleScaleEncoder",
    "MultiScaleEncoder",
    "ConvMultiScaleEncoder",
    "DecoderLevels",
    "SMCA_ENCODER_REGISTRY",
    "SMCADecoder",
    "DecoderLayer",
    "SMCA_DECODER_REGISTRY",
    "SpatiallyModulatedCoAttention",
    "gaussian_log_weights",
    "PositionEmbeddingSine",
    "DenoisingQueries",
    "HungarianMatcher",
    "SetCriterion",
    "sigmoid_focal_loss",
]
