# R101 backbone, otherwise the R50 recipe.
from .smca_single_scale_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.stages.depth = 101
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-101.pkl"
