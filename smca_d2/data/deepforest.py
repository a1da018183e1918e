"""Convert the tree-crown sample data shipped in the ``deepforest`` wheel to COCO format.

The PyPI wheel ``deepforest==2.1.0`` (MIT license, https://github.com/weecology/DeepForest)
carries a few real aerial RGB images (NEON Airborne Observation Platform, 10 cm per pixel) with
hand-drawn tree-crown boxes in Pascal VOC XML. This module reads them straight from the wheel,
which is a zip file: deepforest itself is neither installed nor imported.

* **train**: the two large Yellowstone (YELL) crops, cut into ``tile_size`` tiles that overlap
  by ``overlap`` (a fraction of ``tile_size``). A box cut by a tile border is clipped to the tile
  and kept only if at least ``min_visible`` of its area is inside it.
* **val**: the two 400 x 400 tiles from other sites, ``OSBS_029`` (Florida) and ``SOAP_061``
  (California), whole. Their labels (``Tree``; ``Alive``/``Dead`` for SOAP_061) all become the
  single category ``tree``.

Box coordinates in the XML are read as pixel edges (``xmax`` may equal the image width), so a
COCO box is ``[xmin, ymin, xmax - xmin, ymax - ymin]``.

Example:
    >>> from smca_d2.data.deepforest import prepare_deepforest
    >>> paths = prepare_deepforest("datasets/deepforest")  # downloads the wheel with pip
"""

import io
import json
import math
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

__all__ = [
    "CLASS_NAMES",
    "DEEPFOREST_VERSION",
    "TRAIN_SOURCES",
    "VAL_SOURCES",
    "download_wheel",
    "find_wheel",
    "prepare_deepforest",
    "read_voc",
    "tile_starts",
]

DEEPFOREST_VERSION = "2.1.0"
CLASS_NAMES = ("tree",)
#: Images (file stems in ``deepforest/data/``) that are tiled into the training split.
TRAIN_SOURCES = ("2019_YELL_2_541000_4977000_image_crop", "2019_YELL_2_528000_4978000_image_crop2")
#: Images used whole as the held-out evaluation split.
VAL_SOURCES = ("OSBS_029", "SOAP_061")

_DATA_DIR = "deepforest/data/"
_LICENSE_FILE = "LICENSE.deepforest.txt"
_INFO = {
    "description": f"Tree crowns, deepforest {DEEPFOREST_VERSION} sample data (NEON AOP RGB)",
    "url": "https://github.com/weecology/DeepForest",
    "version": DEEPFOREST_VERSION,
}
_LICENSES = [{"id": 1, "name": "MIT License", "url": "https://opensource.org/licenses/MIT"}]


def download_wheel(dest_dir: str) -> str:
    """Download the deepforest wheel with pip (no dependencies) into ``dest_dir``.

    Returns:
        Path of the downloaded ``.whl`` file.

    Raises:
        RuntimeError: If pip fails (no network, no pip, ...), with pip's last words.
    """
    os.makedirs(dest_dir, exist_ok=True)
    spec = f"deepforest=={DEEPFOREST_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec]
    cmd += ["-d", dest_dir]
    hint = (
        f"Download it on a machine with network access with\n"
        f"    pip download --no-deps deepforest=={DEEPFOREST_VERSION} -d DIR\n"
        f"and pass the wheel (or DIR) with --wheel / wheel_dir=."
    )
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"Could not run `{' '.join(cmd)}`: {e}\n{hint}") from e
    wheel = _wheel_in(dest_dir)
    if result.returncode != 0 or wheel is None:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise RuntimeError(
            f"Could not download deepforest=={DEEPFOREST_VERSION} with pip "
            f"(exit code {result.returncode}):\n{tail}\n{hint}"
        )
    return wheel


def _wheel_in(directory: str) -> Optional[str]:
    """The deepforest wheel of the expected version in ``directory``, if any."""
    prefix = f"deepforest-{DEEPFOREST_VERSION}-"
    names = sorted(n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".whl"))
    return os.path.join(directory, names[0]) if names else None


