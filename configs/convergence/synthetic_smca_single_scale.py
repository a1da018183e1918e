# Convergence benchmark (benchmarks/convergence.py), generated shapes: the small R18 of
# configs/common/r18_synthetic.py (from scratch, trainable BN, narrow transformer) with the model
# changes of the demo (configs/demo/smca_r18_synthetic.py, measured there): res3 features
# (stride 8), no encoder layer, no dropout, lr 3e-4, channels-last backbone; a shorter schedule
# and evaluation every 100 iterations, on the first 800 training images (the benchmark's
# measured setting; `make demo` trains on all 4000). The multi-scale and baseline configs next to
# this file differ only in the model.
from ..common.r18_synthetic import dataloader, model, optimizer, train
from ..common.schedule import step_schedule

dataloader.train.dataset.names = "smca_synthetic_train_800"

model.backbone.out_features = ["res3"]
model.in_features = ["res3"]
model.transformer.encoder.num_layers = 0
model.transformer.decoder.dropout = 0.0
train.speedups.channels_last = True
optimizer.lr = 3e-4

train.max_iter = 1000
train.eval_period = 100
train.checkpointer.period = train.max_iter
train.output_dir = "output/convergence/synthetic/smca_single_scale"
lr_multiplier = step_schedule(train.max_iter)
