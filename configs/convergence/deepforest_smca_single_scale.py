# Convergence benchmark (benchmarks/convergence.py), real aerial tree crowns (deepforest sample
# data, datasets/prepare_deepforest.py): one class, ~20 crowns per 400 px training tile, ~50 per
# held-out image. Same small from-scratch model as the shapes benchmark with more queries; images
# are resized to 256 px (crowns ~25 px) to fit the CPU budget. The multi-scale and baseline
# configs next to this file differ only in the model.
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from ..demo.smca_r18_synthetic import dataloader, model, optimizer, train

dataloader.train.dataset.names = "smca_deepforest_train"
dataloader.test.dataset.names = "smca_deepforest_val"
dataloader.train.mapper.augmentations = [
    L(T.Resize)(shape=(256, 256)),
    L(T.RandomFlip)(horizontal=True),
    L(T.RandomFlip)(horizontal=False, vertical=True),  # aerial views have no "up"
]
dataloader.test.mapper.augmentations = [L(T.Resize)(shape=(256, 256))]
dataloader.train.total_batch_size = 4

model.num_classes = 1
model.num_queries = 100

train.max_iter = 1000
train.eval_period = 100
train.checkpointer.period = train.max_iter
train.output_dir = "output/convergence/deepforest/smca_single_scale"
lr_multiplier = L(MultiStepParamScheduler)(
    values=[1.0, 0.1], milestones=[train.max_iter * 4 // 5], num_updates=train.max_iter
)
