# The official code's "new multi-scale" SMCA, R50, 50 epochs on COCO, batch 8 (its authors: 44.4 AP,
# with 1 image per GPU on 8 GPUs); the model in configs/common/models/smca_conv_multi_scale.py.
from .common.data.coco_detr import dataloader
from .common.models.smca_conv_multi_scale import model
from .common.optim import AdamW as optimizer
from .common.schedule import epoch_step_schedule
from .common.train import train

dataloader.train.total_batch_size = 8
train.max_iter, lr_multiplier = epoch_step_schedule(epochs=50, batch_size=dataloader.train.total_batch_size)
train.checkpointer.period = train.max_iter // 50  # once per epoch
train.eval_period = train.max_iter // 10
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
