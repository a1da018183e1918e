"""Optimizer pieces of the SMCA recipe: AdamW, lower backbone lr, full-model grad-norm clipping."""
from typing import Dict, List

import torch
from torch import nn


def param_groups(model: nn.Module, *, backbone_lr_factor: float = 0.1, base_lr: float) -> List[Dict]:
    """Two parameter groups: the backbone at ``base_lr * backbone_lr_factor``, the rest at
    ``base_lr``. Frozen parameters are left out."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith("backbone.") else rest).append(p)
    groups = [{"params": rest, "lr": base_lr}]
    if backbone:
        groups.append({"params": backbone, "lr": base_lr * backbone_lr_factor})
    return groups


class AdamWWithClipping(torch.optim.AdamW):
    """AdamW that clips the gradient norm of all its parameters together before each step.

    Clipping lives in ``step`` so that it sees unscaled gradients under AMP
    (``GradScaler.step`` unscales before calling it). ``max_grad_norm <= 0`` disables it.
    """

    def __init__(self, params, *, max_grad_norm: float = 0.1, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure=None):
        if self.max_grad_norm > 0:
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return super().step(closure)
