# R101, otherwise the R50 recipe, with one down and one up conv per pair of adjacent levels instead
# of one pair shared by all: the structure of the authors' R101 run (45.7 AP), whose logged
# parameter count only this structure gives.
from .smca_conv_multi_scale_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.stages.depth = 101
model.transformer.encoder.shared_exchange = False
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-101.pkl"
