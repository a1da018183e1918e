"""Spatially modulated co-attention: multi-head cross-attention plus a log-Gaussian spatial prior.

For query q, head h and feature cell (i, j) of a level, SMCA adds

    log G = -D / beta,   D = sx^2 (j - cx)^2 + sy^2 (i - cy)^2      ("independent" scales)

to the attention logits before the softmax, where (cx, cy) is the head's predicted center in
feature cells of that level. The bias is built once per layer and level, directly in the
``[B, heads, Q, H*W]`` layout that attention consumes, in float32, and passed to
``F.scaled_dot_product_attention`` as its additive mask: the co-attention is plain PyTorch, to be
read and changed like the paper's equations. (:mod:`smca_d2.speedups.dropout` can swap in an
``attend`` with cheaper CPU dropout masks for training; the model does not depend on it.)
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

SCALE_TYPES = ("fixed", "single", "independent")


def scale_channels(scale_type: str) -> int:
    """Number of scale values predicted per head: 0 (fixed), 1 (single) or 2 (independent x/y)."""
    if scale_type not in SCALE_TYPES:
        raise ValueError(f"scale_type must be one of {SCALE_TYPES}, got {scale_type!r}")
    return SCALE_TYPES.index(scale_type)


def gaussian_log_weights(
    centers: torch.Tensor,
    scales: Optional[torch.Tensor],
    feature_shape: tuple,
    beta: float,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Log of SMCA's Gaussian weight map (the attention bias), with padded keys set to -inf.

    Args:
        centers: [B, heads, Q, 2] per-head centers (x = column, y = row) in feature cells.
        scales: None for fixed scales (all ones); [B, heads, Q, 1] for one scale per head; or
            [B, heads, Q, 2] for independent x/y scales. These are the already squared values.
        feature_shape: (H, W) of the (padded) feature map.
        beta: the bandwidth; ``log G = -D / beta``.
        key_padding_mask: bool [B, H*W], True on padded cells, or None (no padding).

    Returns:
        float32 [B, heads, Q, H*W], cells flattened row-major like ``x.flatten(2)``.
    """
    h, w = feature_shape
    centers = centers.float()
    cols = torch.arange(w, device=centers.device, dtype=torch.float32)
    rows = torch.arange(h, device=centers.device, dtype=torch.float32)
    dx2 = (cols - centers[..., 0:1]).square()  # [B, heads, Q, W]
    dy2 = (rows - centers[..., 1:2]).square()  # [B, heads, Q, H]
    if scales is not None:
        scales = scales.float()
        dx2 = dx2 * scales[..., 0:1]
        dy2 = dy2 * scales[..., -1:]
    # Separable: -D[i, j] / beta = -dy2[i] / beta - dx2[j] / beta, so the only full-size tensor
    # (forward and backward) is the sum itself; with beta a power of two (8) the scaling is exact.
    # Padding is set in [..., H, W] out of place: writing into the flattened view in place would
    # make autograd copy the whole bias again in backward (CopySlices: strided full-size copies).
    bias = (dy2 * (-1.0 / beta)).unsqueeze(-1) + (dx2 * (-1.0 / beta)).unsqueeze(-2)
    if key_padding_mask is not None:
        bias = torch.where(key_padding_mask.reshape(-1, 1, 1, h, w), float("-inf"), bias)
    return bias.flatten(-2)


def split_padding_mask(key_padding_mask: Optional[torch.Tensor], level_sizes: List[int]) -> list:
    """Per-level key padding masks, ``key_padding_mask.split(level_sizes, 1)``; Nones for None."""
    if key_padding_mask is None:
        return [None] * len(level_sizes)
    return list(key_padding_mask.split(level_sizes, 1))


def padding_bias(key_padding_mask: Optional[torch.Tensor], num_queries: int) -> Optional[torch.Tensor]:
    """Attention bias with only the key padding (no spatial prior): [B, 1, Q, HW] float32, or
    None for no padding (None)."""
    if key_padding_mask is None:
        return None
    bias = torch.zeros(
        key_padding_mask.shape[0],
        1,
        num_queries,
        key_padding_mask.shape[1],
        device=key_padding_mask.device,
    )
    return bias.masked_fill_(key_padding_mask[:, None, None, :], float("-inf"))


class SpatiallyModulatedCoAttention(nn.Module):
    """Multi-head cross-attention over one or several feature levels with an additive bias.

    Parameters are named like :class:`torch.nn.MultiheadAttention` (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``) so that checkpoints of the official code load unchanged.

    With several levels, attention is computed within each level (its own softmax) and the
    per-level outputs are mixed with per-query weights (SMCA's scale-selection attention).
    Logits, bias and softmax are computed in float32 even under autocast: the log-Gaussian bias
    spans tens of units and bfloat16 / float16 would round its fine differences away.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def attend(self, q, k, v, bias, dropout_p: float) -> torch.Tensor:
        """``softmax(q k^T / sqrt(d) + bias) v`` with attention-weight dropout, over ``[B, heads, L, d]``."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        biases: List[torch.Tensor],
        level_sizes: List[int],
        level_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: [B, Q, C] (content + query position).
            key: [B, S, C] (memory + position), the levels' tokens concatenated.
            value: [B, S, C] (memory).
            biases: one float32 bias per level, [B, heads or 1, Q, S_l] (log-Gaussian and -inf on
                padded keys), with ``sum(S_l) == S``; None for a level with neither (no
                modulation, no padding).
            level_sizes: S_l of each level.
            level_weights: [B, Q, L] softmax weights over levels, or None for equal weights
                (the mean of the levels' outputs) when L > 1.

        Returns:
            [B, Q, C]
        """
        c = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        q = self._heads(F.linear(query, w[:c], b[:c]))
        k = self._heads(F.linear(key, w[c : 2 * c], b[c : 2 * c]))
        v = self._heads(F.linear(value, w[2 * c :], b[2 * c :]))
        dropout_p = self.dropout if self.training else 0.0
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, k, v = q.float(), k.float(), v.float()
            if len(level_sizes) == 1:
                out = self.attend(q, k, v, biases[0], dropout_p)
            else:
                out = 0
                ks, vs = k.split(level_sizes, dim=2), v.split(level_sizes, dim=2)
                for level, (k_l, v_l, bias) in enumerate(zip(ks, vs, biases)):
                    out_l = self.attend(q, k_l, v_l, bias, dropout_p)
                    if level_weights is None:
                        out = out + out_l / len(level_sizes)
                    else:
                        out = out + out_l * level_weights[:, None, :, level, None].float()
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        return self.out_proj(out)
