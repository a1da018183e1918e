"""Encoders: DETR's single-scale encoder, SMCA's intra-/multi-scale encoder and the official
code's depthwise-convolution multi-scale encoder.

An encoder is called as ``encoder(src, pos, key_padding_mask, level_shapes)`` on the levels'
tokens concatenated, finest level first, and returns the memory over the same tokens, or a
:class:`DecoderLevels` when the decoder is to attend to other levels than the encoder was given.
"""

import copy
from typing import List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.utils.registry import Registry

from .attention import split_padding_mask

SMCA_ENCODER_REGISTRY = Registry("SMCA_ENCODER")
SMCA_ENCODER_REGISTRY.__doc__ = "Transformer encoders of SMCA-DETR (called with keyword args)."


class DecoderLevels(NamedTuple):
    """An encoder's output when the decoder is to attend to other levels than the encoder's
    input: the memory over the decoder's levels, and for each of them the input level whose
    shape, stride, position encoding and padding mask it has (``source_levels``)."""

    memory: torch.Tensor
    source_levels: List[int]

    def gather(self, pos, key_padding_mask, level_shapes, level_strides):
        """``(memory, pos, key_padding_mask, level_shapes, level_strides)`` of the decoder's levels,
        from those of the encoder's input levels."""
        index = self.source_levels
        sizes = _level_sizes(level_shapes)
        pos_levels = pos.split(sizes, 1)
        masks = split_padding_mask(key_padding_mask, sizes)
        return (
            self.memory,
            torch.cat([pos_levels[i] for i in index], dim=1),
            None if key_padding_mask is None else torch.cat([masks[i] for i in index], dim=1),
            [tuple(level_shapes[i]) for i in index],
            [level_strides[i] for i in index],
        )


def _level_sizes(level_shapes) -> List[int]:
    return [h * w for h, w in level_shapes]


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
        return _post_norm_ffn(self, self.norm1(src + self.dropout1(src2)))


