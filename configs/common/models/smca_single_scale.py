# SMCA single-scale (the official code's model): R50 C5, 6 encoder + 6 decoder layers, 300 queries.
from smca_d2.modeling import (
    SMCADETR,
    HungarianMatcher,
    SetCriterion,
    SingleScaleEncoder,
    SMCADecoder,
    SMCATransformer,
)

from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet

model = L(SMCADETR)(
    # torchvision-style ResNet (stride in the 3x3 conv), frozen BN, stem + res2 frozen.
    backbone=L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=False, norm="FrozenBN"),
        out_features=["res5"],
        freeze_at=2,
    ),
    in_features=["res5"],
    num_extra_levels=0,
    transformer=L(SMCATransformer)(
        encoder=L(SingleScaleEncoder)(
            num_layers=6,
            d_model="${..decoder.d_model}",
            nhead="${..decoder.nhead}",
            dim_feedforward="${..decoder.dim_feedforward}",
            dropout="${..decoder.dropout}",
        ),
        decoder=L(SMCADecoder)(
            num_layers=6,
            d_model=256,
            nhead=8,
            dim_feedforward=2048,
            dropout=0.1,
            num_levels=1,
            scale_type="independent",  # "fixed" / "single" / "independent" (official type1/2/3)
            beta=8.0,
            modulate=True,
        ),
    ),
    criterion=L(SetCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0),
        weight_dict={"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
    ),
    num_classes=80,
    num_queries=300,
    # torchvision ImageNet statistics, RGB, in 0..255.
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    input_format="RGB",
    # Detections kept per image: the top-k of all query x class scores with k = num_queries, the
    # official evaluation protocol (pycocotools then keeps up to 100 per image *and class*).
    test_topk="${.num_queries}",
)
