"""Speed-ups applied to a built model; each keeps its outputs (to float rounding).

The model in :mod:`smca_d2.modeling` is written for reading: torch's modules and the reference
attention. What makes it faster on a given device lives here, as functions over the module tree
(like Detectron2's ``FrozenBatchNorm2d.convert_frozen_batchnorm``), each with its own tests:

===========================================  ============================================================
:func:`~.frozen_bn.fuse_frozen_batchnorm`    frozen BN applied to the conv weights, not to the activations
                                             (training and inference; checkpoints unchanged)
:func:`~.frozen_bn.fold_frozen_batchnorm`    frozen BN folded into the conv weights (inference only)
:func:`~.stem.use_fast_cpu_stem`             the frozen ResNet stem max-pools in channels-last format (CPU)
:func:`~.dropout.use_fast_cpu_dropout`       dropout masks drawn from NumPy's SFC64 generator (CPU
                                             training; the same dropout in distribution)
:func:`~.channels_last.use_channels_last`    the backbone in channels-last memory format
:func:`~.memory.keep_freed_cpu_memory`       glibc malloc keeps freed memory for the next iteration
===========================================  ============================================================

:func:`optimize_for_training` and :func:`optimize_for_inference` combine them; train_net.py,
:class:`~smca_d2.inference.LazyPredictor`, the tools and the benchmarks call
:func:`apply_speedups` with the config's ``train.speedups`` (configs/common/train.py).
``benchmarks/speed.py`` measures each against the plain model.
"""

import logging
from typing import Mapping, Optional

import torch
from torch import nn

from .channels_last import use_channels_last
from .dropout import use_fast_cpu_dropout
from .frozen_bn import fold_frozen_batchnorm, fuse_frozen_batchnorm
from .memory import keep_freed_cpu_memory
from .stem import use_fast_cpu_stem

__all__ = [
    "DEFAULT_SPEEDUPS",
    "apply_speedups",
    "fold_frozen_batchnorm",
    "fuse_frozen_batchnorm",
    "keep_freed_cpu_memory",
    "optimize_for_inference",
    "optimize_for_training",
    "use_channels_last",
    "use_fast_cpu_dropout",
    "use_fast_cpu_stem",
]

logger = logging.getLogger(__name__)

# ``train.speedups`` of configs/common/train.py.
DEFAULT_SPEEDUPS = {
    "fuse_frozen_bn": True,
    "fast_cpu_stem": True,
    "fast_cpu_dropout": True,
    "channels_last": False,
    "keep_freed_cpu_memory": True,
}


def _backbone(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


def optimize_for_training(
    model: nn.Module,
    *,
    fuse_frozen_bn: bool = True,
    fast_cpu_stem: bool = True,
    fast_cpu_dropout: bool = True,
    channels_last: bool = False,
) -> nn.Module:
    """Apply the speed-ups that keep training what it is (the same parameters, state-dict keys,
    outputs and gradients to float rounding; the CPU dropout masks are a different random stream
    of the same distribution) to ``model`` (its ``backbone`` for the backbone ones), in place.
    Those meant for the CPU check the device at run time and do nothing elsewhere."""
    backbone = _backbone(model)
    if channels_last:
        use_channels_last(backbone)
    if fuse_frozen_bn:
        fuse_frozen_batchnorm(backbone)
    if fast_cpu_stem:
        use_fast_cpu_stem(backbone)
    if fast_cpu_dropout:
        use_fast_cpu_dropout(model)
    return model


@torch.no_grad()
def optimize_for_inference(model: nn.Module, channels_last: Optional[bool] = None) -> nn.Module:
    """Fold the frozen batch norms of ``model.backbone`` (or of ``model``) into its convolutions
    and, by default on the CPU, use channels-last memory format for it. Returns ``model``
    (changed in place, eval mode); the model is for evaluation only from then on (see
    :func:`fold_frozen_batchnorm`)."""
    model.eval()
    backbone = _backbone(model)
    fold_frozen_batchnorm(backbone)
    use_fast_cpu_stem(backbone)
    if channels_last is None:
        param = next(backbone.parameters(), None)
        channels_last = param is not None and param.device.type == "cpu"
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    return model


def apply_speedups(model: nn.Module, options: Optional[Mapping] = None, *, device: str, training: bool) -> nn.Module:
    """The speed-ups of ``options`` (``train.speedups``; keys of :data:`DEFAULT_SPEEDUPS`, the
    missing ones at their defaults) for ``model`` trained or evaluated on ``device``: what
    train_net.py, LazyPredictor, the tools and the benchmarks call. Returns ``model``."""
    options = {**DEFAULT_SPEEDUPS, **dict(options or {})}
    unknown = sorted(set(options) - set(DEFAULT_SPEEDUPS))
    if unknown:
        raise ValueError(f"unknown train.speedups option(s) {unknown}; known: {sorted(DEFAULT_SPEEDUPS)}")
    keep_freed = options.pop("keep_freed_cpu_memory")
    if training:
        optimize_for_training(model, **options)
    else:
        optimize_for_inference(model)
    if keep_freed and torch.device(device).type == "cpu":
        keep_freed_cpu_memory()
    logger.debug("speed-ups for %s: %s", "training" if training else "inference", options)
    return model
