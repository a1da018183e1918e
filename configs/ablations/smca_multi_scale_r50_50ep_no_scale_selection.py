# Paper ablation (Table 1): SMCA multi-scale R50, 50 epochs, without scale-selection attention: the
# decoder averages its per-level co-attention outputs with equal weights.
from ..smca_multi_scale_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.transformer.decoder.scale_selection = False
