"""Checkpoints of the official SMCA-DETR code (gaopengcuhk/SMCA-DETR) for smca_d2: its single-scale
model, and the "new multi-scale" model of its ``Multi_scale_SMCA.zip``.

The official model is DETR's: a torchvision ResNet (``backbone.0.body.*``, frozen BN), a
1x1 ``input_proj`` conv, the transformer, and ``class_embed`` with one row per COCO category
*id* (0..90) plus an unused "no-object" row 91 (it is trained with a sigmoid focal loss, so that
row is never a target). smca_d2 uses Detectron2's ResNet (``backbone.stem`` / ``backbone.res2..5``),
a list of input projections (``input_proj.0``), decoder modules named after what they do
(:data:`OFFICIAL_DECODER_NAMES`: ``point1`` is ``center_head``, ...) and, for COCO, 80
contiguous classes in the order of the sorted COCO category ids. Everything else has the same
names and shapes.

The zip's multi-scale model (``ConvMultiScaleEncoder`` in smca_d2) names its input projections by
channels (``input_proj_512`` ... ``input_proj_2048_3``: smca_d2's ``input_proj.0..3``), keeps the
level embedding and the stride-8 folding conv in the transformer (``transformer.level_embed``,
``transformer.conv``), names the encoder's convs by stride (``self_attn_8`` ... ``self_attn_64``:
``level_convs.0..3``; ``high_to_low[_k]`` / ``low_to_high[_k]``: ``down_convs`` / ``up_convs``;
``conv_1`` / ``conv_2``: ``input_conv`` / ``output_conv``) and calls the scale selection ``point4``
(:data:`OFFICIAL_MULTI_SCALE_NAMES`).

:func:`convert_official_state_dict` maps an official state dict to smca_d2's; keys it does not
know are reported, never silently dropped. :func:`load_official_checkpoint` reads a checkpoint
written by the official ``main.py`` (``{"model", "optimizer", "lr_scheduler", "epoch", "args"}``)
or a bare ``{"model": state_dict}``, with ``torch.load(weights_only=True)``: the only non-tensor
type it lets through is ``argparse.Namespace`` (the official ``args``); a file that would run code
while unpickling is refused.
"""

import argparse
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .torchvision_resnet import map_torchvision_resnet_key

__all__ = [
    "COCO_NUM_CLASS_SLOTS",
    "OFFICIAL_DECODER_NAMES",
    "OFFICIAL_MULTI_SCALE_NAMES",
    "CompletenessReport",
    "UnsafeCheckpointError",
    "check_complete",
    "coco_contiguous_category_ids",
    "convert_official_state_dict",
    "is_official_multi_scale",
    "load_official_checkpoint",
    "rename_official_decoder_key",
]

# class_embed rows of the official COCO model: ids 0..90 (num_classes=91) + the no-object row.
COCO_NUM_CLASS_SLOTS = 92


# The official transformer's parameter names (post-norm encoder/decoder, SMCA decoder layers).
_TRANSFORMER_PATTERNS = [
    re.compile(p)
    for p in (
        r"transformer\.encoder\.layers\.\d+\.self_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
        r"transformer\.encoder\.layers\.\d+\.(linear1|linear2|norm1|norm2)\.(weight|bias)",
        r"transformer\.decoder\.layers\.\d+\.(self_attn|multihead_attn)\."
        r"(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
        r"transformer\.decoder\.layers\.\d+\.(linear1|linear2|norm1|norm2|norm3|norm4|point2|point3)\.(weight|bias)",
        r"transformer\.decoder\.layers\.0\.point1\.layers\.\d+\.(weight|bias)",
        r"transformer\.decoder\.norm\.(weight|bias)",
    )
]
# Decoder-layer modules that smca_d2 names after what they do (official name -> ours).
OFFICIAL_DECODER_NAMES = {
    "multihead_attn": "cross_attn",
    "norm4": "modulation_norm",
    "point1": "center_head",
    "point2": "offset_head",
    "point3": "scale_head",
    "point4": "scale_selection",  # the multi-scale model's level weights
}

_LAYER = r"transformer\.encoder\.layers\.(\d+)\."
_WB = r"\.(weight|bias)"


def _encoder_key(module: str):
    return lambda m: f"transformer.encoder.layers.{m[1]}.{module}.{m[m.lastindex]}"


