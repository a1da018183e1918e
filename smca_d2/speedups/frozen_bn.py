"""Frozen batch norms applied to the convolution weights instead of to the activations.

* :func:`fuse_frozen_batchnorm` (training and inference) makes each Detectron2 ``Conv2d`` whose
  ``norm`` is a ``FrozenBatchNorm2d`` apply that affine map to its *weights* (``C_out`` numbers)
  instead of to its output (a full activation): ``conv(x, W * s, b * s + t)`` rather than
  ``conv(x, W, b) * s + t``. Parameters, buffers and checkpoints are unchanged and ``W`` is still
  what is trained (the gradient flows through ``W * s``): forward and backward each skip one pass
  over every backbone activation. Both kinds of convolution also compute strided 1x1
  convolutions (ResNet's downsampling shortcuts) on the CPU as 1x1 convolutions of the subsampled
  input (:func:`conv2d_cpu`), for which oneDNN has much faster kernels.
* :func:`fold_frozen_batchnorm` (inference only) folds every frozen batch norm
  (``FrozenBatchNorm2d``, or a ``BatchNorm2d`` used with its running statistics) that follows a
  Detectron2 ``Conv2d`` (its ``norm``) into the convolution's weight and bias with
  :func:`torch.nn.utils.fusion.fuse_conv_bn_weights`. The model changes in place and is meant to
  be evaluated only from then on: a checkpoint written afterwards no longer has the ``norm``
  entries, and training it would train ``W * s`` instead of ``W``.

``fuse_conv_bn_weights`` returns new leaf parameters (the gradient does not reach ``W``), so the
training-time fusion computes the same product itself, differentiably.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from detectron2.layers import Conv2d, FrozenBatchNorm2d

__all__ = ["FrozenBNConv2d", "conv2d_cpu", "fold_frozen_batchnorm", "fuse_frozen_batchnorm"]


def _folded_weight_and_bias(conv: Conv2d, norm: nn.Module):
    """``(W * s, (b - mean) * s + beta)`` with ``s = gamma / sqrt(var + eps)``: the weight and bias
    of one convolution computing ``norm(conv(x))`` with ``norm``'s running statistics. Differentiable
    in ``conv``'s parameters."""
    gamma = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
    beta = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_var)
    scale = gamma * (norm.running_var + norm.eps).rsqrt()
    bias = beta - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale.reshape(-1, 1, 1, 1), bias


def conv2d_cpu(x, weight, bias, stride, padding, dilation, groups):
    """``F.conv2d``, with a strided 1x1 convolution (no padding) on the CPU computed as a 1x1
    convolution of the subsampled input: the same products, and oneDNN's strided 1x1 kernels are
    slow, most of all backward."""
    if (
        x.device.type == "cpu"
        and weight.shape[-2:] == (1, 1)
        and tuple(padding) == (0, 0)
        and tuple(stride) != (1, 1)
        and x.dim() == 4
    ):
        x = x[:, :, :: stride[0], :: stride[1]]
        stride = (1, 1)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class FrozenBNConv2d(Conv2d):
    """A Detectron2 ``Conv2d`` that applies its ``FrozenBatchNorm2d`` to its weight and bias.

    Same parameters, buffers and state-dict keys as ``Conv2d``; same outputs to float rounding.
    Without a norm (e.g. after :func:`fold_frozen_batchnorm`) it is a ``Conv2d`` too; both ways,
    a strided 1x1 convolution on the CPU subsamples its input instead (:func:`conv2d_cpu`). With
    another ``norm`` it is Detectron2's ``Conv2d``.
    """

    def forward(self, x):
        if isinstance(self.norm, FrozenBatchNorm2d):
            weight, bias = _folded_weight_and_bias(self, self.norm)
        elif self.norm is None:
            weight, bias = self.weight, self.bias
        else:
            return super().forward(x)
        x = conv2d_cpu(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if self.activation is not None:
            x = self.activation(x)
        return x


def fuse_frozen_batchnorm(module: nn.Module) -> int:
    """Turn every Detectron2 ``Conv2d`` in ``module`` whose ``norm`` is a ``FrozenBatchNorm2d``
    into a :class:`FrozenBNConv2d` (in place, nothing copied); returns how many.

    Unlike :func:`fold_frozen_batchnorm` this is for training too: the weights stay as they are.
    """
    fused = 0
    for conv in module.modules():
        if type(conv) is Conv2d and isinstance(conv.norm, FrozenBatchNorm2d):
            conv.__class__ = FrozenBNConv2d
            fused += 1
    return fused


@torch.no_grad()
def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Fold each ``conv.norm`` that is a frozen batch norm into ``conv``; returns how many.

    The folded parameters do not require gradients (the result is for inference).

    ``y = (conv(x) - mean) / sqrt(var + eps) * gamma + beta`` becomes ``conv'(x)`` with
    ``W' = W * s`` and ``b' = (b - mean) * s + beta`` where ``s = gamma / sqrt(var + eps)``.
    """
    folded = 0
    for conv in module.modules():
        norm = getattr(conv, "norm", None)
        if not isinstance(conv, Conv2d):
            continue
        if isinstance(norm, nn.BatchNorm2d) and type(norm) is not nn.BatchNorm2d:
            continue  # SyncBatchNorm & co.: leave alone
        if isinstance(norm, nn.BatchNorm2d) and norm.running_mean is None:
            continue  # batch statistics even at inference: nothing to fold
        if not isinstance(norm, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            continue
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
        )
        conv.weight = nn.Parameter(weight.detach(), requires_grad=False)
        conv.bias = nn.Parameter(bias.detach(), requires_grad=False)
        conv.norm = None
        folded += 1
    return folded
