# Convergence benchmark (benchmarks/convergence.py), real aerial tree crowns (deepforest sample
# data, datasets/prepare_deepforest.py): one class, ~20 crowns per 400 px training tile, ~50 per
# held-out image. Same small from-scratch model as the shapes benchmark with more queries; images
# are resized to 256 px (crowns ~25 px) to fit the CPU budget. The multi-scale and baseline
# configs next to this file differ only in the model.
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

# The shapes benchmark's model, optimizer and schedule (1000 iterations, evaluation every 100).
from .synthetic_smca_single_scale import dataloader, lr_multiplier, model, optimizer, train

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

train.output_dir = "output/convergence/deepforest/smca_single_scale"
