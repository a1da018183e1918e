"""Pictures of what SMCA does: per-query Gaussian weight maps and co-attention maps.

For a decoder layer (the last by default) and chosen queries (default: the top-k scoring ones),
:func:`compute_smca_maps` returns, per feature level,

* the **Gaussian weight map**: ``exp(log G)``, the spatial prior added (in log space) to the
  co-attention logits, averaged over the heads;
* the **co-attention map**: ``softmax(q k^T / sqrt(d) + log G)`` over the level's cells,
  averaged over the heads (with several levels: each level's own softmax, as in the model; the
  scale-selection weights are reported alongside);

mapped back to the pixels of the original image, with the predicted boxes and centers.
:func:`save_smca_maps` draws them over the image (matplotlib, Agg; one PNG per query).

Nothing in the model is modified. :func:`capture_decoder_layer` records, during one forward
pass, (1) the arguments of the chosen ``DecoderLayer`` (level shapes, strides, image sizes) and its
reference points, with a forward hook; (2) the inputs and outputs of
``smca_d2.modeling.attention.gaussian_log_weights`` by replacing the name the decoder module calls
(``smca_d2.modeling.decoder.gaussian_log_weights``) for the duration of the context; (3) the
inputs of the layer's ``cross_attn``, from which the attention probabilities are recomputed.

Pixel convention: the model places a query's Gaussian center at ``x / stride`` feature cells for
a point ``x`` (in pixels of the resized, unpadded image), so cell ``j`` of a level is drawn over
the pixels whose center is nearest to ``j * stride``.

Usage::

    predictor = LazyPredictor("configs/demo/smca_r18_synthetic.py", "model_final.pth")
    maps = compute_smca_maps(predictor, cv2.imread("photo.jpg"), topk=5)
    save_smca_maps(maps, "gaussian_maps/")
"""

import contextlib
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from smca_d2.modeling import decoder as decoder_module

__all__ = [
    "LayerCapture",
    "SMCAMaps",
    "capture_decoder_layer",
    "cells_to_image",
    "compute_smca_maps",
    "save_smca_maps",
    "wrapped_gaussian_log_weights",
]


@dataclass
class LayerCapture:
    """What :func:`capture_decoder_layer` records for one decoder layer (batch first).

    Attributes:
        level_shapes: (H_l, W_l) of each (padded) feature level.
        level_strides: stride of each level in pixels.
        image_wh: float [B, 2] unpadded (resized) image widths and heights.
        ref: [B, Q, 2] normalized query centers used by the layer.
        gaussian_calls: per level, ``{"centers": [B, heads, Q, 2] (cells), "scales": None or
            [B, heads, Q, 1|2], "feature_shape": (H, W), "log_weights": [B, heads, Q, H*W]}``;
            empty for a layer without spatial modulation.
        attention: per level, [B, heads, Q, S_l] attention probabilities.
        level_weights: [B, Q, L] scale-selection weights, or None (one level).
    """

    level_shapes: List = field(default_factory=list)
    level_strides: List = field(default_factory=list)
    image_wh: Optional[torch.Tensor] = None
    ref: Optional[torch.Tensor] = None
    gaussian_calls: List[Dict] = field(default_factory=list)
    attention: List[torch.Tensor] = field(default_factory=list)
    level_weights: Optional[torch.Tensor] = None


def _bind(module, args, kwargs) -> Dict:
    """A module's forward arguments by name."""
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def attention_probabilities(attn, query, key, biases, level_sizes) -> List[torch.Tensor]:
    """Recompute the probabilities of a ``SpatiallyModulatedCoAttention`` call, per level.

    Returns:
        per level, float32 [B, heads, Q, S_l]: ``softmax(q k^T / sqrt(d) + bias)``.
    """
    c = attn.embed_dim
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = attn._heads(F.linear(query, w[:c], b[:c])).float()
    k = attn._heads(F.linear(key, w[c : 2 * c], b[c : 2 * c])).float()
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return [
        (logits_l + bias.float()).softmax(-1) for logits_l, bias in zip(logits.split(list(level_sizes), dim=-1), biases)
    ]


