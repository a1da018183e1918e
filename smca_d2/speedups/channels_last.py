"""Running a backbone in channels-last memory format (oneDNN's and cuDNN's preferred layout)."""

import torch
from torch import nn

__all__ = ["use_channels_last"]


def _to_channels_last(module: nn.Module, args):
    x, *rest = args
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x, *rest)


def use_channels_last(backbone: nn.Module) -> nn.Module:
    """Put ``backbone``'s weights in channels-last format and convert its input to it (a forward
    pre-hook); the features come out channels-last, with the same values to float rounding.
    In place; returns ``backbone``."""
    backbone.to(memory_format=torch.channels_last)
    if not any(hook is _to_channels_last for hook in backbone._forward_pre_hooks.values()):
        backbone.register_forward_pre_hook(_to_channels_last)
    return backbone
