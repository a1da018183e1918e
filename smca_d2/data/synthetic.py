"""Deterministic generator of a small COCO-format detection dataset of shapes.

The data is meant for smoke tests and quick convergence checks of a detector: it is small, fast to
make and hard enough that a broken model does not look fine. Every image has

* a cluttered background: a colour gradient, random lines and small blobs (which are *not*
  objects: they are all smaller than the smallest object) and Gaussian noise over everything;
* 1 to 6 objects of :data:`CLASS_NAMES`, 12 to 60 pixels in size, which may partly occlude each
  other. An object's box is always its full extent, also where a later object hides part of it,
  and no object is left more than ``1 - MIN_VISIBLE_FRACTION`` hidden (a placement that would do
  so is tried again elsewhere, then given up).

Example:
    >>> from smca_d2.data.synthetic import make_synthetic_coco
    >>> paths = make_synthetic_coco("datasets/synthetic", num_train=4000, num_val=100)
    >>> paths["train_json"]
    'datasets/synthetic/annotations/train.json'
"""

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASS_NAMES", "MIN_VISIBLE_FRACTION", "make_synthetic_coco", "render_image"]

#: Category names; category ``i + 1`` is ``CLASS_NAMES[i]`` (COCO ids start at 1).
CLASS_NAMES = ("circle", "square", "triangle", "striped_rectangle", "checkered_ellipse")

#: An object must keep at least this fraction of its pixels visible.
MIN_VISIBLE_FRACTION = 0.3

_MIN_SIZE, _MAX_SIZE = 12, 60  # range of object sides in pixels
_MAX_PLACEMENT_TRIES = 10


