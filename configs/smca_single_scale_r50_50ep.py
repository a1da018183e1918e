# SMCA single-scale, R50, 50 epochs on COCO, batch 16 (paper: 41.0 AP).
from .common.data.coco_detr import dataloader
from .common.models.smca_single_scale import model
from .common.optim import AdamW as optimizer
from .common.schedule import epoch_step_schedule
from .common.train import train

train.max_iter, lr_multiplier = epoch_step_schedule(epochs=50, batch_size=dataloader.train.total_batch_size)
train.checkpointer.period = train.max_iter // 50  # once per epoch
train.eval_period = train.max_iter // 10
# detectron2's conversion of torchvision's ImageNet R-50 (RGB, torchvision statistics).
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
