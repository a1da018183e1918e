"""A generated dataset with the size and the statistics of COCO train2017, for tests and benchmarks.

What costs time and memory when a dataset is loaded is its shape: the number of images and boxes,
the size of the json (most of it polygon coordinates) and the number of image files. This module
writes a COCO instances json and image files with COCO train2017's shape, from a seed, without
any download:

* 118,287 images and 860,001 boxes by default (``num_images`` scales both);
* the 80 thing categories of COCO with their non-contiguous ids (1 to 90) and names, ``person``
  about 30 % of the boxes and a long tail of rare classes;
* image sizes like COCO's: mostly 640 pixels on the longer side, the other side varying
  (480 and 427 most often), about three quarters landscape;
* boxes per image with COCO's skew: about 1 % of the images have none, the mean is about 7.3
  and a few images have dozens; box areas about 41 % small (below 32 x 32), 34 % medium and
  24 % large (above 96 x 96), as COCO's evaluation counts them;
* about 1 % of the boxes ``iscrowd``, with an uncompressed RLE mask (as COCO stores crowds);
  every other box has one polygon ``segmentation`` with more points for larger boxes, enough
  that the json has about the size of COCO's (450 MB at full size);
* one small real JPEG per image whose header has the json's ``height`` and ``width`` (a flat
  colour, encoded once per distinct size; each file is written on its own, no links).

The content is meaningless: nothing can be learned from it. The layout is::

    <root>/annotations/instances.json
    <root>/images/000000000001.jpg ...

Example:
    >>> from smca_d2.data.coco_sized import make_coco_sized_dataset
    >>> paths = make_coco_sized_dataset("datasets/coco_sized", num_images=1000)
    >>> paths["json_file"]
    'datasets/coco_sized/annotations/instances.json'
"""

import datetime
import io
import json
import logging
import os
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

__all__ = ["COCO_TRAIN2017_BOXES", "COCO_TRAIN2017_IMAGES", "coco_thing_categories", "make_coco_sized_dataset"]

logger = logging.getLogger(__name__)

#: The size of COCO's train2017 split.
COCO_TRAIN2017_IMAGES = 118287
COCO_TRAIN2017_BOXES = 860001

# Statistics of COCO train2017 that the generator reproduces (approximately).
_EMPTY_IMAGE_FRACTION = 0.0086  # images without any annotation
_CROWD_FRACTION = 0.0106  # annotations with iscrowd=1
_SIZE_CLASS_FRACTIONS = (0.414, 0.343, 0.243)  # small, medium, large boxes
_PERSON_FRACTION = 0.30
_LANDSCAPE_FRACTION = 0.76  # of the images that are not square
_MAX_BOXES_PER_IMAGE = 93
# Polygon points per box grow with the square root of its perimeter; the factor makes the json
# about as large as COCO's.
_POINTS_PER_SQRT_PERIMETER = 1.42
_MIN_POINTS, _MAX_POINTS = 6, 120

_CHUNK_IMAGES = 4000  # images whose annotations are made and written at once
_LOG_PERIOD = 10.0  # seconds between progress lines


