# Convergence benchmark (benchmarks/convergence.py), generated shapes: the small R18 of
# configs/common/r18_synthetic.py (from scratch, trainable BN, res4, narrow transformer), a
# shorter schedule and evaluation every 100 iterations. The multi-scale and baseline configs next
# to this file differ only in the model.
from ..common.r18_synthetic import dataloader, model, optimizer, train
from ..common.schedule import step_schedule

train.max_iter = 1000
train.eval_period = 100
train.checkpointer.period = train.max_iter
train.output_dir = "output/convergence/synthetic/smca_single_scale"
lr_multiplier = step_schedule(train.max_iter)