def _link_key(module: str):
    # The official per-pair convs count from 1: _1 links strides 8 and 16, _2 16 and 32, _3 32 and 64.
    return lambda m: f"transformer.encoder.layers.{m[1]}.{module}.{int(m[2]) - 1}.{m[3]}"


# The zip's multi-scale model: official key pattern -> its smca_d2 key (a function of the match).
OFFICIAL_MULTI_SCALE_NAMES = [
    (r"input_proj_512" + _WB, lambda m: f"input_proj.0.{m[1]}"),
    (r"input_proj_1024" + _WB, lambda m: f"input_proj.1.{m[1]}"),
    (r"input_proj_2048" + _WB, lambda m: f"input_proj.2.{m[1]}"),
    (r"input_proj_2048_3" + _WB, lambda m: f"input_proj.3.{m[1]}"),
    (r"transformer\.level_embed", lambda m: "level_embed"),
    (r"transformer\.conv" + _WB, lambda m: f"transformer.encoder.fold_conv.{m[1]}"),
    (_LAYER + r"self_attn_8" + _WB, _encoder_key("level_convs.0")),
    (_LAYER + r"self_attn_16" + _WB, _encoder_key("level_convs.1")),
    (_LAYER + r"self_attn_32" + _WB, _encoder_key("level_convs.2")),
    (_LAYER + r"self_attn_64" + _WB, _encoder_key("level_convs.3")),
    (_LAYER + r"high_to_low" + _WB, _encoder_key("down_convs.0")),
    (_LAYER + r"low_to_high" + _WB, _encoder_key("up_convs.0")),
    (_LAYER + r"high_to_low_([123])" + _WB, _link_key("down_convs")),
    (_LAYER + r"low_to_high_([123])" + _WB, _link_key("up_convs")),
    (_LAYER + r"conv_1" + _WB, _encoder_key("input_conv")),
    (_LAYER + r"conv_2" + _WB, _encoder_key("output_conv")),
    (_LAYER + r"(linear1|linear2|norm1|norm2)" + _WB, lambda m: f"transformer.encoder.layers.{m[1]}.{m[2]}.{m[3]}"),
    (r"transformer\.decoder\.layers\.\d+\.point4" + _WB, lambda m: rename_official_decoder_key(m[0])),
]
_MULTI_SCALE_PATTERNS = [(re.compile(p), f) for p, f in OFFICIAL_MULTI_SCALE_NAMES]