def coco_thing_categories() -> List[Dict]:
    """The 80 categories of COCO instances: ``[{"id": 1, "name": "person", "supercategory": ...}]``
    with COCO's ids (1 to 90, with gaps)."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [{"supercategory": "thing", "id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]


def _image_sizes(rng: np.random.Generator, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """(heights, widths) of ``n`` images: the longer side is 640 for most images, the shorter one
    3/4 or 2/3 of it for most of the others, the rest spread out; about 3/4 of them landscape."""
    longer = np.where(rng.random(n) < 0.96, 640, rng.integers(300, 640, n))
    kind = rng.choice(4, size=n, p=[0.42, 0.33, 0.04, 0.21])
    ratio = np.select(
        [kind == 0, kind == 1, kind == 2],
        [0.75, rng.choice([0.664, 0.666, 0.667, 0.669], size=n), 1.0],
        rng.uniform(0.45, 1.0, n),
    )
    shorter = np.maximum(1, np.round(longer * ratio)).astype(np.int64)
    landscape = rng.random(n) < _LANDSCAPE_FRACTION
    heights = np.where(landscape, shorter, longer)
    widths = np.where(landscape, longer, shorter)
    return heights, widths


def _boxes_per_image(rng: np.random.Generator, n: int, total: int) -> np.ndarray:
    """Boxes of each of ``n`` images, ``total`` in all: none for about 1 % of the images, one plus
    a negative-binomial count for the others (COCO's long tail), adjusted to the exact total."""
    counts = np.zeros(n, dtype=np.int64)
    has_boxes = rng.random(n) >= _EMPTY_IMAGE_FRACTION
    if total > 0 and not has_boxes.any():
        has_boxes[rng.integers(n)] = True
    if total < has_boxes.sum():
        has_boxes[:] = False
        has_boxes[rng.choice(n, size=total, replace=False)] = True
    k = int(has_boxes.sum())
    if k == 0:
        return counts
    mean_extra = total / k - 1
    dispersion = 1.3  # the negative binomial's r: smaller is more skewed
    extra = rng.negative_binomial(dispersion, dispersion / (dispersion + mean_extra), size=k) if mean_extra > 0 else 0
    per_image = np.minimum(1 + extra, _MAX_BOXES_PER_IMAGE)
    # Add or remove single boxes at random (never below one, never above the cap) until the sum
    # is the total.
    difference = total - int(per_image.sum())
    while difference:
        step = 1 if difference > 0 else -1
        allowed = np.flatnonzero(per_image < _MAX_BOXES_PER_IMAGE if step > 0 else per_image > 1)
        chosen = rng.choice(allowed, size=min(abs(difference), len(allowed)), replace=False)
        per_image[chosen] += step
        difference -= step * len(chosen)
    counts[has_boxes] = per_image
    return counts


def _category_weights(rng: np.random.Generator, num_categories: int) -> np.ndarray:
    """Probability of each category (in the order of :func:`coco_thing_categories`): ``person``
    (the first) about 30 %, the others a long tail in a seeded order."""
    tail = 1.0 / np.arange(1, num_categories) ** 1.1
    tail = rng.permutation(tail) / tail.sum() * (1 - _PERSON_FRACTION)
    return np.concatenate([[_PERSON_FRACTION], tail])


def _box_geometry(rng: np.random.Generator, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """XYWH boxes inside images of the given sizes (one box per entry), with COCO's share of
    small, medium and large areas."""
    n = len(heights)
    image_area = (heights * widths).astype(np.float64)
    size_class = rng.choice(3, size=n, p=_SIZE_CLASS_FRACTIONS)
    low = np.array([16.0, 32.0**2, 96.0**2])[size_class]
    high = np.minimum(np.array([32.0**2, 96.0**2, np.inf])[size_class], 0.95 * image_area)
    area = np.exp(rng.uniform(np.log(low), np.log(np.maximum(high, low + 1))))
    aspect = np.exp(rng.normal(0.0, 0.55, n))  # width / height
    bw = np.minimum(np.sqrt(area * aspect), widths)
    bh = np.minimum(area / bw, heights)
    bw, bh = np.maximum(np.round(bw, 2), 1.0), np.maximum(np.round(bh, 2), 1.0)
    x0 = np.floor(rng.uniform(0, 1, n) * (widths - bw) * 100) / 100
    y0 = np.floor(rng.uniform(0, 1, n) * (heights - bh) * 100) / 100
    return np.stack([x0, y0, bw, bh], axis=1)


def _polygons(rng: np.random.Generator, boxes: np.ndarray) -> Tuple[List[List[float]], np.ndarray]:
    """One polygon per box, spanning it exactly (so the box is the polygon's extent): a jittered
    ellipse, with more points for larger boxes. Returns the flat ``[x0, y0, x1, y1, ...]`` lists
    (rounded to 2 decimals, as COCO's) and the polygon areas."""
    num_points = np.clip(
        np.round(_POINTS_PER_SQRT_PERIMETER * np.sqrt(2 * (boxes[:, 2] + boxes[:, 3]))), _MIN_POINTS, _MAX_POINTS
    ).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(num_points)[:-1]])
    owner = np.repeat(np.arange(len(boxes)), num_points)
    # Angles sorted within each polygon: sort (owner + fraction) once for all polygons.
    angles = np.sort(owner + rng.random(len(owner))) - owner
    angles *= 2 * np.pi
    radius = rng.uniform(0.7, 1.0, len(owner))
    px, py = radius * np.cos(angles), radius * np.sin(angles)
    # Stretch each polygon to its box.
    for values, origin, extent in ((px, boxes[:, 0], boxes[:, 2]), (py, boxes[:, 1], boxes[:, 3])):
        low, high = np.minimum.reduceat(values, starts), np.maximum.reduceat(values, starts)
        scale = extent / np.maximum(high - low, 1e-9)
        values -= low[owner]
        values *= scale[owner]
        values += origin[owner]
        np.clip(values, origin[owner], (origin + extent)[owner], out=values)
    px, py = np.round(px, 2), np.round(py, 2)
    # Shoelace area within each polygon (its last point closes on its first).
    following = np.arange(len(owner)) + 1
    following[np.cumsum(num_points) - 1] = starts
    cross = px * py[following] - px[following] * py
    areas = np.abs(np.add.reduceat(cross, starts)) / 2
    coords = np.stack([px, py], axis=1).ravel().tolist()
    ends = starts + num_points
    return [coords[2 * s : 2 * e] for s, e in zip(starts.tolist(), ends.tolist())], areas


