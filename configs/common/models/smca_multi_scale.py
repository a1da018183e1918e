# SMCA multi-scale as in the paper: res4, res5 and a stride-2 conv on res5 (strides 16/32/64),
# intra/multi-scale encoder, per-level Gaussians with scale-selection attention in the decoder.
from detectron2.config import LazyCall as L

from smca_d2.modeling import MultiScaleEncoder

from .smca_single_scale import model

model.backbone.out_features = ["res4", "res5"]
model.in_features = ["res4", "res5"]
model.num_extra_levels = 1
model.transformer.decoder.num_levels = 3  # len(in_features) + num_extra_levels
model.transformer.encoder = L(MultiScaleEncoder)(
    block_types=["intra", "intra", "multi", "intra", "intra"],
    d_model="${..decoder.d_model}",
    nhead="${..decoder.nhead}",
    dim_feedforward="${..decoder.dim_feedforward}",
    dropout="${..decoder.dropout}",
)
