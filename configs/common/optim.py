# AdamW, lr 1e-4 (backbone 1e-5), weight decay 1e-4, gradient norm of the whole model clipped to 0.1.
from smca_d2.solver import AdamWWithClipping, param_groups

from detectron2.config import LazyCall as L

AdamW = L(AdamWWithClipping)(
    params=L(param_groups)(base_lr="${..lr}", backbone_lr_factor=0.1),  # model set by train_net
    lr=1e-4,
    weight_decay=1e-4,
    max_grad_norm=0.1,
)