def _crowd_rle(box: np.ndarray, height: int, width: int) -> Tuple[Dict, List[int]]:
    """An uncompressed (column-major) RLE of the box's pixels, as COCO stores crowd regions, and
    the integer box it covers."""
    x0, y0 = int(box[0]), int(box[1])
    x1 = min(width, max(x0 + 1, int(round(box[0] + box[2]))))
    y1 = min(height, max(y0 + 1, int(round(box[1] + box[3]))))
    inside = y1 - y0
    counts = [x0 * height + y0]
    for _ in range(x1 - x0 - 1):
        counts += [inside, height - inside]
    counts += [inside, (height - y1) + (width - x1) * height]
    return {"counts": counts, "size": [height, width]}, [x0, y0, x1 - x0, y1 - y0]


def _jpeg_bytes(height: int, width: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (124, 116, 104)).save(buffer, "JPEG", quality=75, optimize=True)
    return buffer.getvalue()


class _Progress:
    """Logs ``<what> done/total`` at most every ``_LOG_PERIOD`` seconds, with an ETA."""

    def __init__(self, what: str, total: int):
        self.what, self.total = what, total
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < _LOG_PERIOD or done >= self.total:
            return
        self.last = now
        eta = (now - self.start) / max(done, 1) * (self.total - done)
        logger.info(f"{self.what} {done}/{self.total}, ETA={datetime.timedelta(seconds=int(eta))}")


