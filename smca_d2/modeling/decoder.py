"""SMCA's decoder: DETR decoder layers whose cross-attention is spatially modulated."""

from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.utils.registry import Registry

from .attention import (
    SpatiallyModulatedCoAttention,
    gaussian_log_weights,
    padding_bias,
    scale_channels,
    split_padding_mask,
)

if TYPE_CHECKING:  # modeling.denoising imports this module
    from .denoising import DenoisingBatch

SMCA_DECODER_REGISTRY = Registry("SMCA_DECODER")
SMCA_DECODER_REGISTRY.__doc__ = "Transformer decoders of SMCA-DETR (called with keyword args)."


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DecoderLayer(nn.Module):
    """Self-attention, spatially modulated co-attention, FFN; each with residual + post-norm.

    The modulation is predicted from ``modulation_norm(tgt + query_pos)``: the queries' shared
    center by ``center_head`` (an MLP, first layer only), each head's center offset by
    ``offset_head`` and its Gaussian scales by ``scale_head``; with several levels,
    ``scale_selection`` weighs the levels' attention outputs. (The official code calls these
    ``norm4``, ``point1``, ``point2`` and ``point3``, and the co-attention ``multihead_attn``;
    :mod:`smca_d2.checkpoint.official` maps the names.)

    Args:
        predict_center: this layer predicts the queries' shared center (the first layer).
        num_levels: feature levels attended to.
        scale_type: "fixed", "single" or "independent" (x/y) Gaussian scales per head.
        modulate: False turns the spatial prior off (a plain DETR-style co-attention).
        head_shared: one offset and one set of scales for all heads, i.e. one Gaussian map per
            query and level shared by the heads (the paper's "head-shared" ablation), instead
            of one per head.
        scale_selection: with several levels, weigh the levels' attention outputs per query
            (SMCA's scale-selection attention); False averages them with equal weights.
    """

    def __init__(
        self,
        *,
        d_model=256,
        nhead=8,
        dim_feedforward=2048,
        dropout=0.1,
        predict_center=False,
        num_levels=1,
        scale_type="independent",
        modulate=True,
        head_shared=False,
        scale_selection=True,
    ):
        super().__init__()
        self.nhead = nhead
        self.num_levels = num_levels
        self.modulate = modulate
        self.head_shared = head_shared
        maps = 1 if head_shared else nhead  # Gaussian maps per query and level
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = SpatiallyModulatedCoAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

        self.num_scales = scale_channels(scale_type)
        self.center_head = MLP(d_model, d_model, 2, 3) if predict_center else None
        self.offset_head = nn.Linear(d_model, num_levels * maps * 2) if modulate else None
        self.scale_head = (
            nn.Linear(d_model, num_levels * maps * self.num_scales) if modulate and self.num_scales else None
        )
        self.scale_selection = nn.Linear(d_model, num_levels) if num_levels > 1 and scale_selection else None
        uses_modulation_norm = predict_center or modulate or self.scale_selection is not None
        self.modulation_norm = nn.LayerNorm(d_model) if uses_modulation_norm else None

    def reset_scale_parameters(self):
        """Scales start at 1: weight 0, bias 1 (their squares are used)."""
        if self.scale_head is not None:
            nn.init.zeros_(self.scale_head.weight)
            nn.init.ones_(self.scale_head.bias)

    def _attention_biases(self, out, ref, key_padding_masks, level_shapes, level_strides, image_wh, betas):
        if not self.modulate:
            return [padding_bias(m, ref.shape[1]) for m in key_padding_masks]
        b, q = out.shape[:2]
        maps = 1 if self.head_shared else self.nhead  # a bias of 1 "head" is broadcast to all
        offsets = self.offset_head(out).view(b, q, self.num_levels, maps, 2)
        scales = None
        if self.scale_head is not None:
            scales = self.scale_head(out).square().view(b, q, self.num_levels, maps, self.num_scales)
        biases = []
        levels = zip(level_shapes, level_strides, key_padding_masks, betas)
        for level, (shape, stride, mask, beta) in enumerate(levels):
            # Shared center, in this level's feature cells, plus each head's offset.
            center = (ref * image_wh[:, None, :] / stride)[:, :, None, :] + offsets[:, :, level]
            level_scales = None if scales is None else scales[:, :, level].transpose(1, 2)
            biases.append(gaussian_log_weights(center.transpose(1, 2), level_scales, shape, beta, mask))
        return biases

    def forward(
        self,
        tgt,
        memory,
        memory_with_pos,
        query_pos,
        key_padding_masks: Sequence[Optional[torch.Tensor]],
        level_shapes: Sequence[Tuple[int, int]],
        level_strides: Sequence[int],
        image_wh,
        betas: Sequence[float],
        ref: Optional[torch.Tensor] = None,
        self_attn_mask: Optional[torch.Tensor] = None,
        given_ref_logit: Optional[torch.Tensor] = None,
    ):
        """
        Args:
            tgt, query_pos: [B, Q, C]
            memory, memory_with_pos: [B, S, C], levels concatenated.
            key_padding_masks: per level, bool [B, H_l * W_l] (True on padded cells) or None.
            level_shapes, level_strides: per level (H_l, W_l) and stride in pixels.
            image_wh: float [B, 2], unpadded (width, height) of each image.
            betas: per level, the Gaussian bandwidth.
            ref: [B, Q, 2] normalized centers from the first layer (None in the first layer).
            self_attn_mask: bool [B * nhead, Q, Q], True where a query may not attend to a key
                (denoising queries in training), or None.
            given_ref_logit: [B, D, 2] the center logits of the last D queries (denoising
                queries), used by the first layer instead of its center head's; or None.

        Returns:
            (tgt [B, Q, C], ref_logit [B, Q, 2] or None, ref [B, Q, 2])
        """
        out = self.modulation_norm(tgt + query_pos) if self.modulation_norm is not None else None
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(tgt2))

        ref_logit = None
        if self.center_head is not None:
            # In float32 under autocast too: the center places the Gaussian and, through the
            # reference logit, the predicted box (see SMCADETR.forward_outputs).
            predicted = out if given_ref_logit is None else out[:, : out.shape[1] - given_ref_logit.shape[1]]
            with torch.autocast(device_type=out.device.type, enabled=False):
                ref_logit = self.center_head(predicted.float())
            if given_ref_logit is not None:
                ref_logit = torch.cat([ref_logit, given_ref_logit.float()], dim=1)
            ref = ref_logit.sigmoid()
        biases = self._attention_biases(out, ref, key_padding_masks, level_shapes, level_strides, image_wh, betas)
        level_weights = self.scale_selection(out).softmax(-1) if self.scale_selection is not None else None
        tgt2 = self.cross_attn(
            tgt + query_pos,
            memory_with_pos,
            memory,
            biases,
            [h * w for h, w in level_shapes],
            level_weights,
        )
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        tgt = self.norm3(tgt + self.dropout3(tgt2))
        return tgt, ref_logit, ref


