# Convergence benchmark, tree crowns: SMCA multi-scale (res4, res5 and a stride-2 conv on res5)
# on the same R18 backbone, data and schedule.
from ..common.models.smca_multi_scale import make_multi_scale
from .deepforest_smca_single_scale import dataloader, lr_multiplier, model, optimizer, train

# As deep as the single-scale model's 2-layer encoder: one intra-scale and one multi-scale block
# (the paper's 5 blocks go with its 6-layer single-scale encoder; 5 blocks here train much worse
# than 2 layers, which measures depth, not multi-scale attention).
model = make_multi_scale(model, block_types=["intra", "multi"])
train.output_dir = "output/convergence/deepforest/smca_multi_scale"