def make_coco_sized_dataset(
    root: str,
    num_images: int = COCO_TRAIN2017_IMAGES,
    num_boxes: Optional[int] = None,
    seed: int = 0,
    write_images: bool = True,
) -> Dict[str, str]:
    """Write a dataset with COCO train2017's statistics under ``root`` (see the module's doc).

    Args:
        root: the dataset folder; ``annotations/instances.json`` and ``images/`` are written in it
            (files of an earlier run are overwritten, other files are left alone).
        num_images: the number of images (COCO train2017's by default).
        num_boxes: the number of boxes; by default COCO's boxes per image times ``num_images``.
        seed: the same seed and sizes give the same files, byte for byte.
        write_images: False writes the json alone.

    Returns:
        ``{"json_file": ..., "image_root": ...}``
    """
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if num_boxes is None:
        num_boxes = round(COCO_TRAIN2017_BOXES * num_images / COCO_TRAIN2017_IMAGES)
    rng = np.random.default_rng(seed)
    image_root = os.path.join(root, "images")
    json_file = os.path.join(root, "annotations", "instances.json")
    os.makedirs(image_root, exist_ok=True)
    os.makedirs(os.path.dirname(json_file), exist_ok=True)

    categories = coco_thing_categories()
    category_ids = np.array([c["id"] for c in categories])
    category_weights = _category_weights(rng, len(categories))
    # Sparse ids as in COCO (image ids up to 581929), images listed in no particular order.
    id_range = max(581929, 2 * num_images)
    image_ids = np.sort(rng.choice(id_range, size=num_images, replace=False) + 1)
    order = rng.permutation(num_images)
    heights, widths = _image_sizes(rng, num_images)
    boxes_per_image = _boxes_per_image(rng, num_images, num_boxes)

    images = []
    for i in order.tolist():
        name = f"{int(image_ids[i]):012d}.jpg"
        images.append(
            {
                "license": int(1 + image_ids[i] % 8),
                "file_name": name,
                "coco_url": f"https://example.invalid/coco_sized/{name}",
                "height": int(heights[i]),
                "width": int(widths[i]),
                "date_captured": f"2013-11-{1 + image_ids[i] % 28:02d} 12:{image_ids[i] % 60:02d}:00",
                "flickr_url": f"https://example.invalid/flickr/{image_ids[i]}_{image_ids[i] % 9973:04x}_z.jpg",
                "id": int(image_ids[i]),
            }
        )
    next_annotation_id = 1
    progress = _Progress("wrote the annotations of images", num_images)
    with open(json_file, "w") as f:
        f.write('{"info": ' + json.dumps({"description": "COCO-sized generated dataset (smca_d2)", "seed": seed}))
        f.write(', "licenses": ' + json.dumps([{"id": i, "name": f"license {i}", "url": ""} for i in range(1, 9)]))
        f.write(', "images": [' + ", ".join(json.dumps(image) for image in images) + '], "annotations": [')
        first = True
        for chunk_start in range(0, num_images, _CHUNK_IMAGES):
            chunk = order[chunk_start : chunk_start + _CHUNK_IMAGES]
            counts = boxes_per_image[chunk]
            owner = np.repeat(chunk, counts)
            if not len(owner):
                continue
            h, w = heights[owner], widths[owner]
            boxes = _box_geometry(rng, h, w)
            polygons, areas = _polygons(rng, boxes)
            crowd = rng.random(len(owner)) < _CROWD_FRACTION
            cats = rng.choice(category_ids, size=len(owner), p=category_weights)
            step = rng.integers(1, 4, len(owner))
            parts = []
            for j in range(len(owner)):
                if crowd[j]:
                    segmentation, bbox = _crowd_rle(boxes[j], int(h[j]), int(w[j]))
                    area = float(bbox[2] * bbox[3])
                else:
                    segmentation, bbox, area = [polygons[j]], boxes[j].tolist(), round(float(areas[j]), 4)
                parts.append(
                    json.dumps(
                        {
                            "segmentation": segmentation,
                            "area": area,
                            "iscrowd": int(crowd[j]),
                            "image_id": int(image_ids[owner[j]]),
                            "bbox": bbox,
                            "category_id": int(cats[j]),
                            "id": next_annotation_id,
                        }
                    )
                )
                next_annotation_id += int(step[j])
            f.write(("" if first else ", ") + ", ".join(parts))
            first = False
            progress.update(chunk_start + len(chunk))
        f.write('], "categories": ' + json.dumps(categories) + "}")
    logger.info(f"Wrote {json_file}: {num_images} images, {num_boxes} boxes.")

    if write_images:
        encoded: Dict[Tuple[int, int], bytes] = {}
        progress = _Progress("wrote image files", num_images)
        for k, image in enumerate(images):
            size = (image["height"], image["width"])
            if size not in encoded:
                encoded[size] = _jpeg_bytes(*size)
            with open(os.path.join(image_root, image["file_name"]), "wb") as f:
                f.write(encoded[size])
            progress.update(k + 1)
        logger.info(f"Wrote {num_images} image files ({len(encoded)} distinct sizes) to {image_root}.")
    return {"json_file": json_file, "image_root": image_root}
