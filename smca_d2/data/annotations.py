"""Boxes that cannot be trained on: clipped to their image or dropped, with logged counts."""

import itertools
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


# Outcome of each box, as codes: kept unchanged, dropped for a reason of _DROP_REASONS, clipped.
_KEPT, _CLIPPED = 0, len(_DROP_REASONS) + 1
_CODES = {reason: code for code, reason in enumerate(_DROP_REASONS, start=1)}
_REASONS = {code: reason for reason, code in _CODES.items()}
_REASONS[_CLIPPED] = "clipped"


def sanitize_annotations(dataset_dicts: List[Dict], dataset_name: str = "", num_classes: Optional[int] = None):
    """Clip boxes to their image and drop boxes that cannot be trained on, in place.

    A box (``XYXY_ABS`` or ``XYWH_ABS``) with NaN/inf coordinates, zero or negative width/height, or
    nothing inside the image is dropped; a box partly outside the image is clipped to
    ``[0, width] x [0, height]`` (its mode is kept). Boxes in other modes are left alone. The
    boxes of all images are checked at once with numpy when they convert to one ``N x 4`` array
    (as COCO's do), else one by one; the outcome is the same.

    Returns:
        (dataset_dicts, stats): ``stats`` counts ``clipped`` boxes and dropped boxes per reason
        (``non_finite``, ``degenerate``, ``outside``, ``malformed``), with ``examples``.

    Raises:
        DatasetValidationError: a ``category_id`` outside ``[0, num_classes)`` (``num_classes``
            given), or duplicate image ids within the dataset.
    """
    problems = []
    image_ids = [d["image_id"] for d in dataset_dicts if "image_id" in d]
    if len(set(image_ids)) != len(image_ids):
        duplicated = [i for i, n in Counter(image_ids).items() if n > 1]
        problems.append(f"duplicate image ids {sorted(duplicated, key=str)[:10]}")
    records = [r for r in dataset_dicts if r.get("annotations") is not None]
    counts = [len(r["annotations"]) for r in records]
    annotations = [a for r in records for a in r["annotations"]]
    owner = np.repeat(np.arange(len(records)), counts)  # the record of each annotation
    if num_classes is not None:
        problems += _category_problems(records, owner, annotations, num_classes)
    if problems:
        raise DatasetValidationError(
            format_problems(f"Dataset '{dataset_name}' cannot be used: {len(problems)} problem(s):", problems), problems
        )

    outcome = _check_boxes_at_once(records, owner, annotations)
    if outcome is None:
        outcome = _check_boxes_one_by_one(records, owner, annotations)
    codes, clipped_boxes = outcome

    stats = Counter()
    examples = defaultdict(list)
    changed = np.flatnonzero(codes)
    for code, n in enumerate(np.bincount(codes[changed], minlength=_CLIPPED + 1).tolist()):
        if code != _KEPT and n:
            reason = _REASONS[code]
            stats[reason] = n
            for i in changed[codes[changed] == code][:3].tolist():
                name = os.path.basename(str(records[owner[i]].get("file_name")))
                examples[reason].append(f"{name} {annotations[i].get('bbox')}")
    # Rebuild the annotation lists of the images with a dropped or clipped box only.
    starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
    for r in np.unique(owner[changed]).tolist():
        kept = []
        for i in range(starts[r], starts[r + 1]):
            code, ann = int(codes[i]), annotations[i]
            if code == _CLIPPED:
                kept.append(dict(ann, bbox=clipped_boxes[i]))
            elif code == _KEPT:
                kept.append(ann)
        records[r]["annotations"] = kept
    stats = dict(stats)
    stats["examples"] = dict(examples)
    return dataset_dicts, stats


