# Paper ablation (Table 3): SMCA multi-scale R50, 50 epochs, with five intra-scale encoder blocks
# (no multi-scale self-attention). Other orders: model.transformer.encoder.block_types=[...].
from ..smca_multi_scale_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.transformer.encoder.block_types = ["intra"] * 5