def _post_norm_ffn(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm2(x + FFN(x))`` with the FFN and norm of an encoder layer (DETR's, over tokens)."""
    return layer.norm2(x + layer.dropout2(layer.linear2(layer.dropout(F.relu(layer.linear1(x))))))


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

    def forward(self, src, pos, key_padding_mask, level_shapes: Sequence[Tuple[int, int]]):
        """
        Args:
            src, pos: [B, S, C]; key_padding_mask: bool [B, S], True on padded tokens, or
                None (no padding).
            level_shapes: (H, W) of each level (must be one level).
        """
        if len(level_shapes) != 1:
            raise ValueError(f"SingleScaleEncoder takes one feature level, got {len(level_shapes)}")
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

    def forward(self, src, pos, key_padding_mask, level_shapes: Sequence[Tuple[int, int]]):
        """Same arguments as :meth:`SingleScaleEncoder.forward`, with any number of levels."""
        level_sizes = _level_sizes(level_shapes)
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


def _depthwise(channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=channels)


class ConvEncoderLayer(nn.Module):
    """One layer of :class:`ConvMultiScaleEncoder`, on the levels as maps ([B, C, H_l, W_l]).

    For each level ``l``, with ``q_l = x_l + pos_l``::

        a_l = level_convs[l](input_conv(q_l))                 # 1x1 conv, then depthwise k x k
        m_l = a_l + up(a_{l+1}) + down(a_{l-1})               # exchange with the adjacent levels
        x_l = norm1(x_l + output_conv(m_l))                   # 1x1 conv, residual
        x_l = norm2(x_l + linear2(relu(linear1(x_l))))        # FFN

    where ``down`` is a stride-2 depthwise conv of the finer level and ``up`` a depthwise conv of
    the coarser level followed by bilinear upsampling (``align_corners=True``) to this level's
    size. The 1x1 convs, the FFN and the norms are shared by the levels; the exchange convs are
    shared by the level pairs (``shared_exchange``) or one per pair (``down_convs.i`` /
    ``up_convs.i`` link levels ``i`` and ``i + 1``). Padding is not masked: like the backbone's
    convolutions, these see the batch padding near an image's border.
    """

    def __init__(self, d_model, num_levels, dim_feedforward, dropout, kernel_size, shared_exchange):
        super().__init__()
        self.num_levels = num_levels
        self.shared_exchange = shared_exchange
        self.input_conv = nn.Conv2d(d_model, d_model, 1)
        self.level_convs = nn.ModuleList(_depthwise(d_model, kernel_size) for _ in range(num_levels))
        links = 1 if shared_exchange else num_levels - 1
        self.down_convs = nn.ModuleList(_depthwise(d_model, kernel_size, stride=2) for _ in range(links))
        self.up_convs = nn.ModuleList(_depthwise(d_model, kernel_size) for _ in range(links))
        self.output_conv = nn.Conv2d(d_model, d_model, 1)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def _link(self, convs: nn.ModuleList, finer_level: int) -> nn.Module:
        return convs[0] if self.shared_exchange else convs[finer_level]

    def forward(self, maps: List[torch.Tensor], pos: List[torch.Tensor]) -> List[torch.Tensor]:
        a = [conv(self.input_conv(x + p)) for conv, x, p in zip(self.level_convs, maps, pos)]
        mixed = []
        for level, a_l in enumerate(a):
            m = a_l
            if level + 1 < self.num_levels:
                up = self._link(self.up_convs, level)(a[level + 1])
                m = m + F.interpolate(up, size=a_l.shape[-2:], mode="bilinear", align_corners=True)
            if level > 0:
                m = m + self._link(self.down_convs, level - 1)(a[level - 1])
            mixed.append(m)
        out = []
        for x, m in zip(maps, mixed):
            b, c, h, w = x.shape
            t = (x + self.dropout1(self.output_conv(m))).flatten(2).transpose(1, 2)  # [B, HW, C]
            t = _post_norm_ffn(self, self.norm1(t))
            out.append(t.transpose(1, 2).reshape(b, c, h, w))
        return out


@SMCA_ENCODER_REGISTRY.register()
class ConvMultiScaleEncoder(nn.Module):
    """The encoder of the official code's "new multi-scale" SMCA (``Multi_scale_SMCA.zip`` in
    gaopengcuhk/SMCA-DETR; 44.4 AP for R50 at 50 epochs by its authors): ``num_layers``
    :class:`ConvEncoderLayer` over levels of strides 8/16/32/64, instead of self-attention.

    With ``fold_finest_level`` (the official model), the finest level's memory goes to the
    decoder through a 3x3 stride-2 conv (``fold_conv``), at the next level's resolution, with that
    level's position encoding, padding mask and stride: the decoder attends to levels of strides
    16, 16, 32, 64 and its Gaussian centers on the folded level are in stride-16 cells.

    Args:
        num_levels: input levels (4 in the official model).
        kernel_size: of the depthwise convs (7).
        shared_exchange: one down and one up conv shared by all pairs of adjacent levels (the
            44.4 AP R50 model), or one per pair (the authors' R101 run).
    """

    def __init__(
        self,
        *,
        num_layers=6,
        num_levels=4,
        d_model=256,
        dim_feedforward=1024,
        dropout=0.1,
        kernel_size=7,
        shared_exchange=True,
        fold_finest_level=True,
    ):
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"ConvMultiScaleEncoder needs at least 2 levels, got {num_levels}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (same-size convs), got {kernel_size}")
        self.num_levels = num_levels
        layer = ConvEncoderLayer(d_model, num_levels, dim_feedforward, dropout, kernel_size, shared_exchange)
        self.layers = _clones(layer, num_layers)
        self.fold_conv = nn.Conv2d(d_model, d_model, 3, stride=2, padding=1) if fold_finest_level else None

    def forward(self, src, pos, key_padding_mask, level_shapes: Sequence[Tuple[int, int]]):
        """Same arguments as :meth:`SingleScaleEncoder.forward`, with ``num_levels`` levels.

        Returns the memory over the input levels, or with ``fold_finest_level`` a
        :class:`DecoderLevels` whose first level is the folded finest level, at level 1's size."""
        level_shapes = [tuple(s) for s in level_shapes]
        if len(level_shapes) != self.num_levels:
            raise ValueError(f"encoder built for {self.num_levels} levels, got {len(level_shapes)}")
        for (h, w), shape in zip(level_shapes, level_shapes[1:]):
            if shape != ((h + 1) // 2, (w + 1) // 2):  # what a stride-2 conv of the finer level gives
                raise ValueError(
                    f"levels of shapes {level_shapes}: each level must have half the size of the one before "
                    "(rounded up), as the stride-2 exchange and folding convs produce"
                )
        sizes = _level_sizes(level_shapes)

        def to_maps(tokens):
            pieces = zip(tokens.split(sizes, 1), level_shapes)
            return [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w) for t, (h, w) in pieces]

        maps, pos_maps = to_maps(src), to_maps(pos)
        for layer in self.layers:
            maps = layer(maps, pos_maps)
        if self.fold_conv is None:
            return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
        folded = self.fold_conv(maps[0])
        memory = torch.cat([m.flatten(2).transpose(1, 2) for m in [folded] + maps[1:]], dim=1)
        return DecoderLevels(memory, [1] + list(range(1, self.num_levels)))
