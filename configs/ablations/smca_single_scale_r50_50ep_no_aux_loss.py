# SMCA single-scale R50, 50 epochs, supervising only the last decoder layer (no auxiliary losses;
# the official code's --no_aux_loss).
from ..smca_single_scale_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.aux_loss = False
