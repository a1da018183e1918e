"""Optimizer pieces of the SMCA recipe: AdamW, lower backbone lr, full-model grad-norm clipping."""

from typing import Dict, Iterator, List, Optional

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

    By default the update runs as torch's fused AdamW kernel wherever it has one (parameters on
    the CPU or on CUDA): one pass over each parameter and its state instead of about ten, the
    same update to float rounding.
    """

    def __init__(self, params, *, max_grad_norm: float = 0.1, fused: Optional[bool] = None, **kwargs):
        """
        Args:
            params: parameters or parameter groups, as for ``torch.optim.AdamW``.
            max_grad_norm: clip the norm of all gradients together to this (<= 0: no clipping).
            fused: torch's fused kernel; None uses it when every parameter is on the CPU or on
                CUDA and neither ``foreach`` nor ``differentiable`` is asked for.
            kwargs: the other arguments of ``torch.optim.AdamW``.
        """
        params = list(params)
        if fused is None:
            fused = (
                not kwargs.get("foreach")
                and not kwargs.get("differentiable")
                and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in _tensors(params))
            )
        super().__init__(params, fused=fused or None, **kwargs)
        # GradScaler must unscale before step() so that the clipping sees true gradients; the
        # fused kernel's own unscaling (with found_inf skipping) is therefore not used.
        self._step_supports_amp_scaling = False
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure=None):
        if self.max_grad_norm > 0:
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return super().step(closure)


def _tensors(params) -> Iterator[torch.Tensor]:
    for p in params:
        if isinstance(p, dict):
            yield from p["params"]
        else:
            yield p
