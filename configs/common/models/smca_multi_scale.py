# SMCA multi-scale as in the paper: res4, res5 and a stride-2 conv on res5 (strides 16/32/64),
# intra/multi-scale encoder, per-level Gaussians with scale-selection attention in the decoder.
from smca_d2.modeling import MultiScaleEncoder

from detectron2.config import LazyCall as L

from .smca_single_scale import model as _single_scale_model

PAPER_BLOCKS = ["intra", "intra", "multi", "intra", "intra"]


def make_multi_scale(model, in_features=("res4", "res5"), num_extra_levels=1, block_types=PAPER_BLOCKS):
    """Turn a single-scale SMCA model config into the paper's multi-scale model (in place).

    Config files of other single-scale models (e.g. a small backbone) call this too, so the
    multi-scale recipe is written once. ``block_types`` is the encoder's intra/multi-scale block
    order (the paper's five blocks by default).
    """
    model.backbone.out_features = list(in_features)
    model.in_features = list(in_features)
    model.num_extra_levels = num_extra_levels
    model.transformer.decoder.num_levels = len(in_features) + num_extra_levels
    model.transformer.encoder = L(MultiScaleEncoder)(
        block_types=list(block_types),
        d_model="${..decoder.d_model}",
        nhead="${..decoder.nhead}",
        dim_feedforward="${..decoder.dim_feedforward}",
        dropout="${..decoder.dropout}",
    )
    return model


model = make_multi_scale(_single_scale_model)