def is_official_multi_scale(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is the zip's multi-scale model (it has the stride-64 projection)."""
    return any(k.startswith(("input_proj_2048_3.", "module.input_proj_2048_3.")) for k in state_dict)


def _map_multi_scale_key(key: str) -> Optional[str]:
    """smca_d2's key for a key of the zip's multi-scale model that the single-scale model lacks."""
    for pattern, target in _MULTI_SCALE_PATTERNS:
        match = pattern.fullmatch(key)
        if match is not None:
            return target(match)
    return None


_DECODER_MODULE = re.compile(r"(transformer\.decoder\.layers\.\d+\.)([a-z0-9_]+)(\..*)")


def rename_official_decoder_key(key: str) -> str:
    """``transformer.decoder.layers.N.<official module>.*`` -> smca_d2's module name
    (:data:`OFFICIAL_DECODER_NAMES`); other keys unchanged."""
    match = _DECODER_MODULE.fullmatch(key)
    if match is None or match.group(2) not in OFFICIAL_DECODER_NAMES:
        return key
    return match.group(1) + OFFICIAL_DECODER_NAMES[match.group(2)] + match.group(3)


_HEAD_PATTERNS = [
    re.compile(p)
    for p in (
        r"bbox_embed\.layers\.\d+\.(weight|bias)",
        r"query_embed\.weight",
    )
]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds pickled objects that ``torch.load(weights_only=True)`` refuses."""


def coco_contiguous_category_ids() -> List[int]:
    """The 80 COCO "thing" category ids, sorted: contiguous class ``i`` is id ``ids[i]``.

    This is Detectron2's mapping for the builtin COCO datasets (``thing_dataset_id_to_contiguous_id``)
    and the order in which ``load_coco_json`` numbers the categories (sorted ids).
    """
    import smca_d2  # noqa: F401  (detectron2 compatibility fixes before importing detectron2.data)

    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    ids = sorted(c["id"] for c in COCO_CATEGORIES if c.get("isthing", 0) == 1)
    if len(ids) != 80:  # pragma: no cover - a detectron2 change
        raise RuntimeError(f"expected 80 COCO thing categories in detectron2, found {len(ids)}")
    return ids


def _map_backbone_key(key: str) -> Optional[str]:
    """torchvision ResNet (``backbone.0.body.*``) -> Detectron2 ResNet (``backbone.*``); None if
    the key is not a backbone parameter/buffer that smca_d2 has."""
    prefix = "backbone.0.body."
    if not key.startswith(prefix):
        return None
    try:
        new = map_torchvision_resnet_key(key[len(prefix) :])
    except KeyError:
        return None
    return None if new is None else "backbone." + new


def _class_rows(num_classes: int, num_slots: int) -> Optional[List[int]]:
    """Rows of the official class_embed to keep (None: all of them)."""
    if num_classes == 80:
        if num_slots < 91:
            raise ValueError(
                f"class_embed has {num_slots} rows; mapping to the 80 COCO classes needs the official "
                "COCO layout (one row per category id 0..90, plus the no-object row: 92 rows)"
            )
        return coco_contiguous_category_ids()
    if num_classes == 91:
        if num_slots not in (91, 92):
            raise ValueError(f"num_classes=91 needs a class_embed with 91 or 92 rows, it has {num_slots}")
        return list(range(91))
    if num_classes == COCO_NUM_CLASS_SLOTS:
        if num_slots != COCO_NUM_CLASS_SLOTS:
            raise ValueError(f"num_classes=92 keeps the rows as they are, but class_embed has {num_slots} rows")
        return None
    raise ValueError(
        f"num_classes={num_classes} is not supported: use 80 (COCO's 80 classes in Detectron2's "
        "contiguous order, picked by category id), 91 (one output per COCO category id 0..90) or 92 "
        "(the official rows unchanged, the unused no-object row included)"
    )


def convert_official_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_classes: int = 80,
    model: Optional[nn.Module] = None,
) -> "OrderedDict[str, torch.Tensor]":
    """Map an official SMCA-DETR state dict (the single-scale model, or the multi-scale model of
    ``Multi_scale_SMCA.zip``, recognised by its keys) to smca_d2's ``SMCADETR`` keys.

    Args:
        state_dict: the official model's ``state_dict()`` (the ``"model"`` entry of a checkpoint
            written by the official ``main.py``). A ``module.`` prefix (DDP) is removed.
        num_classes: classes of the target model: 80 keeps the rows of the 80 COCO category ids
            (row ``id`` of the official head becomes contiguous class ``i`` with
            ``coco_contiguous_category_ids()[i] == id``); 91 keeps rows 0..90 (drops the unused
            no-object row); 92 keeps all rows. Anything else raises ValueError.
        model: if given, the result is checked against it with :func:`check_complete` and a
            ValueError lists missing / unexpected keys and shape mismatches.

    Returns:
        an OrderedDict with every parameter and buffer of the smca_d2 model: the single-scale
        model, or for the zip's model that of ``smca_conv_multi_scale_*``.

    Raises:
        ValueError: keys that are not part of the official single-scale model (listed), a
            malformed class head, an unsupported ``num_classes``, or (with ``model``) an
            incomplete / mismatching result.
    """
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}

    multi_scale = is_official_multi_scale(sd)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    unknown: List[str] = []
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            unknown.append(f"{key} (not a tensor: {type(value).__name__})")
            continue
        if key.startswith("backbone."):
            if key.endswith(".num_batches_tracked"):
                continue  # a BatchNorm counter; frozen BN has no use for it
            new = _map_backbone_key(key)
            if new is None:
                unknown.append(key)
            else:
                out[new] = value
        elif key in ("input_proj.weight", "input_proj.bias") and not multi_scale:
            out["input_proj.0." + key.split(".")[-1]] = value
        elif multi_scale and (new := _map_multi_scale_key(key)) is not None:
            out[new] = value
        elif key in ("class_embed.weight", "class_embed.bias"):
            pass  # below
        elif any(p.fullmatch(key) for p in _TRANSFORMER_PATTERNS):
            out[rename_official_decoder_key(key)] = value
        elif any(p.fullmatch(key) for p in _HEAD_PATTERNS):
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} key(s) of the checkpoint are not part of the official "
            f"{'multi-scale (Multi_scale_SMCA.zip)' if multi_scale else 'single-scale'} SMCA-DETR model and "
            "have no smca_d2 counterpart (a segmentation or pre-norm checkpoint, or another variant?):\n  "
            + "\n  ".join(sorted(unknown))
        )

    weight, bias = sd.get("class_embed.weight"), sd.get("class_embed.bias")
    if weight is None or bias is None:
        raise ValueError("the checkpoint has no class_embed.weight / class_embed.bias")
    if weight.dim() != 2 or bias.dim() != 1 or weight.shape[0] != bias.shape[0]:
        raise ValueError(
            f"malformed class head: class_embed.weight {tuple(weight.shape)}, class_embed.bias {tuple(bias.shape)}"
        )
    rows = _class_rows(num_classes, weight.shape[0])
    if rows is not None:
        index = torch.tensor(rows, dtype=torch.long)
        weight, bias = weight.index_select(0, index), bias.index_select(0, index)
    out["class_embed.weight"] = weight
    out["class_embed.bias"] = bias

    if model is not None:
        report = check_complete(out, model)
        if not report.ok:
            raise ValueError(f"the converted checkpoint does not match the model:\n{report}")
    return out


@dataclass
class CompletenessReport:
    """Result of :func:`check_complete`."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shape_mismatches: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches)

    def __str__(self) -> str:
        if self.ok:
            return "complete: every parameter and buffer of the model, with matching shapes"
        lines = []
        if self.missing:
            lines.append(f"missing ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        if self.shape_mismatches:
            lines.append(
                f"shape mismatches ({len(self.shape_mismatches)}): "
                + ", ".join(f"{k} checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.shape_mismatches)
            )
        return "\n".join(lines)


def check_complete(converted: Mapping[str, torch.Tensor], model: nn.Module) -> CompletenessReport:
    """Compare a converted state dict with ``model.state_dict()`` (persistent parameters and buffers).

    Returns a :class:`CompletenessReport` listing the model's keys the checkpoint lacks, the
    checkpoint's keys the model lacks, and keys whose shapes differ.
    """
    expected: Dict[str, torch.Tensor] = model.state_dict()
    report = CompletenessReport()
    report.missing = [k for k in expected if k not in converted]
    report.unexpected = [k for k in converted if k not in expected]
    report.shape_mismatches = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in converted.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    return report


def _refusal(path: str, error: Exception) -> pickle.UnpicklingError:
    message = str(error)
    found = re.findall(r"GLOBAL ([\w.]+)", message)
    if not found:  # not a forbidden object: a damaged or foreign file
        return pickle.UnpicklingError(f"cannot read {path} with torch.load(weights_only=True): {message.strip()}")
    what = ", ".join(dict.fromkeys(found))
    return UnsafeCheckpointError(
        f"refusing to load {path}: it contains pickled objects ({what}) that torch.load(weights_only=True) "
        "does not allow. Only tensors, plain containers and values, and argparse.Namespace (the "
        "official main.py's `args`) are accepted; anything else could run code while unpickling. "
        "If you trust the file, re-save its 'model' state dict alone (torch.save({'model': "
        f"ckpt['model']}}, ...)) and convert that.\nPyTorch said: {message.strip()}"
    )


def _load_weights_only(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # e.g. the official `args` (an argparse.Namespace): retry with it allowed
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None


def load_official_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """Read an official SMCA-DETR checkpoint and return its model state dict.

    Accepts ``{"model": state_dict, ...}`` (what the official ``main.py`` writes: the optimizer,
    lr scheduler, epoch and ``args`` entries are ignored) or a bare state dict. Loads with
    ``torch.load(path, map_location="cpu", weights_only=True)``, allowing ``argparse.Namespace``.

    Raises:
        UnsafeCheckpointError: the file holds other pickled objects (it is not loaded).
        pickle.UnpicklingError: the file cannot be unpickled at all.
        ValueError: the file holds no model state dict.
    """
    checkpoint = _load_weights_only(str(path))
    if isinstance(checkpoint, Mapping) and "model" in checkpoint:
        state_dict = checkpoint["model"]
    elif (
        isinstance(checkpoint, Mapping) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
    ):
        state_dict = checkpoint
    else:
        keys = list(checkpoint.keys()) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f"{path} holds no model state dict (expected a 'model' entry; found {keys})")
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path}: 'model' is a {type(state_dict).__name__}, not a state dict")
    return dict(state_dict)
