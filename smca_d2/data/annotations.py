"""Boxes that cannot be trained on: clipped to their image or dropped, with logged counts."""

import logging
import math
import os
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Tuple

import numpy as np

from detectron2.structures import BoxMode

from .errors import DatasetValidationError, format_problems

__all__ = ["log_box_stats", "sanitize_annotations"]

logger = logging.getLogger(__name__)

_DROP_REASONS = {
    "malformed": "a bbox that is not four numbers",
    "non_finite": "NaN or infinite coordinates",
    "degenerate": "zero or negative width/height",
    "outside": "lying wholly outside the image",
}


def sanitize_annotations(dataset_dicts: List[Dict], dataset_name: str = "", num_classes: Optional[int] = None):
    """Clip boxes to their image and drop boxes that cannot be trained on, in place.

    A box (``XYXY_ABS`` or ``XYWH_ABS``) with NaN/inf coordinates, zero or negative width/height, or
    nothing inside the image is dropped; a box partly outside the image is clipped to
    ``[0, width] x [0, height]`` (its mode is kept). Boxes in other modes are left alone.

    Returns:
        (dataset_dicts, stats): ``stats`` counts ``clipped`` boxes and dropped boxes per reason
        (``non_finite``, ``degenerate``, ``outside``, ``malformed``), with ``examples``.

    Raises:
        DatasetValidationError: a ``category_id`` outside ``[0, num_classes)`` (``num_classes``
            given), or duplicate image ids within the dataset.
    """
    stats = Counter()
    examples = defaultdict(list)
    problems = []
    image_ids = Counter(d.get("image_id") for d in dataset_dicts if "image_id" in d)
    duplicated = [i for i, n in image_ids.items() if n > 1]
    if duplicated:
        problems.append(f"duplicate image ids {sorted(duplicated, key=str)[:10]}")
    for record in dataset_dicts:
        annotations = record.get("annotations")
        if annotations is None:
            continue
        height, width = record.get("height"), record.get("width")
        kept = []
        for ann in annotations:
            category = ann.get("category_id")
            if num_classes is not None and not (
                isinstance(category, (int, np.integer)) and 0 <= category < num_classes
            ):
                problems.append(f"{record.get('file_name')}: category_id {category!r} is not in [0, {num_classes})")
            reason, new_box = _check_box(ann, height, width)
            if reason is not None:
                stats[reason] += 1
                if len(examples[reason]) < 3:
                    examples[reason].append(f"{os.path.basename(str(record.get('file_name')))} {ann.get('bbox')}")
                continue
            if new_box is not None:
                stats["clipped"] += 1
                if len(examples["clipped"]) < 3:
                    examples["clipped"].append(f"{os.path.basename(str(record.get('file_name')))} {ann.get('bbox')}")
                ann = dict(ann, bbox=new_box)
            kept.append(ann)
        record["annotations"] = kept
    if problems:
        raise DatasetValidationError(
            format_problems(f"Dataset '{dataset_name}' cannot be used: {len(problems)} problem(s):", problems), problems
        )
    stats = dict(stats)
    stats["examples"] = dict(examples)
    return dataset_dicts, stats


def _check_box(ann: Dict, height, width) -> Tuple[Optional[str], Optional[List[float]]]:
    """(reason to drop or None, clipped box or None)."""
    bbox = ann.get("bbox")
    if bbox is None:
        return None, None
    mode = ann.get("bbox_mode", BoxMode.XYWH_ABS)
    if mode not in (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS):
        return None, None
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return "malformed", None
    if len(values) != 4:
        return "malformed", None
    if not all(math.isfinite(v) for v in values):
        return "non_finite", None
    x0, y0, a, b = values
    x1, y1 = (x0 + a, y0 + b) if mode == BoxMode.XYWH_ABS else (a, b)
    if not (x1 > x0 and y1 > y0):
        return "degenerate", None
    if height is None or width is None:
        return None, None
    cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    if not (cx1 > cx0 and cy1 > cy0):
        return "outside", None
    if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):
        return None, None
    if mode == BoxMode.XYWH_ABS:
        return None, [cx0, cy0, cx1 - cx0, cy1 - cy0]
    return None, [cx0, cy0, cx1, cy1]


def log_box_stats(dataset_name: str, num_images: int, num_boxes: int, stats: Dict) -> None:
    examples = stats.get("examples", {})
    parts = []
    if stats.get("clipped"):
        parts.append(f"{stats['clipped']} clipped to the image (e.g. {'; '.join(examples['clipped'])})")
    for reason, text in _DROP_REASONS.items():
        if stats.get(reason):
            parts.append(f"{stats[reason]} dropped for {text} (e.g. {'; '.join(examples[reason])})")
    if parts:
        logger.warning(f"Dataset '{dataset_name}' ({num_images} images, {num_boxes} boxes): " + "; ".join(parts) + ".")
    else:
        logger.info(f"Dataset '{dataset_name}': {num_images} images, {num_boxes} boxes, all boxes valid.")