def find_wheel(wheel_dir: Optional[str] = None, download_dir: Optional[str] = None) -> str:
    """Locate the deepforest wheel, downloading it only when it is not at hand.

    Args:
        wheel_dir: A ``.whl`` file (used as is), or a directory searched for
            ``deepforest-2.1.0-*.whl`` and downloaded into when it has none.
        download_dir: Where to download when ``wheel_dir`` is None.

    Returns:
        Path of the wheel file.
    """
    if wheel_dir is not None and os.path.isfile(wheel_dir):
        return wheel_dir
    directory = wheel_dir if wheel_dir is not None else download_dir
    if directory is None:
        raise ValueError("find_wheel needs wheel_dir or download_dir")
    if os.path.isdir(directory):
        found = _wheel_in(directory)
        if found is not None:
            return found
    return download_wheel(directory)


def read_voc(xml_text: bytes) -> Tuple[str, int, int, np.ndarray, List[str]]:
    """Parse a Pascal VOC annotation.

    Returns:
        ``(filename, width, height, boxes, labels)`` with ``boxes`` an ``N x 4`` float array of
        ``xmin, ymin, xmax, ymax``.
    """
    root = ET.fromstring(xml_text)
    size = root.find("size")
    width, height = int(size.findtext("width")), int(size.findtext("height"))
    boxes, labels = [], []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        boxes.append([float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
        labels.append(obj.findtext("name", default="").strip())
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return root.findtext("filename", default=""), width, height, boxes, labels


def tile_starts(length: int, tile_size: int, overlap: float) -> List[int]:
    """Offsets of tiles covering ``[0, length)``, evenly spread, the last flush with the end.

    Neighbouring tiles overlap by at least ``overlap * tile_size`` pixels. A side shorter than
    ``tile_size`` gets a single tile at 0.
    """
    if length <= tile_size:
        return [0]
    stride = tile_size * (1.0 - overlap)
    n = math.ceil((length - tile_size) / stride - 1e-9) + 1
    return [round(i * (length - tile_size) / (n - 1)) for i in range(n)]


def _coco_number(value: float):
    """Integers stay integers in the json; other values keep two decimals."""
    return int(value) if float(value).is_integer() else round(float(value), 2)


def _annotation(ann_id: int, image_id: int, box: Sequence[float]) -> dict:
    x0, y0, x1, y1 = (float(v) for v in box)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "bbox": [_coco_number(v) for v in (x0, y0, x1 - x0, y1 - y0)],
        "area": _coco_number((x1 - x0) * (y1 - y0)),
        "iscrowd": 0,
    }


def _clip_to_window(boxes: np.ndarray, window: Sequence[int], min_visible: float, min_size: float) -> np.ndarray:
    """Boxes clipped to ``window = (x0, y0, x1, y1)``, in window coordinates.

    Boxes with less than ``min_visible`` of their area inside, or narrower or lower than
    ``min_size`` pixels after clipping, are dropped.
    """
    x0, y0, x1, y1 = window
    clipped = np.stack(
        [
            np.clip(boxes[:, 0], x0, x1),
            np.clip(boxes[:, 1], y0, y1),
            np.clip(boxes[:, 2], x0, x1),
            np.clip(boxes[:, 3], y0, y1),
        ],
        axis=1,
    )
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = (w >= min_size) & (h >= min_size) & (w * h >= min_visible * area)
    return clipped[keep] - np.array([x0, y0, x0, y0], dtype=np.float64)


class _Split:
    """Collects the images and annotations of one COCO split and writes them."""

    def __init__(self, root: str, name: str):
        self.root, self.name = root, name
        self.image_dir = os.path.join(root, name)
        os.makedirs(self.image_dir, exist_ok=True)
        self.images: List[dict] = []
        self.annotations: List[dict] = []

    def add(self, image: Image.Image, file_name: str, boxes: np.ndarray, **extra) -> None:
        image.save(os.path.join(self.image_dir, file_name), compress_level=1)
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "height": image.height, "width": image.width})
        self.images[-1].update(extra)
        for box in boxes:
            self.annotations.append(_annotation(len(self.annotations) + 1, image_id, box))

    def write(self) -> str:
        coco = {
            "info": dict(_INFO, description=f"{_INFO['description']}, {self.name} split"),
            "licenses": _LICENSES,
            "images": self.images,
            "annotations": self.annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)],
        }
        path = os.path.join(self.root, "annotations", f"{self.name}.json")
        with open(path, "w") as f:
            json.dump(coco, f)
        return path


