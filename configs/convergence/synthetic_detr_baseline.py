# Convergence benchmark, generated shapes: the DETR-style baseline, i.e. the single-scale model
# with the spatial modulation turned off (same backbone, data, schedule, seeds).
from .synthetic_smca_single_scale import dataloader, lr_multiplier, model, optimizer, train

model.transformer.decoder.modulate = False
train.output_dir = "output/convergence/synthetic/detr_baseline"
