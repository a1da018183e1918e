"""SMCA-DETR modeling: meta-architecture, encoders, modulated decoder, matcher, criterion."""
from .attention import SpatiallyModulatedCoAttention, gaussian_log_weights
from .criterion import SetCriterion, sigmoid_focal_loss
from .decoder import SMCA_DECODER_REGISTRY, DecoderLayer, SMCADecoder
from .encoder import SMCA_ENCODER_REGISTRY, MultiScaleEncoder, SingleScaleEncoder
from .fusion import (
    FastCPUStem,
    FrozenBNConv2d,
    fold_frozen_batchnorm,
    fuse_frozen_batchnorm,
    optimize_for_inference,
    use_fast_cpu_stem,
)
from .matcher import HungarianMatcher
from .meta_arch import SMCADETR
from .position_encoding import PositionEmbeddingSine
from .transformer import SMCATransformer

__all__ = [k for k in globals().keys() if not k.startswith("_")]
