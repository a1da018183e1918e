# Convergence benchmark, generated shapes: SMCA multi-scale (the paper's levels: res4, res5 and a
# stride-2 conv on res5) on the same R18 backbone, data and schedule.
from ..common.models.smca_multi_scale import make_multi_scale
from .synthetic_smca_single_scale import dataloader, lr_multiplier, model, optimizer, train

model = make_multi_scale(model)
train.output_dir = "output/convergence/synthetic/smca_multi_scale"
