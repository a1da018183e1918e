"""Transformer encoders: DETR's single-scale encoder and SMCA's intra-/multi-scale encoder."""

import copy
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.utils.registry import Registry

from .attention import split_padding_mask

SMCA_ENCODER_REGISTRY = Registry("SMCA_ENCODER")
SMCA_ENCODER_REGISTRY.__doc__ = "Transformer encoders of SMCA-DETR (called with keyword args)."


class EncoderLayer(nn.Module):
    """Post-norm self-attention + FFN block of DETR (8 heads, FFN 2048, dropout 0.1, ReLU)."""

    def __init__(self, d_model=256, nhead=8, dim_feedforward=2048, dropout=0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src, pos, key_padding_mask):
        """
        Args:
            src, pos: [B, S, C]
            key_padding_mask: bool [B, S], True on padded tokens, or None (no padding).
        """
        q = k = src + pos
        src2 = self.self_attn(q, k, src, key_padding_mask=key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


def _clones(module, n):
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


@SMCA_ENCODER_REGISTRY.register()
class SingleScaleEncoder(nn.Module):
    """DETR's encoder: ``num_layers`` self-attention layers over the tokens of one level (0: none,
    the decoder attends to the projected backbone features; the CPU demo's choice)."""

    def __init__(self, *, num_layers=6, d_model=256, nhead=8, dim_feedforward=2048, dropout=0.1):
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        self.layers = _clones(EncoderLayer(d_model, nhead, dim_feedforward, dropout), num_layers)

    def forward(self, src, pos, key_padding_mask, level_sizes: Sequence[int]):
        """
        Args:
            src, pos: [B, S, C]; key_padding_mask: bool [B, S], True on padded tokens, or
                None (no padding).
            level_sizes: token count of each level (must be one level).
        """
        if len(level_sizes) != 1:
            raise ValueError(f"SingleScaleEncoder takes one feature level, got {len(level_sizes)}")
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return src


@SMCA_ENCODER_REGISTRY.register()
class MultiScaleEncoder(nn.Module):
    """SMCA's multi-scale encoder: a sequence of intra-scale and multi-scale self-attention blocks.

    An ``"intra"`` block lets each level's tokens attend only to tokens of the same level. A
    ``"multi"`` block lets all levels' tokens attend jointly. The paper's order is intra, intra,
    multi, intra, intra.

    Args:
        intra_attention: "shared" (default): an intra block is one layer applied to each level
            in turn, so its weights are shared by the levels; "per_level": one layer per level
            (``num_levels`` of them in each intra block). The paper does not say which; its
            model size (about 40M parameters for R50) is that of shared weights.
        num_levels: levels of the input; needed for "per_level".
    """

    BLOCK_TYPES = ("intra", "multi")
    INTRA_ATTENTION = ("shared", "per_level")

    def __init__(
        self,
        *,
        block_types: Sequence[str] = ("intra", "intra", "multi", "intra", "intra"),
        d_model=256,
        nhead=8,
        dim_feedforward=2048,
        dropout=0.1,
        intra_attention="shared",
        num_levels=None,
    ):
        super().__init__()
        unknown = [t for t in block_types if t not in self.BLOCK_TYPES]
        if unknown or not block_types:
            raise ValueError(f"block_types must be a non-empty list of {self.BLOCK_TYPES}, got {list(block_types)}")
        if intra_attention not in self.INTRA_ATTENTION:
            raise ValueError(f"intra_attention must be one of {self.INTRA_ATTENTION}, got {intra_attention!r}")
        if intra_attention == "per_level" and not (isinstance(num_levels, int) and num_levels >= 1):
            raise ValueError(f"intra_attention='per_level' needs num_levels >= 1, got {num_levels!r}")
        self.block_types = list(block_types)
        self.intra_attention = intra_attention
        self.num_levels = num_levels
        layer = EncoderLayer(d_model, nhead, dim_feedforward, dropout)
        per_level = intra_attention == "per_level"
        self.layers = nn.ModuleList(
            _clones(layer, num_levels) if per_level and t == "intra" else copy.deepcopy(layer) for t in block_types
        )

    def forward(self, src, pos, key_padding_mask, level_sizes: Sequence[int]):
        """Same arguments as :meth:`SingleScaleEncoder.forward`, with any number of levels."""
        level_sizes = list(level_sizes)
        if self.intra_attention == "per_level" and len(level_sizes) != self.num_levels:
            raise ValueError(f"encoder built for {self.num_levels} levels, got {len(level_sizes)}")
        for block_type, layer in zip(self.block_types, self.layers):
            if block_type == "multi":
                src = layer(src, pos, key_padding_mask)
                continue
            # One layer per level, or the shared layer repeated.
            level_layers = layer if isinstance(layer, nn.ModuleList) else [layer] * len(level_sizes)
            if len(level_sizes) == 1:
                src = level_layers[0](src, pos, key_padding_mask)
                continue
            masks = split_padding_mask(key_padding_mask, level_sizes)
            pieces = zip(level_layers, src.split(level_sizes, 1), pos.split(level_sizes, 1), masks)
            outputs: List[torch.Tensor] = [level_layer(s, p, m) for level_layer, s, p, m in pieces]
            src = torch.cat(outputs, dim=1)
        return src