def _load_source(wheel: zipfile.ZipFile, stem: str) -> Tuple[Image.Image, np.ndarray]:
    """Read one image (``<stem>.png``) and its boxes (``<stem>.xml``) from the wheel."""
    names = set(wheel.namelist())
    xml_name = f"{_DATA_DIR}{stem}.xml"
    if xml_name not in names:
        raise FileNotFoundError(f"{xml_name} is not in {wheel.filename}")
    _, width, height, boxes, _ = read_voc(wheel.read(xml_name))
    # OSBS_029.xml names OSBS_029.tif; the wheel also has the same pixels as OSBS_029.png.
    image = Image.open(io.BytesIO(wheel.read(f"{_DATA_DIR}{stem}.png"))).convert("RGB")
    if image.size != (width, height):
        raise ValueError(f"{stem}: image is {image.size}, the XML says {(width, height)}")
    return image, boxes


def prepare_deepforest(
    output_dir: str,
    *,
    wheel_dir: Optional[str] = None,
    tile_size: int = 400,
    overlap: float = 0.25,
    min_visible: float = 0.5,
    min_size: float = 2.0,
) -> Dict[str, str]:
    """Write the deepforest tree-crown data as a COCO dataset.

    Layout::

        output_dir/train/<source>_x<left>_y<top>.png   tiles of the YELL crops
        output_dir/val/OSBS_029.png, SOAP_061.png
        output_dir/annotations/{train,val}.json        one category: 1 "tree"
        output_dir/LICENSE.deepforest.txt              the wheel's MIT license

    Training images carry two extra keys, ``source`` and ``tile_origin`` (``[left, top]`` in the
    source image), which COCO tools ignore.

    Args:
        output_dir: Root of the dataset (created if missing).
        wheel_dir: The ``deepforest-2.1.0-*.whl`` file or a directory holding it. Without a wheel
            there, it is downloaded with pip (into ``wheel_dir``, or a temporary directory).
        tile_size: Side of the training tiles in pixels.
        overlap: Minimum overlap of neighbouring tiles, as a fraction of ``tile_size`` (the
            default 0.25 is 100 px, about the largest crown, so a crown cut by one tile border
            is whole in the neighbouring tile).
        min_visible: Keep a clipped box if at least this fraction of its area is in the tile.
        min_size: Drop clipped boxes narrower or lower than this many pixels.

    Returns:
        Paths ``train_json``, ``val_json``, ``train_images``, ``val_images``, ``wheel``.

    Raises:
        RuntimeError: If the wheel must be downloaded and pip cannot get it.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    with tempfile.TemporaryDirectory(prefix="deepforest-wheel-") as tmp:
        wheel_path = find_wheel(wheel_dir, download_dir=tmp)
        with zipfile.ZipFile(wheel_path) as wheel:
            paths = _convert(wheel, output_dir, tile_size, overlap, min_visible, min_size)
    paths["wheel"] = wheel_path if wheel_dir is not None else "(downloaded, then deleted)"
    return paths


def _convert(
    wheel: zipfile.ZipFile,
    output_dir: str,
    tile_size: int,
    overlap: float,
    min_visible: float,
    min_size: float,
) -> Dict[str, str]:
    """Write both splits from an open wheel; see :func:`prepare_deepforest`."""
    os.makedirs(os.path.join(output_dir, "annotations"), exist_ok=True)
    train, val = _Split(output_dir, "train"), _Split(output_dir, "val")
    for stem in TRAIN_SOURCES:
        image, boxes = _load_source(wheel, stem)
        for top in tile_starts(image.height, tile_size, overlap):
            for left in tile_starts(image.width, tile_size, overlap):
                right, bottom = min(left + tile_size, image.width), min(top + tile_size, image.height)
                window = (left, top, right, bottom)
                tile_boxes = _clip_to_window(boxes, window, min_visible, min_size)
                train.add(
                    image.crop(window),
                    f"{stem}_x{left:04d}_y{top:04d}.png",
                    tile_boxes,
                    source=stem,
                    tile_origin=[left, top],
                )
    for stem in VAL_SOURCES:
        image, boxes = _load_source(wheel, stem)
        window = (0, 0, image.width, image.height)
        val.add(image, f"{stem}.png", _clip_to_window(boxes, window, 0.0, 1e-6), source=stem)

    license_names = [n for n in wheel.namelist() if ".dist-info/" in n and os.path.basename(n) == "LICENSE"]
    if license_names:
        with open(os.path.join(output_dir, _LICENSE_FILE), "wb") as f:
            f.write(wheel.read(license_names[0]))
    return {
        "train_json": train.write(),
        "val_json": val.write(),
        "train_images": train.image_dir,
        "val_images": val.image_dir,
    }
