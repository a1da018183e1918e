# Paper ablation (Table 3): SMCA multi-scale R50, 50 epochs, with five multi-scale encoder blocks
# (every block attends across all levels). Other orders:
# model.transformer.encoder.block_types=[...].
from ..smca_multi_scale_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.transformer.encoder.block_types = ["multi"] * 5
