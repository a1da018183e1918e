# 108 epochs: the 50-epoch schedule stretched by 108/50, lr drop kept at 4/5 of it (paper: 42.7 AP).
from .smca_single_scale_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

train.max_iter = train.max_iter * 108 // 50
lr_multiplier.num_updates = train.max_iter
lr_multiplier.milestones = [train.max_iter * 4 // 5]
train.checkpointer.period = train.max_iter // 108
train.eval_period = train.max_iter // 10
