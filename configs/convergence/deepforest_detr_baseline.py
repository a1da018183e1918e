# Convergence benchmark, tree crowns: the DETR-style baseline (single-scale model, modulation off).
from .deepforest_smca_single_scale import dataloader, lr_multiplier, model, optimizer, train

model.transformer.decoder.modulate = False
train.output_dir = "output/convergence/deepforest/detr_baseline"
