# SMCA multi-scale (paper encoder), R50, 50 epochs on COCO, batch 8 (paper: 43.7 AP).
from .common.data.coco_detr import dataloader
from .common.models.smca_multi_scale import model
from .common.optim import AdamW as optimizer
from .common.schedule import epoch_step_schedule
from .common.train import train

# The paper's model: FFNs of 1024 in the encoder and the decoder, as in the official multi-scale
# runs (--dim_feedforward 1024); 39.5M trainable parameters, the paper's "about 40M".
model.transformer.decoder.dim_feedforward = 1024

dataloader.train.total_batch_size = 8
train.max_iter, lr_multiplier = epoch_step_schedule(epochs=50, batch_size=dataloader.train.total_batch_size)
train.checkpointer.period = train.max_iter // 50  # once per epoch
train.eval_period = train.max_iter // 10
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
