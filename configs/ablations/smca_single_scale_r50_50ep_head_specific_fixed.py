# Paper ablation (Table 2): SMCA single-scale R50, 50 epochs, with head-specific modulation (one
# Gaussian map per head) and the Gaussian's scale fixed at 1. (Head-specific with independent scales
# is smca_single_scale_r50_50ep.py.)
from ..smca_single_scale_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.transformer.decoder.head_shared = False
model.transformer.decoder.scale_type = "fixed"
