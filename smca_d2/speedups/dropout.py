"""Dropout with cheap random masks on the CPU.

On the CPU, torch draws a dropout mask one element at a time from its Mersenne Twister (and takes
the vectorized MKL path only on Intel processors), which makes dropout's random numbers a
sizeable part of an R50 SMCA training step (the speed benchmark measures it). Here the mask comes from 16-bit slices of NumPy's SFC64
generator instead (four mask elements per 64-bit draw, a tight C loop), seeded for every call
from torch's default generator, so that ``torch.manual_seed`` (and Detectron2's ``seed_all_rng``)
still make training reproducible.

The result is dropout in distribution: each element is kept independently with probability
``1 - t / 65536``, ``t = round(p * 65536)`` (within 8e-6 of ``1 - p``), and kept elements are
scaled by the inverse of that probability, so the expectation is exact. Only the random stream
differs from ``torch.nn.functional.dropout``. Other devices (CUDA draws its masks with a
vectorized Philox) use torch's dropout unchanged.

The model itself uses torch's modules (``nn.Dropout``, ``nn.MultiheadAttention``) and
:class:`~smca_d2.modeling.attention.SpatiallyModulatedCoAttention`, whose ``attend`` is
``F.scaled_dot_product_attention``. :func:`use_fast_cpu_dropout` turns those of a built model into
the subclasses below (same parameters, state-dict keys and eval-mode results), which take the
cheap mask only in training on the CPU with ``p > 0``, and torch's own path otherwise.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smca_d2.modeling.attention import SpatiallyModulatedCoAttention, padding_bias

__all__ = [
    "FastCPUDropout",
    "FastDropoutCoAttention",
    "FastDropoutMultiheadAttention",
    "attention",
    "drop_mask",
    "dropout",
    "use_fast_cpu_dropout",
]

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


def uses_fast_dropout(x: torch.Tensor, p: float, training: bool) -> bool:
    """Whether :func:`dropout` takes the cheap-mask path for ``x``."""
    return training and p > 0 and x.device.type == "cpu"


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with the cheap CPU mask (see the module doc)."""
    if not uses_fast_dropout(x, p, training):
        return F.dropout(x, p, training)
    scale = _keep_scale(p)
    if scale is None:
        return x * 0.0
    return _DropAndScale.apply(x, drop_mask(x.shape, p), scale)


def attention(q, k, v, bias=None, dropout_p: float = 0.0):
    """Scaled dot-product attention ``softmax(q k^T / sqrt(d) + bias) v`` over ``[..., L, d]``.

    ``F.scaled_dot_product_attention``, except when its dropout would draw a mask on the CPU:
    then the attention weights are computed explicitly (as SDPA's own CPU path with dropout does)
    and dropped out with the cheap mask, softmax, dropout and the product with ``v`` in one autograd
    node (:class:`_SoftmaxDropMatmul`). ``dropout_p`` > 0 means training.
    """
    if not uses_fast_dropout(q, dropout_p, True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    scale = _keep_scale(dropout_p)
    logits = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits.add_(bias)
    if scale is None:
        return logits.softmax(-1) * 0.0 @ v
    return _SoftmaxDropMatmul.apply(logits, v, drop_mask(logits.shape, dropout_p), scale)


class FastCPUDropout(nn.Dropout):
    """:class:`torch.nn.Dropout` with the cheap CPU mask in training."""

    def forward(self, x):
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)


class FastDropoutCoAttention(SpatiallyModulatedCoAttention):
    """The co-attention with its attention-weight dropout drawing the cheap CPU mask."""

    def attend(self, q, k, v, bias, dropout_p):
        return attention(q, k, v, bias, dropout_p)


class FastDropoutMultiheadAttention(nn.MultiheadAttention):
    """:class:`torch.nn.MultiheadAttention` whose attention-weight dropout draws the cheap CPU
    mask in training.

    The cheap path supports what SMCA's encoder and decoder use: ``batch_first``, no
    ``attn_mask``, a bool ``key_padding_mask`` or none, ``need_weights=False``; anything else goes
    to the parent class.
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, **kwargs):
        fast = (
            self.batch_first
            and not need_weights
            and attn_mask is None
            and (key_padding_mask is None or key_padding_mask.dtype == torch.bool)
            and not kwargs
            and self._qkv_same_embed_dim
            and self.in_proj_bias is not None
            and self.bias_k is None
            and uses_fast_dropout(query, self.dropout, self.training)
        )
        if not fast:
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                **kwargs,
            )
        return self._project_and_attend(query, key, value, key_padding_mask, self.dropout), None

    def _project_and_attend(self, query, key, value, key_padding_mask, dropout_p):
        c, h = self.embed_dim, self.num_heads
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key:  # self-attention with positions: one product for q and k
            q, k = F.linear(query, w[: 2 * c], b[: 2 * c]).chunk(2, dim=-1)
        else:
            q, k = F.linear(query, w[:c], b[:c]), F.linear(key, w[c : 2 * c], b[c : 2 * c])
        v = F.linear(value, w[2 * c :], b[2 * c :])

        def heads(x):
            return x.unflatten(-1, (h, c // h)).transpose(1, 2)

        bias = None if key_padding_mask is None else padding_bias(key_padding_mask, 1)
        out = attention(heads(q), heads(k), heads(v), bias, dropout_p)
        return self.out_proj(out.transpose(1, 2).flatten(2))


_FAST_CLASSES = {
    nn.Dropout: FastCPUDropout,
    nn.MultiheadAttention: FastDropoutMultiheadAttention,
    SpatiallyModulatedCoAttention: FastDropoutCoAttention,
}


def use_fast_cpu_dropout(model: nn.Module) -> int:
    """Turn every ``nn.Dropout``, ``nn.MultiheadAttention`` and co-attention of ``model`` (exactly
    those classes, not subclasses) into its cheap-CPU-mask subclass, in place (nothing copied:
    same parameters and state-dict keys); returns how many."""
    changed = 0
    for module in model.modules():
        fast = _FAST_CLASSES.get(type(module))
        if fast is not None:
            module.__class__ = fast
            changed += 1
    return changed
