# The DETR-style baseline: the single-scale SMCA model with the spatial modulation turned off
# (no Gaussian prior; same queries, heads, losses and recipe), for apples-to-apples comparisons.
from .smca_single_scale_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.transformer.decoder.modulate = False
