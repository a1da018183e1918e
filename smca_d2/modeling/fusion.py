"""Speed-ups that keep a model's outputs (to float rounding).

* :func:`fuse_frozen_batchnorm` (training and inference) makes each Detectron2 ``Conv2d`` whose
  ``norm`` is a ``FrozenBatchNorm2d`` apply that affine map to its *weights* (``C_out`` numbers)
  instead of to its output (a full activation): ``conv(x, W * s, b * s + t)`` rather than
  ``conv(x, W, b) * s + t``. Parameters, buffers and checkpoints are unchanged and ``W`` is still
  what is trained (the gradient flows through ``W * s``); forward and backward each skip one pass
  over every backbone activation, and it computes strided 1x1 convolutions (ResNet's
  downsampling shortcuts) on the CPU as 1x1 convolutions of the subsampled input, which oneDNN
  runs much faster. :class:`SMCADETR` applies it to its backbone by default.
* :func:`use_fast_cpu_stem` makes a frozen ResNet stem (R50's, ``freeze_at >= 1``) run in
  channels-last memory format on the CPU and hand back a contiguous tensor: torch's CPU max pool
  is much slower on contiguous (NCHW) tensors than on channels-last ones, conversions included
  (benchmarks/speed.py measures the model). The pooled values are exactly the same.
  :class:`SMCADETR` applies it by default.

Inference only:

* :func:`fold_frozen_batchnorm` folds every frozen batch norm (``FrozenBatchNorm2d``, or a
  ``BatchNorm2d`` used with its running statistics) that follows a Detectron2 ``Conv2d`` (its
  ``norm``) into the convolution's weight and bias: one op instead of two per convolution, and one
  full-size activation less to write and read.
* :func:`optimize_for_inference` does that and, on the CPU, puts the backbone in channels-last
  memory format (oneDNN's preferred layout for convolutions).

Both change the model in place and are meant for a model that is only evaluated from then on:
the folded weights are different tensors (a checkpoint written afterwards no longer has the
``norm`` entries), and training a folded model would train ``w * s`` instead of ``w``.
"""
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling.backbone import BasicStem

__all__ = [
    "FastCPUStem",
    "FrozenBNConv2d",
    "fold_frozen_batchnorm",
    "fuse_frozen_batchnorm",
    "optimize_for_inference",
    "use_fast_cpu_stem",
]


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


class FastCPUStem(BasicStem):
    """Detectron2's ``BasicStem`` (conv, ReLU, 3x3 max pool) that, when frozen and given a
    contiguous CPU tensor, runs in channels-last memory format and returns a contiguous tensor.

    torch's CPU max pool is vectorized over channels only in channels-last format, where it is
    several times faster on the R50 stem output. Converting the 3-channel image is cheap, the convolution takes channels-last
    input as fast, and one copy brings the 4x smaller pooled map back. Same parameters and
    state-dict keys as ``BasicStem``. A stem with trainable parameters, channels-last input or
    weights (the ``channels_last`` backbone, :func:`optimize_for_inference`: the convolution
    already returns channels-last there) or another device takes ``BasicStem``'s path unchanged.
    """

    def forward(self, x):
        if (
            x.device.type != "cpu"
            or x.dim() != 4
            or not x.is_contiguous()
            or not self.conv1.weight.is_contiguous()
            or any(p.requires_grad for p in self.parameters())
        ):
            return super().forward(x)
        x = F.relu_(self.conv1(x.contiguous(memory_format=torch.channels_last)))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1).contiguous()


def use_fast_cpu_stem(module: nn.Module) -> int:
    """Turn every Detectron2 ``BasicStem`` in ``module`` into a :class:`FastCPUStem` (in place,
    nothing copied); returns how many."""
    changed = 0
    for stem in module.modules():
        if type(stem) is BasicStem:
            stem.__class__ = FastCPUStem
            changed += 1
    return changed


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
        weight, bias = _folded_weight_and_bias(conv, norm)
        conv.weight = nn.Parameter(weight.detach(), requires_grad=False)
        conv.bias = nn.Parameter(bias.detach(), requires_grad=False)
        conv.norm = None
        folded += 1
    return folded


def optimize_for_inference(model: nn.Module, channels_last: bool = None) -> nn.Module:
    """Fold frozen batch norms of ``model.backbone`` (or of ``model``) and, by default on the CPU,
    use channels-last memory format for it. Returns ``model`` (changed in place, eval mode)."""
    model.eval()
    backbone = getattr(model, "backbone", model)
    fold_frozen_batchnorm(backbone)
    if channels_last is None:
        param = next(backbone.parameters(), None)
        channels_last = param is not None and param.device.type == "cpu"
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    return model