@contextlib.contextmanager
def wrapped_gaussian_log_weights(wrap):
    """Within the context, the decoder builds its Gaussian priors with ``wrap(original)``.

    ``original`` is :func:`smca_d2.modeling.attention.gaussian_log_weights`; ``wrap`` returns a
    function with its signature (e.g. one that records or times the calls). The name the decoder
    module calls is replaced for the duration of the context, then restored.
    """
    original = decoder_module.gaussian_log_weights
    decoder_module.gaussian_log_weights = wrap(original)
    try:
        yield
    finally:
        decoder_module.gaussian_log_weights = original


@contextlib.contextmanager
def capture_decoder_layer(model, layer_index: int = -1):
    """Record the Gaussian maps and co-attention of one decoder layer during forward passes.

    Args:
        model: an ``SMCADETR`` (its ``transformer.decoder.layers``).
        layer_index: which decoder layer (negative: from the end).

    Yields:
        a :class:`LayerCapture`, filled by the next forward pass (a later pass overwrites it).
    """
    layer = model.transformer.decoder.layers[layer_index]
    capture = LayerCapture()
    state = {"inside": False}

    def recording(original):
        def recording_gaussian_log_weights(centers, scales, feature_shape, beta, key_padding_mask=None):
            out = original(centers, scales, feature_shape, beta, key_padding_mask)
            if state["inside"]:
                capture.gaussian_calls.append(
                    {
                        "centers": centers.detach().float(),
                        "scales": None if scales is None else scales.detach().float(),
                        "feature_shape": tuple(int(s) for s in feature_shape),
                        "log_weights": out.detach(),
                    }
                )
            return out

        return recording_gaussian_log_weights

    def layer_pre_hook(module, args, kwargs):
        state["inside"] = True
        capture.gaussian_calls.clear()
        capture.attention.clear()
        named = _bind(module, args, kwargs)
        capture.level_shapes = [tuple(int(v) for v in s) for s in named["level_shapes"]]
        capture.level_strides = [int(s) for s in named["level_strides"]]
        capture.image_wh = named["image_wh"].detach().float()

    def layer_hook(module, args, kwargs, output):
        state["inside"] = False
        capture.ref = output[2].detach().float()  # (tgt, ref_logit, ref)

    def attention_hook(module, args, kwargs, output):
        named = _bind(module, args, kwargs)
        capture.attention[:] = [
            p.detach()
            for p in attention_probabilities(
                module, named["query"], named["key"], named["biases"], named["level_sizes"]
            )
        ]
        weights = named["level_weights"]
        capture.level_weights = None if weights is None else weights.detach().float()

    handles = [
        layer.register_forward_pre_hook(layer_pre_hook, with_kwargs=True),
        layer.register_forward_hook(layer_hook, with_kwargs=True),
        layer.cross_attn.register_forward_hook(attention_hook, with_kwargs=True),
    ]
    try:
        with wrapped_gaussian_log_weights(recording):
            yield capture
    finally:
        for handle in handles:
            handle.remove()


def cells_to_image(cells: np.ndarray, stride: int, resized_hw, original_hw) -> np.ndarray:
    """Nearest-cell upsampling of feature-level maps to the original image's pixels.

    Args:
        cells: [..., H_l, W_l] maps over a level's cells.
        stride: the level's stride in pixels of the resized image.
        resized_hw: (h, w) of the resized, unpadded image the model saw.
        original_hw: (H, W) of the original image.

    Returns:
        [..., H, W]
    """
    rows = _nearest_cells(original_hw[0], resized_hw[0], stride, cells.shape[-2])
    cols = _nearest_cells(original_hw[1], resized_hw[1], stride, cells.shape[-1])
    return cells[..., rows[:, None], cols[None, :]]


def _nearest_cells(size: int, resized: int, stride: int, num_cells: int) -> np.ndarray:
    centers = (np.arange(size) + 0.5) * (resized / size)  # pixel centers, resized coordinates
    return np.clip(np.floor(centers / stride + 0.5).astype(np.int64), 0, num_cells - 1)


