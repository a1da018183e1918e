# Paper ablation (Table 2): SMCA single-scale R50, 50 epochs, with head-shared modulation (one
# Gaussian map per query, shared by the 8 heads) and one predicted scale for width and height.
# (Head-specific with independent scales is smca_single_scale_r50_50ep.py.)
from ..smca_single_scale_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.transformer.decoder.head_shared = True
model.transformer.decoder.scale_type = "single"