@SMCA_DECODER_REGISTRY.register()
class SMCADecoder(nn.Module):
    """``num_layers`` SMCA decoder layers; every layer's output goes through one shared LayerNorm.

    The first layer predicts each query's center (normalized x, y, from an MLP on the query);
    later layers reuse it: there is no refinement across layers, as in the paper.

    Args:
        beta: Gaussian bandwidth, ``log G = -D / beta`` (8 in the paper): one value for every
            level, or one per level (finest first).
        modulate: False gives the DETR-style baseline (same model, no Gaussian prior).
        head_shared, scale_selection: see :class:`DecoderLayer`.
    """

    def __init__(
        self,
        *,
        num_layers=6,
        d_model=256,
        nhead=8,
        dim_feedforward=2048,
        dropout=0.1,
        num_levels=1,
        scale_type="independent",
        beta: Union[float, Sequence[float]] = 8.0,
        modulate=True,
        head_shared=False,
        scale_selection=True,
    ):
        super().__init__()
        betas = [beta] * num_levels if isinstance(beta, (int, float)) else list(beta)
        if len(betas) != num_levels or not all(isinstance(b, (int, float)) and b > 0 for b in betas):
            raise ValueError(
                f"beta must be a positive number or {num_levels} positive numbers (one per level), got {beta}"
            )
        self.betas = [float(b) for b in betas]
        self.num_levels = num_levels
        self.layers = nn.ModuleList(
            DecoderLayer(
                d_model=d_model,
                nhead=nhead,
                dim_feedforward=dim_feedforward,
                dropout=dropout,
                predict_center=(i == 0),
                num_levels=num_levels,
                scale_type=scale_type,
                modulate=modulate,
                head_shared=head_shared,
                scale_selection=scale_selection,
            )
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        memory,
        pos,
        query_pos,
        key_padding_mask,
        level_shapes: List[Tuple[int, int]],
        level_strides: List[int],
        image_wh,
        denoising: Optional["DenoisingBatch"] = None,
    ):
        """
        Args:
            memory, pos: [B, S, C] encoder output and its position encoding (levels concatenated).
            query_pos: [B, Q, C] learned query embeddings.
            key_padding_mask: bool [B, S], True on padded cells, or None (no padding).
            level_shapes, level_strides: per level (H_l, W_l) and stride.
            image_wh: float [B, 2] unpadded image (width, height).
            denoising: training only, a :class:`~smca_d2.modeling.denoising.DenoisingBatch`
                whose D queries follow the Q object queries; or None.

        Returns:
            hs: [num_layers, B, Q (+ D), C] normalized outputs of every layer.
            ref_logit: [B, Q (+ D), 2] the centers' logits (inverse sigmoid of normalized x, y).
        """
        if len(level_shapes) != self.num_levels:
            raise ValueError(f"decoder built for {self.num_levels} levels, got {len(level_shapes)}")
        masks = split_padding_mask(key_padding_mask, [h * w for h, w in level_shapes])
        memory_with_pos = memory + pos
        tgt = torch.zeros_like(query_pos)
        self_attn_mask = given_ref_logit = None
        if denoising is not None:
            query_pos = torch.cat([query_pos, denoising.pos.to(query_pos.dtype)], dim=1)
            tgt = torch.cat([tgt, denoising.content.to(tgt.dtype)], dim=1)
            self_attn_mask = denoising.self_attn_mask.repeat_interleave(self.layers[0].nhead, dim=0)
            given_ref_logit = denoising.ref_logit
        ref = ref_logit = None
        hs = []
        for layer in self.layers:
            tgt, layer_ref_logit, ref = layer(
                tgt,
                memory,
                memory_with_pos,
                query_pos,
                masks,
                level_shapes,
                level_strides,
                image_wh,
                self.betas,
                ref,
                self_attn_mask,
                given_ref_logit,
            )
            if layer_ref_logit is not None:
                ref_logit = layer_ref_logit
            hs.append(self.norm(tgt))
        return torch.stack(hs), ref_logit
