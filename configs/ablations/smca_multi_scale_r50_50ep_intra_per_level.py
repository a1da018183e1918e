# SMCA multi-scale R50, 50 epochs, with one intra-scale attention layer per level in each intra
# block instead of one layer shared by the levels (the default; the paper's model size).
from ..smca_multi_scale_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.transformer.encoder.intra_attention = "per_level"
model.transformer.encoder.num_levels = "${..decoder.num_levels}"
