# Convergence benchmark, generated shapes: SMCA multi-scale on the same R18 backbone, data and
# schedule.
from ..common.models.smca_multi_scale import make_multi_scale
from .synthetic_smca_single_scale import dataloader, lr_multiplier, model, optimizer, train

# Two encoder blocks, one intra-scale and one multi-scale (the paper has five, with its 6-layer
# single-scale encoder; five blocks trained much worse than two here from scratch). The
# single-scale model of this benchmark has no encoder layer, so this one is also the deeper.
# Three levels an octave apart as in the paper (there res4, res5 and a stride-2 conv on res5), one
# octave finer for these small images: res3, res4 and a stride-2 conv on res4 (strides 8/16/32).
model = make_multi_scale(model, in_features=("res3", "res4"), block_types=["intra", "multi"])
train.output_dir = "output/convergence/synthetic/smca_multi_scale"