@dataclass
class SMCAMaps:
    """Gaussian and co-attention maps of some queries on one image (see :func:`compute_smca_maps`).

    Attributes:
        image_rgb: HxWx3 uint8, the original image.
        layer: index of the decoder layer.
        queries: [n] query indices.
        scores, classes: [n] the queries' best class score and class.
        class_names: one name per model class.
        boxes: [n, 4] predicted boxes, XYXY pixels of the original image.
        centers: [n, 2] the queries' Gaussian centers (the model's ``ref_points``), pixels.
        resized_hw: (h, w) of the image the model saw (after the test resize).
        level_shapes, level_strides: per level.
        gaussian_cells: per level [n, H_l, W_l] head-averaged ``exp(log G)``; None without
            spatial modulation.
        attention_cells: per level [n, H_l, W_l] head-averaged attention probabilities.
        head_centers: per level [n, heads, 2] each head's Gaussian center, pixels; or None.
        level_weights: [n, L] scale-selection weights, or None.
    """

    image_rgb: np.ndarray
    layer: int
    queries: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    class_names: List[str]
    boxes: np.ndarray
    centers: np.ndarray
    resized_hw: tuple
    level_shapes: List[tuple]
    level_strides: List[int]
    gaussian_cells: Optional[List[np.ndarray]]
    attention_cells: List[np.ndarray]
    head_centers: Optional[List[np.ndarray]]
    level_weights: Optional[np.ndarray]

    @property
    def num_levels(self) -> int:
        return len(self.level_shapes)

    def _to_image(self, cells: np.ndarray, level: int) -> np.ndarray:
        return cells_to_image(cells, self.level_strides[level], self.resized_hw, self.image_rgb.shape[:2])

    def gaussian_image(self, level: int) -> Optional[np.ndarray]:
        """[n, H, W] Gaussian maps of a level in original-image pixels (None if unmodulated)."""
        if self.gaussian_cells is None:
            return None
        return self._to_image(self.gaussian_cells[level], level)

    def attention_image(self, level: int) -> np.ndarray:
        """[n, H, W] co-attention maps of a level in original-image pixels."""
        return self._to_image(self.attention_cells[level], level)


@torch.no_grad()
def compute_smca_maps(
    predictor, image: np.ndarray, queries: Optional[Sequence[int]] = None, topk: int = 5, layer: int = -1
) -> SMCAMaps:
    """Run the predictor's model on one image and collect SMCA's maps for some queries.

    Args:
        predictor: a :class:`~smca_d2.inference.LazyPredictor` (its model must be an SMCADETR).
        image: HxWx3 uint8 in ``predictor.input_format``.
        queries: query indices; default: the ``topk`` queries with the highest class score.
        topk: number of queries when ``queries`` is None.
        layer: decoder layer (negative: from the end; default the last).

    Returns:
        :class:`SMCAMaps`
    """
    model = predictor.model
    num_layers = len(model.transformer.decoder.layers)
    layer = layer % num_layers
    inputs = predictor.preprocess(image)
    with capture_decoder_layer(model, layer) as capture:
        images = model.preprocess_image([inputs])
        outputs = model.forward_outputs(images)

    probs = outputs["pred_logits"][0].sigmoid().float()
    best_scores, best_classes = probs.max(-1)
    if queries is None:
        queries = best_scores.topk(min(topk, len(best_scores))).indices
    query_index = torch.as_tensor(list(queries) if not torch.is_tensor(queries) else queries, dtype=torch.long)
    query_index = query_index.to(probs.device)

    height, width = inputs["height"], inputs["width"]
    resized_hw = tuple(int(v) for v in images.image_sizes[0])
    # Normalized to the unpadded image, so these scale directly to the original image.
    boxes = outputs["pred_boxes"][0, query_index].float()
    scale = torch.tensor([width, height], dtype=torch.float32, device=boxes.device)
    boxes_xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], -1) * scale.repeat(2)
    centers = outputs["ref_points"][0, query_index].float() * scale

    def cells(per_level: List[torch.Tensor]) -> List[np.ndarray]:
        # [B, heads, Q, S_l] -> [n, H_l, W_l], averaged over heads
        return [
            t[0][:, query_index].float().mean(0).reshape(len(query_index), *shape).cpu().numpy()
            for t, shape in zip(per_level, capture.level_shapes)
        ]

    gaussian_cells = head_centers = None
    if capture.gaussian_calls:
        gaussian_cells = cells([c["log_weights"].exp() for c in capture.gaussian_calls])
        pixel_scale = np.array([width / resized_hw[1], height / resized_hw[0]], dtype=np.float32)
        head_centers = [
            c["centers"][0][:, query_index].transpose(0, 1).cpu().numpy() * stride * pixel_scale
            for c, stride in zip(capture.gaussian_calls, capture.level_strides)
        ]
    level_weights = None
    if capture.level_weights is not None:
        level_weights = capture.level_weights[0, query_index].cpu().numpy()

    image_rgb = image[:, :, ::-1] if predictor.input_format == "BGR" else image
    return SMCAMaps(
        image_rgb=np.ascontiguousarray(image_rgb),
        layer=layer,
        queries=query_index.cpu().numpy(),
        scores=best_scores[query_index].cpu().numpy(),
        classes=best_classes[query_index].cpu().numpy(),
        class_names=list(predictor.class_names),
        boxes=boxes_xyxy.cpu().numpy(),
        centers=centers.cpu().numpy(),
        resized_hw=resized_hw,
        level_shapes=list(capture.level_shapes),
        level_strides=list(capture.level_strides),
        gaussian_cells=gaussian_cells,
        attention_cells=cells(capture.attention),
        head_centers=head_centers,
        level_weights=level_weights,
    )