def _category_problems(records: List[Dict], owner: np.ndarray, annotations: List[Dict], num_classes: int) -> List[str]:
    categories = [a.get("category_id") for a in annotations]
    kinds = set(map(type, categories))
    if all(issubclass(k, (int, np.integer)) for k in kinds):
        values = np.array(categories, dtype=np.int64) if categories else np.zeros(0, np.int64)
        bad = np.flatnonzero((values < 0) | (values >= num_classes)).tolist()
    else:
        bad = [i for i, c in enumerate(categories) if not (isinstance(c, (int, np.integer)) and 0 <= c < num_classes)]
    return [
        f"{records[owner[i]].get('file_name')}: category_id {categories[i]!r} is not in [0, {num_classes})" for i in bad
    ]


def _check_boxes_at_once(records: List[Dict], owner: np.ndarray, annotations: List[Dict]):
    """(codes, clipped boxes by index) of every box, with numpy; None if the boxes do not convert
    to one ``N x 4`` float array (missing, malformed or odd boxes: they are checked one by one)."""
    boxes = [a.get("bbox") for a in annotations]
    modes = [a.get("bbox_mode", BoxMode.XYWH_ABS) for a in annotations]
    if not boxes or set(modes) - {BoxMode.XYWH_ABS, BoxMode.XYXY_ABS}:
        return None
    heights = [r.get("height") for r in records]
    widths = [r.get("width") for r in records]
    if None in heights or None in widths:
        return None
    try:  # float() of each coordinate, as _check_box does
        if set(map(len, boxes)) != {4}:
            return None
        values = np.fromiter(itertools.chain.from_iterable(boxes), dtype=np.float64, count=4 * len(boxes))
    except (TypeError, ValueError):
        return None
    values = values.reshape(-1, 4)
    height = np.array(heights, dtype=np.float64)[owner]
    width = np.array(widths, dtype=np.float64)[owner]
    if len(set(modes)) == 1:
        xywh = np.full(len(modes), modes[0] == BoxMode.XYWH_ABS)
    else:
        xywh = np.array([m == BoxMode.XYWH_ABS for m in modes])

    x0, y0, a, b = values.T
    x1, y1 = np.where(xywh, x0 + a, a), np.where(xywh, y0 + b, b)
    cx0, cy0 = np.minimum(np.maximum(x0, 0.0), width), np.minimum(np.maximum(y0, 0.0), height)
    cx1, cy1 = np.minimum(np.maximum(x1, 0.0), width), np.minimum(np.maximum(y1, 0.0), height)
    with np.errstate(invalid="ignore"):
        non_finite = ~np.isfinite(values).all(axis=1)
        degenerate = ~non_finite & ~((x1 > x0) & (y1 > y0))
        outside = ~non_finite & ~degenerate & ~((cx1 > cx0) & (cy1 > cy0))
        moved = (cx0 != x0) | (cy0 != y0) | (cx1 != x1) | (cy1 != y1)
    clipped = ~non_finite & ~degenerate & ~outside & moved
    codes = np.zeros(len(boxes), dtype=np.int64)
    codes[non_finite] = _CODES["non_finite"]
    codes[degenerate] = _CODES["degenerate"]
    codes[outside] = _CODES["outside"]
    codes[clipped] = _CLIPPED
    clipped_boxes = {}
    for i in np.flatnonzero(clipped).tolist():
        far = (cx1[i] - cx0[i], cy1[i] - cy0[i]) if xywh[i] else (cx1[i], cy1[i])
        clipped_boxes[i] = [float(cx0[i]), float(cy0[i]), float(far[0]), float(far[1])]
    return codes, clipped_boxes


def _check_boxes_one_by_one(records: List[Dict], owner: np.ndarray, annotations: List[Dict]):
    codes = np.zeros(len(annotations), dtype=np.int64)
    clipped_boxes = {}
    for i, ann in enumerate(annotations):
        record = records[owner[i]]
        reason, new_box = _check_box(ann, record.get("height"), record.get("width"))
        if reason is not None:
            codes[i] = _CODES[reason]
        elif new_box is not None:
            codes[i] = _CLIPPED
            clipped_boxes[i] = new_box
    return codes, clipped_boxes


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