def _pixel_grid(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)`` of an ``h x w`` window."""
    return np.mgrid[0:h, 0:w].astype(np.float32) + 0.5


def _shape_mask(category: int, rng: np.random.Generator) -> np.ndarray:
    """Draw the boolean mask of one object of ``category`` (1-based), cropped to its extent."""
    name = CLASS_NAMES[category - 1]
    if name in ("circle", "square"):
        h = w = int(rng.integers(_MIN_SIZE, _MAX_SIZE + 1))
    elif name == "triangle":
        w = int(rng.integers(_MIN_SIZE, _MAX_SIZE + 1))
        h = int(np.clip(round(w * rng.uniform(0.8, 1.2)), _MIN_SIZE, _MAX_SIZE))
    else:  # elongated shapes: the aspect ratio tells them apart from square and circle
        long_side = int(rng.integers(18, _MAX_SIZE + 1))
        short_side = max(_MIN_SIZE, int(round(long_side / rng.uniform(1.4, 2.5))))
        h, w = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)

    yy, xx = _pixel_grid(h, w)
    if name == "circle" or name == "checkered_ellipse":
        mask = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2 <= 1.0
    elif name == "triangle":
        mask = np.abs(xx - w / 2) <= (w / 2) * (yy / h) + 0.5  # apex at the top centre
        mask = np.rot90(mask, k=int(rng.integers(4)))  # point up, left, down or right
    else:
        mask = np.ones((h, w), dtype=bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.ascontiguousarray(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])


def _contrasting_colour(rng: np.random.Generator, reference: np.ndarray) -> np.ndarray:
    """A random colour that stands out against ``reference`` (a float RGB triple)."""
    colour = rng.integers(0, 256, size=3)
    for _ in range(8):
        if np.abs(colour - reference).sum() >= 150:
            break
        colour = rng.integers(0, 256, size=3)
    return colour.astype(np.float32)


def _shape_texture(category: int, mask: np.ndarray, background: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colours (``h x w x 3`` float) of an object; textured classes get two colours."""
    h, w = mask.shape
    first = _contrasting_colour(rng, background)
    name = CLASS_NAMES[category - 1]
    if name not in ("striped_rectangle", "checkered_ellipse"):
        top, bottom = rng.uniform(0.8, 1.2, size=2)
        shade = np.linspace(top, bottom, h, dtype=np.float32)[:, None, None]  # smooth lighting
        return np.broadcast_to(first, (h, w, 3)) * shade
    second = _contrasting_colour(rng, first)
    yy, xx = _pixel_grid(h, w)
    period = float(rng.integers(3, 7))
    if name == "striped_rectangle":
        angle = np.deg2rad(rng.choice([0.0, 45.0, 90.0, 135.0]))
        pattern = ((xx * np.cos(angle) + yy * np.sin(angle)) // period) % 2 == 0
    else:
        pattern = ((xx // period) + (yy // period)) % 2 == 0
    return np.where(pattern[..., None], first, second)


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Gradient with random lines and small blobs (``h x w x 3`` uint8)."""
    start, end = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = _pixel_grid(h, w)
    t = xx * np.cos(angle) + yy * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    image = Image.fromarray((start + t[..., None] * (end - start)).astype(np.uint8))

    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):
        points = [tuple(int(v) for v in rng.integers(0, (w, h))) for _ in range(2)]
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line(points, fill=colour, width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(3, 11))):
        cx, cy = (int(v) for v in rng.integers(0, (w, h)))
        r = int(rng.integers(1, 4))  # at most 7 px across, below the smallest object
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    return np.asarray(image)


def render_image(height: int, width: int, rng: np.random.Generator) -> Tuple[np.ndarray, List[Tuple[int, List[int]]]]:
    """Render one image and its objects.

    Args:
        height: Image height in pixels (at least ``60``, the largest object).
        width: Image width in pixels (at least ``60``).
        rng: Source of randomness; the result depends only on its state.

    Returns:
        ``(image, objects)``: an ``height x width x 3`` uint8 RGB array and, for each object in
        drawing order, ``(category_id, [x, y, w, h])`` with the object's full (unoccluded) box in
        integer pixels.
    """
    image = _background(height, width, rng).astype(np.float32)
    owner = np.full((height, width), -1, dtype=np.int32)  # index of the object seen at a pixel
    visible: List[int] = []  # visible pixels of each placed object
    total: List[int] = []
    objects: List[Tuple[int, List[int]]] = []
    for _ in range(int(rng.integers(1, 7))):
        category = int(rng.integers(1, len(CLASS_NAMES) + 1))
        mask = _shape_mask(category, rng)
        h, w = mask.shape
        for _ in range(_MAX_PLACEMENT_TRIES):
            y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            hidden = owner[y0 : y0 + h, x0 : x0 + w][mask]
            covered = np.bincount(hidden[hidden >= 0], minlength=len(objects))
            remaining = np.asarray(visible) - covered
            if np.all(remaining >= MIN_VISIBLE_FRACTION * np.asarray(total)):
                break
        else:
            continue  # no placement leaves every earlier object visible enough: drop this one
        window = image[y0 : y0 + h, x0 : x0 + w]
        texture = _shape_texture(category, mask, window[mask].mean(axis=0), rng)
        window[mask] = texture[mask]
        owner[y0 : y0 + h, x0 : x0 + w][mask] = len(objects)
        visible = [int(v) for v in remaining] + [int(mask.sum())]
        total.append(int(mask.sum()))
        objects.append((category, [x0, y0, w, h]))

    image += rng.standard_normal(size=image.shape, dtype=np.float32) * rng.uniform(3.0, 12.0)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objects


def _render_to_file(job) -> Tuple[int, int, list]:
    """Render image ``index`` of a split and write it; returns (height, width, objects)."""
    image_dir, seed, split_index, index, image_size, size_jitter = job
    # One generator per image: an image depends only on (seed, split, index).
    rng = np.random.default_rng([seed, split_index, index])
    height, width = (int(rng.integers(s - size_jitter, s + size_jitter + 1)) for s in image_size)
    pixels, objects = render_image(height, width, rng)
    # High-quality JPEG without chroma subsampling: much faster to write than PNG, and
    # without the colour bleeding of subsampled chroma on the shapes' edges.
    Image.fromarray(pixels).save(os.path.join(image_dir, f"{index + 1:06d}.jpg"), quality=95, subsampling=0)
    return height, width, objects


def _render_all(jobs: list, workers: int) -> list:
    """``_render_to_file`` over ``jobs``, in order; in ``workers`` forked processes when > 1
    (each image has its own generator, so the result does not depend on ``workers``)."""
    if workers > 1 and len(jobs) > 1 and "fork" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            return list(pool.map(_render_to_file, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    return [_render_to_file(job) for job in jobs]


def _write_split(
    root: str,
    split: str,
    split_index: int,
    num_images: int,
    image_size: Tuple[int, int],
    size_jitter: int,
    seed: int,
    workers: int = 1,
) -> str:
    """Render the images of one split and write them with their COCO json; returns the json path."""
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    jobs = [(image_dir, seed, split_index, index, image_size, size_jitter) for index in range(num_images)]
    images, annotations = [], []
    for index, (height, width, objects) in enumerate(_render_all(jobs, workers)):
        image_id = index + 1
        file_name = f"{image_id:06d}.jpg"
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for category, box in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": f"smca_d2 synthetic shapes ({split})", "version": "1.0", "seed": seed},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES)],
    }
    json_path = os.path.join(root, "annotations", f"{split}.json")
    with open(json_path, "w") as f:
        json.dump(coco, f)
    return json_path


def make_synthetic_coco(
    output_dir: str,
    *,
    num_train: int = 4000,
    num_val: int = 100,
    image_size: Sequence[int] = (128, 128),
    size_jitter: int = 32,
    seed: int = 0,
    workers: Optional[int] = None,
) -> Dict[str, str]:
    """Write the synthetic dataset in COCO format.

    Layout::

        output_dir/train/000001.jpg ...
        output_dir/val/000001.jpg ...
        output_dir/annotations/train.json
        output_dir/annotations/val.json

    Existing files are overwritten; stale images from an earlier, larger run are left in place
    but are not listed in the json files.

    Args:
        output_dir: Root directory of the dataset (created if missing).
        num_train: Number of training images.
        num_val: Number of validation images.
        image_size: ``(height, width)`` around which image sizes are drawn.
        size_jitter: Each side is drawn uniformly from ``[s - size_jitter, s + size_jitter]``;
            ``0`` gives images of exactly ``image_size``. The defaults give 96 to 160 pixels.
        seed: Random seed; the same seed gives byte-identical json files and images.
        workers: processes rendering the images (default: the CPU count, at most 8); the
            output does not depend on it.

    Returns:
        Paths ``train_json``, ``val_json``, ``train_images`` and ``val_images``.

    Raises:
        ValueError: If an image side could be smaller than the largest object (60 pixels).
    """
    image_size = tuple(int(s) for s in image_size)
    if len(image_size) != 2 or size_jitter < 0 or min(image_size) - size_jitter < _MAX_SIZE:
        raise ValueError(
            f"image sides must be at least {_MAX_SIZE} px: got image_size={image_size}, size_jitter={size_jitter}"
        )
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    os.makedirs(os.path.join(output_dir, "annotations"), exist_ok=True)
    paths = {}
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        paths[f"{split}_json"] = _write_split(
            output_dir, split, split_index, count, image_size, size_jitter, seed, workers
        )
        paths[f"{split}_images"] = os.path.join(output_dir, split)
    return paths
