"""Dropout with cheap random masks on the CPU.

On the CPU, torch draws a dropout mask one element at a time from its Mersenne Twister (and takes
the vectorized MKL path only on Intel processors), which makes dropout's random numbers about a
seventh of an R50 SMCA training step. Here the mask comes from 16-bit slices of NumPy's SFC64
generator instead (four mask elements per 64-bit draw, a tight C loop), seeded for every call
from torch's default generator, so that ``torch.manual_seed`` (and Detectron2's ``seed_all_rng``)
still make training reproducible.

The result is dropout in distribution: each element is kept independently with probability
``1 - t / 65536``, ``t = round(p * 65536)`` (within 8e-6 of ``1 - p``), and kept elements are
scaled by the inverse of that probability, so the expectation is exact. Only the random stream
differs from ``torch.nn.functional.dropout``. Other devices (CUDA draws its masks with a
vectorized Philox) use torch's dropout unchanged.

Modules that drop out (:class:`Dropout`, and in :mod:`smca_d2.modeling.attention` the
self-attention and the co-attention) carry a ``fast_cpu_dropout`` attribute; :func:`set_fast_cpu_dropout` sets it on a whole model.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16


def _threshold(p: float) -> int:
    return round(p * _LEVELS)


def _keep_scale(p: float):
    """The factor kept elements are multiplied by, ``1 / P(kept)``; None when ``p`` is 1."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, got {p}")
    t = _threshold(p)
    return None if t == _LEVELS else _LEVELS / (_LEVELS - t)


def drop_mask(shape, p: float) -> torch.Tensor:
    """A bool CPU tensor of ``shape``, each element True (dropped) with probability ``p`` (to
    2^-16). One int64 seed is drawn from torch's default CPU generator per call.
    """
    with torch.profiler.record_function("smca_d2::drop_mask"):
        n = math.prod(shape)
        seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
        if _keep_scale(p) is None:  # p == 1 (and p checked): everything dropped
            return torch.ones(shape, dtype=torch.bool)
        words = np.random.SFC64(seed).random_raw((n + 3) // 4)
        # Uniform uint16 read as int16 is uniform on [-32768, 32767]: P(s < t - 32768) = t / 65536.
        # NumPy compares int16 with SIMD, faster than torch's `<` on the CPU.
        drop = np.less(words.view(np.int16)[:n], np.int16(_threshold(p) - (_LEVELS >> 1)))
        return torch.from_numpy(drop).view(shape)


class _DropAndScale(torch.autograd.Function):
    """``x`` with the ``drop`` elements zeroed and the others multiplied by ``scale``; keeps only
    the bool mask for backward, like torch's dropout."""

    @staticmethod
    def forward(ctx, x, drop, scale):
        ctx.save_for_backward(drop)
        ctx.scale = scale
        # where() reads the bool mask faster than masked_fill (which also needs a copy first)
        return torch.where(drop, 0.0, x).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (drop,) = ctx.saved_tensors
        return torch.where(drop, 0.0, grad).mul_(ctx.scale), None, None


class _SoftmaxDropMatmul(torch.autograd.Function):
    """``dropout(softmax(logits)) @ v`` in one autograd node: ``(P with drop zeroed) @ v * scale``.

    Composed from separate ops, dropout costs three passes over the (largest) attention-weight
    tensor each way (copy, mask, scale); here the scale moves to the small ``[..., L, d]`` product
    and the backward masks its own fresh gradient in place: one pass each way. Saves what the
    composed ops save (P for the softmax, the dropped P and v for the product, the bool mask).
    Runs under autocast as the forward did (``custom_fwd``/``custom_bwd``).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, logits, v, drop, scale):
        p = logits.softmax(-1)
        p_dropped = torch.where(drop, 0.0, p)
        out = (p_dropped @ v).mul_(scale)
        ctx.save_for_backward(p, p_dropped, v, drop)
        ctx.scale, ctx.logits_dtype = scale, logits.dtype
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        p, p_dropped, v, drop = ctx.saved_tensors
        grad = grad * ctx.scale
        grad_p = (grad @ v.transpose(-2, -1)).to(p.dtype).masked_fill_(drop, 0)
        grad_logits = torch._softmax_backward_data(grad_p, p, -1, p.dtype).to(ctx.logits_dtype)
        grad_v = (p_dropped.transpose(-2, -1) @ grad).to(v.dtype)
        return grad_logits, grad_v, None, None


def uses_fast_dropout(x: torch.Tensor, p: float, training: bool, fast: bool = True) -> bool:
    """Whether :func:`dropout` takes the cheap-mask path for ``x``."""
    return fast and training and p > 0 and x.device.type == "cpu"


def dropout(x: torch.Tensor, p: float, training: bool = True, fast: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with the cheap CPU mask when ``fast`` (see the module doc)."""
    if not uses_fast_dropout(x, p, training, fast):
        return F.dropout(x, p, training)
    scale = _keep_scale(p)
    if scale is None:
        return x * 0.0
    return _DropAndScale.apply(x, drop_mask(x.shape, p), scale)


class Dropout(nn.Dropout):
    """:class:`torch.nn.Dropout` with the cheap CPU mask (``fast_cpu_dropout``, default True)."""

    fast_cpu_dropout = True

    def forward(self, x):
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training, self.fast_cpu_dropout)


def attention(q, k, v, bias=None, dropout_p: float = 0.0, fast: bool = True):
    """Scaled dot-product attention ``softmax(q k^T / sqrt(d) + bias) v`` over ``[..., L, d]``.

    ``F.scaled_dot_product_attention``, except when its dropout would draw a mask on the CPU:
    then the attention weights are computed explicitly (as SDPA's own CPU path with dropout does)
    and dropped out with the cheap mask, softmax, dropout and the product with ``v`` in one autograd
    node (:class:`_SoftmaxDropMatmul`). ``dropout_p`` > 0 means training.
    """
    if not uses_fast_dropout(q, dropout_p, True, fast):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    scale = _keep_scale(dropout_p)
    logits = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits.add_(bias)
    if scale is None:
        return logits.softmax(-1) * 0.0 @ v
    return _SoftmaxDropMatmul.apply(logits, v, drop_mask(logits.shape, dropout_p), scale)


def set_fast_cpu_dropout(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn the cheap CPU dropout mask on or off in every module of ``model`` that has one."""
    for module in model.modules():
        if hasattr(type(module), "fast_cpu_dropout"):
            module.fast_cpu_dropout = enabled
    return model
