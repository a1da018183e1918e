# Convergence benchmark (benchmarks/convergence.py), generated shapes: the demo recipe
# (R18 from scratch, trainable BN, res4, narrow transformer), a shorter schedule and evaluation
# every 100 iterations. The multi-scale and baseline configs next to this file differ only in
# the model.
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L

from ..common.r18_synthetic import dataloader, model, optimizer, train

train.max_iter = 1000
train.eval_period = 100
train.checkpointer.period = train.max_iter
train.output_dir = "output/convergence/synthetic/smca_single_scale"
lr_multiplier = L(MultiStepParamScheduler)(
    values=[1.0, 0.1], milestones=[train.max_iter * 4 // 5], num_updates=train.max_iter
)
