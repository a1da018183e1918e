# The official code's "new multi-scale" SMCA (Multi_scale_SMCA.zip in gaopengcuhk/SMCA-DETR, the
# authors' 44.4 AP R50 model): res3, res4, res5 and a stride-2 conv on res5 (strides 8/16/32/64),
# six depthwise-convolution encoder layers exchanging features between adjacent levels (kernel 7,
# FFN 1024), the stride-8 memory folded to stride 16 for the decoder, whose Gaussian distances are
# weighed per level (x0.5, x0.5, x1, x2 before the division by 8: bandwidths 16, 16, 8, 4).
from smca_d2.modeling import ConvMultiScaleEncoder

from detectron2.config import LazyCall as L

from .smca_single_scale import model

IN_FEATURES = ["res3", "res4", "res5"]

model.backbone.out_features = list(IN_FEATURES)
model.in_features = list(IN_FEATURES)
model.num_extra_levels = 1
model.transformer.decoder.num_levels = 4
model.transformer.decoder.dim_feedforward = 1024
model.transformer.decoder.beta = [16.0, 16.0, 8.0, 4.0]
model.transformer.encoder = L(ConvMultiScaleEncoder)(
    num_layers=6,
    num_levels=4,
    d_model="${..decoder.d_model}",
    dim_feedforward="${..decoder.dim_feedforward}",
    dropout="${..decoder.dropout}",
    kernel_size=7,
    shared_exchange=True,
    fold_finest_level=True,
)
# The official evaluation of this model keeps the 500 highest query x class scores per image.
model.test_topk = 500