def _draw_panel(ax, image_rgb, heat, box, center, head_centers, title):
    ax.imshow(image_rgb, alpha=0.6)
    top = float(heat.max())
    ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=top if top > 0 else 1.0)
    x0, y0, x1, y1 = box
    ax.add_patch(_rectangle((x0, y0), x1 - x0, y1 - y0))
    if head_centers is not None:
        ax.scatter(head_centers[:, 0], head_centers[:, 1], s=8, c="white", edgecolors="black", linewidths=0.5)
    ax.scatter([center[0]], [center[1]], s=60, marker="x", c="red")
    h, w = image_rgb.shape[:2]
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def _rectangle(xy, width, height):
    from matplotlib.patches import Rectangle

    return Rectangle(xy, width, height, fill=False, edgecolor="lime", linewidth=1.5)


def save_smca_maps(maps: SMCAMaps, output_dir: str, prefix: str = "", dpi: int = 100) -> List[str]:
    """Draw each query's maps over the image and save one PNG per query.

    A figure has one column per feature level and two rows: the Gaussian weight map (with each
    head's center as a white dot) and the co-attention map; the predicted box is green, the
    query's center a red cross.

    Returns:
        the written paths.
    """
    from matplotlib.figure import Figure

    os.makedirs(output_dir, exist_ok=True)
    rows = [("Gaussian exp(log G)", maps.gaussian_image)] if maps.gaussian_cells is not None else []
    rows.append(("co-attention", maps.attention_image))
    per_level = [[fn(level) for level in range(maps.num_levels)] for _, fn in rows]
    h, w = maps.image_rgb.shape[:2]
    panel = 4.0
    paths = []
    for i, query in enumerate(maps.queries):
        fig = Figure(figsize=(panel * maps.num_levels, panel * len(rows) * h / w + 0.6))
        axes = fig.subplots(len(rows), maps.num_levels, squeeze=False)
        for r, (name, _) in enumerate(rows):
            for level in range(maps.num_levels):
                title = f"{name}, level {level} (stride {maps.level_strides[level]})"
                if maps.level_weights is not None:
                    title += f", weight {maps.level_weights[i, level]:.2f}"
                heads = maps.head_centers[level][i] if maps.head_centers is not None and r == 0 else None
                _draw_panel(
                    axes[r, level], maps.image_rgb, per_level[r][level][i], maps.boxes[i], maps.centers[i], heads, title
                )
        cls = int(maps.classes[i])
        name = maps.class_names[cls] if cls < len(maps.class_names) else str(cls)
        fig.suptitle(f"query {int(query)}: {name} {maps.scores[i]:.2f} (decoder layer {maps.layer})", fontsize=10)
        fig.tight_layout()
        path = os.path.join(output_dir, f"{prefix}query{int(query):03d}.png")
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths
