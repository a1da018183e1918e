"""Structural checks of a COCO instances json, before detectron2 loads it."""

import json
import logging
from collections import Counter, defaultdict
from typing import Dict, List, Optional

from detectron2.utils.file_io import PathManager

from .errors import DatasetValidationError, format_problems

__all__ = ["validate_coco_json"]

logger = logging.getLogger(__name__)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_coco_json(json_file: str, dataset_name: Optional[str] = None) -> Dict[str, int]:
    """Structural checks of a COCO json that ``load_coco_json`` does not make (or makes with an
    assertion that names neither the file nor the ids).

    Refused: a file that does not parse; missing ``images``/``annotations``/``categories``;
    duplicate image, annotation or category ids (pycocotools silently keeps the last image of a
    duplicated id and gives it the annotations of both); annotations whose ``category_id`` is not
    in ``categories``; images without a positive integer ``height`` / ``width``; annotations whose
    ``bbox`` is not four numbers.

    Returns:
        counts of the json's images, annotations and categories, and of annotations whose
        ``image_id`` matches no image (these are ignored by detectron2, with a warning).

    Raises:
        DatasetValidationError
    """
    label = f"Dataset '{dataset_name}' ({json_file})" if dataset_name else json_file
    try:
        with PathManager.open(json_file, "r") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetValidationError(f"{label}: not valid json: {e}") from None
    if not isinstance(data, dict):
        raise DatasetValidationError(f"{label}: expected a json object with 'images', 'annotations', 'categories'")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DatasetValidationError(f"{label}: no list {missing} in the json (is it a COCO instances file?)")

    problems: List[str] = []
    images, annotations, categories = data["images"], data["annotations"], data["categories"]

    image_ids = Counter(img.get("id") for img in images)
    duplicated = sorted((i for i, n in image_ids.items() if n > 1), key=str)
    if duplicated:
        files = defaultdict(list)
        for img in images:
            if img.get("id") in image_ids and image_ids[img.get("id")] > 1:
                files[img.get("id")].append(img.get("file_name"))
        problems += [f"duplicate image id {i}: {', '.join(map(str, files[i]))}" for i in duplicated]
    for img in images:
        h, w = img.get("height"), img.get("width")
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
            problems.append(
                f"image id {img.get('id')} ({img.get('file_name')}): height={h!r}, width={w!r} (need positive integers)"
            )
        if not img.get("file_name"):
            problems.append(f"image id {img.get('id')}: no file_name")

    category_ids = Counter(c.get("id") for c in categories)
    problems += [f"duplicate category id {i}" for i, n in sorted(category_ids.items(), key=str) if n > 1]

    annotation_ids = Counter(a.get("id") for a in annotations)
    duplicated = sorted((i for i, n in annotation_ids.items() if n > 1), key=str)
    if duplicated:
        problems.append(
            f"{len(duplicated)} duplicate annotation id(s): {', '.join(map(str, duplicated[:10]))}"
            + (" ..." if len(duplicated) > 10 else "")
        )
    unknown = defaultdict(list)
    orphans = 0
    for ann in annotations:
        if ann.get("category_id") not in category_ids:
            unknown[ann.get("category_id")].append(ann.get("id"))
        if ann.get("image_id") not in image_ids:
            orphans += 1
        bbox = ann.get("bbox")
        if bbox is not None and not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
            problems.append(
                f"annotation id {ann.get('id')} (image id {ann.get('image_id')}): bbox {bbox!r} is not four numbers"
            )
    for cat, ann_ids in sorted(unknown.items(), key=lambda kv: str(kv[0])):
        problems.append(
            f"category_id {cat!r} is not in 'categories' (known: {sorted(category_ids, key=str)}); "
            f"used by {len(ann_ids)} annotation(s), ids {', '.join(map(str, ann_ids[:5]))}"
            + (" ..." if len(ann_ids) > 5 else "")
        )
    if problems:
        raise DatasetValidationError(
            format_problems(f"{label} cannot be used: {len(problems)} problem(s):", problems), problems
        )
    if orphans:
        logger.warning(f"{label}: {orphans} annotation(s) refer to image ids not in 'images'; they are ignored.")
    return {"images": len(images), "annotations": len(annotations), "categories": len(categories), "orphans": orphans}
