"""Checks of a detection dataset before training, and an image reader that handles odd files.

Policy (see "What happens when" in README.md):

* **refused before training**, with a :class:`DatasetValidationError` that names the dataset, the
  json file and the offending images / ids: a missing json or image folder
  (:class:`DatasetNotFoundError`, with how to prepare the dataset), a json that does not parse,
  duplicate image / annotation / category ids, category ids not in ``categories``, images without
  a positive ``height``/``width``, and (``check_images=True``) image files that are missing,
  unreadable, truncated or whose size differs from the json;
* **fixed, with a logged count**: boxes partly outside the image are clipped to it; boxes with
  NaN/inf coordinates, zero or negative width/height, or wholly outside the image are dropped;
  images left without annotations are dropped from training (``filter_empty``) and kept for
  evaluation;
* **converted when read** (:func:`read_image`): EXIF orientation is applied, grayscale / palette /
  CMYK images become RGB, 16-bit images are scaled to 8 bits (``value / 257``) instead of being
  clipped to white, and transparent pixels (RGBA, LA, palette with transparency) are composited
  over white instead of showing whatever colour the file stores under them.

:func:`validated_dataset_dicts` is a drop-in replacement for detectron2's
``get_detection_dataset_dicts`` that runs all of this; ``train_net.py`` uses it for every config
whose datasets use the detectron2 function. In a LazyConfig::

    dataloader.train.dataset = L(validated_dataset_dicts)(names="my_train", verify_images=True)
"""
import concurrent.futures
import copy
import difflib
import itertools
import json
import logging
import math
import os
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

__all__ = [
    "DatasetNotFoundError",
    "DatasetValidationError",
    "RobustDatasetMapper",
    "check_dataset_files",
    "check_image_files",
    "image_size",
    "read_image",
    "sanitize_annotations",
    "validate_coco_json",
    "validated_dataset_dicts",
]

logger = logging.getLogger(__name__)

#: Problems listed in full in an error message; the rest are counted.
MAX_LISTED = 20

# How to obtain the datasets that smca_d2 knows (folder under $DETECTRON2_DATASETS -> hint).
_PREPARE_HINTS = {
    "synthetic": "python datasets/prepare_synthetic.py  (about 10 s, no network)",
    "deepforest": "python datasets/prepare_deepforest.py  (one 20 MB pip download)",
    "coco": "download COCO 2017 as described in datasets/README.md",
}

_ORIENTATION_TAG = 274  # EXIF "Orientation"
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # these swap width and height


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not registered, or its json file / image folder does not exist."""


class DatasetValidationError(ValueError):
    """A dataset has problems that would make training fail or train on wrong data."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems)


def _format_problems(header: str, problems: Sequence[str], footer: str = "") -> str:
    shown = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return f"{header}\n{shown}{more}" + (f"\n{footer}" if footer else "")


def _datasets_root() -> str:
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def _prepare_hint(path: str) -> str:
    root = os.path.abspath(_datasets_root())
    rel = os.path.relpath(os.path.abspath(path), root)
    folder = rel.split(os.sep)[0] if not rel.startswith("..") else ""
    how = _PREPARE_HINTS.get(folder)
    where = f"DETECTRON2_DATASETS is {os.getenv('DETECTRON2_DATASETS', '<unset>, so datasets/ is used')}"
    if how:
        return f"Prepare it with `{how}`, or point DETECTRON2_DATASETS at the folder that holds {folder}/ ({where})."
    return (
        "Check the path given to register_coco_instances(), or set DETECTRON2_DATASETS to the folder "
        f"that holds the data ({where})."
    )


# ---------------------------------------------------------------------------------------------
# Existence of the files a dataset needs
# ---------------------------------------------------------------------------------------------
def check_dataset_files(names) -> None:
    """Fail early, before any model is built, if a dataset is not registered or its json file or
    image folder is missing.

    Raises:
        DatasetNotFoundError: naming the dataset, the missing path and how to prepare it.
    """
    names = [names] if isinstance(names, str) else list(names)
    registered = DatasetCatalog.list()
    for name in names:
        if name not in registered:
            close = difflib.get_close_matches(name, registered, n=3, cutoff=0.6)
            smca = sorted(n for n in registered if n.startswith("smca_"))
            raise DatasetNotFoundError(
                f"Dataset '{name}' is not registered."
                + (f" Did you mean {', '.join(repr(c) for c in close)}?" if close else "")
                + f" Datasets prepared by this repository: {', '.join(smca)}. A COCO-format dataset "
                "is registered with detectron2.data.datasets.register_coco_instances(name, {}, json, images)."
            )
        meta = MetadataCatalog.get(name)
        for what, path, is_dir in (
            ("annotation file", meta.get("json_file", None), False),
            ("image folder", meta.get("image_root", None), True),
        ):
            if path is None:
                continue
            ok = os.path.isdir(path) if is_dir else os.path.isfile(path)
            if not ok and not PathManager.exists(str(path)):
                raise DatasetNotFoundError(
                    f"Dataset '{name}': the {what} {path} does not exist. {_prepare_hint(str(path))}"
                )


# ---------------------------------------------------------------------------------------------
# The json file itself
# ---------------------------------------------------------------------------------------------
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
            problems.append(f"image id {img.get('id')} ({img.get('file_name')}): height={h!r}, width={w!r} (need positive integers)")
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
            problems.append(f"annotation id {ann.get('id')} (image id {ann.get('image_id')}): bbox {bbox!r} is not four numbers")
    for cat, ann_ids in sorted(unknown.items(), key=lambda kv: str(kv[0])):
        problems.append(
            f"category_id {cat!r} is not in 'categories' (known: {sorted(category_ids, key=str)}); "
            f"used by {len(ann_ids)} annotation(s), ids {', '.join(map(str, ann_ids[:5]))}"
            + (" ..." if len(ann_ids) > 5 else "")
        )
    if problems:
        raise DatasetValidationError(
            _format_problems(f"{label} cannot be used: {len(problems)} problem(s):", problems), problems
        )
    if orphans:
        logger.warning(f"{label}: {orphans} annotation(s) refer to image ids not in 'images'; they are ignored.")
    return {"images": len(images), "annotations": len(annotations), "categories": len(categories), "orphans": orphans}


# ---------------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------------
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
            if num_classes is not None and not (isinstance(category, (int, np.integer)) and 0 <= category < num_classes):
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
            _format_problems(f"Dataset '{dataset_name}' cannot be used: {len(problems)} problem(s):", problems), problems
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


def _log_box_stats(dataset_name: str, num_images: int, num_boxes: int, stats: Dict) -> None:
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


# ---------------------------------------------------------------------------------------------
# Image files
# ---------------------------------------------------------------------------------------------
def image_size(file_name: str) -> Tuple[int, int]:
    """(height, width) of an image as :func:`read_image` returns it (EXIF orientation applied),
    reading only the file's header."""
    with PathManager.open(file_name, "rb") as f:
        with Image.open(f) as image:
            width, height = image.size
            if _orientation(image) in _TRANSPOSING_ORIENTATIONS:
                width, height = height, width
    return height, width


def _is_loaded(image: Image.Image) -> bool:
    try:
        return image.im is not None  # Pillow >= 11 asserts instead of returning None
    except Exception:
        return False


def _orientation(image: Image.Image) -> Optional[int]:
    """The EXIF orientation, without decoding the pixels (Pillow's ``getexif`` decodes a whole PNG
    to look for an EXIF chunk after the pixel data; only one before it is read here, unless the
    image is already loaded)."""
    try:
        if image.format == "PNG" and not _is_loaded(image):
            raw = image.info.get("exif")
            if not raw:
                return None
            exif = Image.Exif()
            exif.load(raw)
            return exif.get(_ORIENTATION_TAG)
        return image.getexif().get(_ORIENTATION_TAG)
    except Exception:  # a broken EXIF block: detectron2 ignores it too
        return None


def _tail_looks_truncated(f, image_format: Optional[str]) -> bool:
    """A cheap test for a cut-off JPEG or PNG: its end marker is missing from the last bytes."""
    marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND", "MPO": b"\xff\xd9"}.get(image_format)
    if marker is None:
        return False
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 64))
    return marker not in f.read()


def _check_one_image(record: Dict, verify: bool) -> Optional[str]:
    """Problem with one record's image file, or None."""
    file_name = record["file_name"]
    if not os.path.isfile(file_name) and not PathManager.isfile(file_name):
        return f"{file_name}: file not found"
    try:
        with PathManager.open(file_name, "rb") as f:
            with Image.open(f) as image:
                width, height = image.size
                if verify or _tail_looks_truncated(f, image.format):
                    image.load()  # full decode: raises on truncated or corrupt data
                orientation = _orientation(image)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"{file_name}: cannot read the image ({type(e).__name__}: {e})"
    stored = (height, width)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    expected = (record.get("height"), record.get("width"))
    if None not in expected and expected != (height, width):
        hint = ""
        if orientation in _TRANSPOSING_ORIENTATIONS and expected == stored:
            hint = (
                f" The json has the size of the stored pixels, but the EXIF orientation tag ({orientation}) "
                "rotates the image when it is read: the boxes were probably drawn on the unrotated image. "
                "Remove the EXIF orientation tag (or rotate the pixels and boxes) so that they agree."
            )
        return (
            f"{file_name}: the image is {width}x{height} (width x height, after EXIF orientation) but the "
            f"json says {expected[1]}x{expected[0]}.{hint}"
        )
    return None


def check_image_files(dataset_dicts: Sequence[Dict], dataset_name: str = "", *, verify: bool = False,
                      num_threads: int = 8) -> None:
    """Check that every image exists, can be opened, is not truncated and has the size the json
    says. Only headers are read (plus a look at the file's last bytes, which catches JPEG and PNG
    files cut short); ``verify=True`` decodes every image in full.

    In a multi-process job each process checks a share of the images and the problems are
    gathered, so every process raises the same error.

    Raises:
        DatasetValidationError: listing each bad file and its problem.
    """
    records = {}
    for record in dataset_dicts:
        records.setdefault(record["file_name"], record)
    records = list(records.values())
    rank, world = comm.get_rank(), comm.get_world_size()
    mine = records[rank::world]
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        problems = [p for p in pool.map(lambda r: _check_one_image(r, verify), mine) if p]
    if world > 1:
        problems = sorted(itertools.chain.from_iterable(comm.all_gather(problems)))
    if problems:
        raise DatasetValidationError(
            _format_problems(
                f"Dataset '{dataset_name}': {len(problems)} of {len(records)} image(s) cannot be used:",
                problems,
                "Fix or remove these images (and their entries in the json) before training.",
            ),
            problems,
        )
    logger.info(f"Dataset '{dataset_name}': checked {len(records)} image files" + (" (full decode)." if verify else "."))


def _composite_alpha(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Modes whose values do not fit 8 bits, as 8-bit grayscale."""
    if image.mode.startswith("I;16"):
        array = np.asarray(image).astype(np.float32) / 257.0
    elif image.mode == "I":
        array = np.asarray(image).astype(np.float64)
        if array.size and array.max() > 255:  # 16-bit data in a 32-bit container
            array = np.clip(array, 0, 65535) / 257.0
    elif image.mode == "F":
        array = np.asarray(image)
    else:
        return image
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def read_image(file_name: str, format: Optional[str] = None) -> np.ndarray:
    """:func:`detectron2.data.detection_utils.read_image`, fixed for 16-bit and transparent images.

    detectron2 converts every PIL mode with ``Image.convert``, which clips 16-bit values to 255
    (a 16-bit PNG becomes almost white) and drops the alpha channel (transparent pixels show the
    colour stored under them, often garbage). Here 16-bit images are scaled by ``1/257``, and
    images with transparency are composited over white. EXIF orientation is applied as in
    detectron2; the other modes (L, P, CMYK, 1, ...) convert as they do there.
    """
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        image = utils._apply_exif_orientation(image)
        image = _to_8bit(image)
        if _has_alpha(image):
            image = _composite_alpha(image)
        return utils.convert_PIL_to_numpy(image, format)


class RobustDatasetMapper(DatasetMapper):
    """:class:`detectron2.data.DatasetMapper` that reads images with :func:`read_image`, and skips
    (returns None, with a warning naming the file) an image that cannot be read or whose size
    differs from its record, instead of ending the training run. detectron2's datasets and the
    resumable loader replace a skipped image by another one.

    With the validation of :func:`validated_dataset_dicts` this only happens if a file changes
    during training.
    """

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        try:
            image = read_image(dataset_dict["file_name"], format=self.image_format)
            utils.check_image_size(dataset_dict, image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            logger.warning(f"Skipping {dataset_dict['file_name']}: {type(e).__name__}: {e}")
            return None

        if "sem_seg_file_name" in dataset_dict:
            sem_seg_gt = read_image(dataset_dict.pop("sem_seg_file_name"), "L").squeeze(2)
        else:
            sem_seg_gt = None
        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk)
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict


# ---------------------------------------------------------------------------------------------
# All of it
# ---------------------------------------------------------------------------------------------
def validated_dataset_dicts(
    names,
    filter_empty: bool = True,
    min_keypoints: int = 0,
    proposal_files: Optional[Sequence[str]] = None,
    check_consistency: bool = True,
    *,
    check_images: bool = True,
    verify_images: bool = False,
    num_threads: int = 8,
) -> List[Dict]:
    """:func:`detectron2.data.get_detection_dataset_dicts` with the checks of this module.

    For each dataset: the json and image folder must exist (:func:`check_dataset_files`); a COCO
    json is checked (:func:`validate_coco_json`) before detectron2 loads it; boxes are clipped or
    dropped (:func:`sanitize_annotations`, counts logged); with ``check_images`` every image file
    is opened (:func:`check_image_files`; ``verify_images`` decodes them in full). Then, as in
    detectron2, images with no (non-crowd) annotation are dropped when ``filter_empty``.

    Raises:
        DatasetNotFoundError, DatasetValidationError: before any training starts.
    """
    from detectron2.data.build import (
        filter_images_with_few_keypoints,
        filter_images_with_only_crowd_annotations,
        load_proposals_into_dataset,
        print_instances_class_histogram,
    )

    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("validated_dataset_dicts needs at least one dataset name")
    if proposal_files is not None and len(proposal_files) != len(names):
        raise ValueError(f"{len(proposal_files)} proposal files for {len(names)} datasets")
    check_dataset_files(names)

    all_dicts = []
    for i, name in enumerate(names):
        meta = MetadataCatalog.get(name)
        json_file = meta.get("json_file", None)
        if json_file and str(json_file).endswith(".json"):
            validate_coco_json(json_file, name)
        dicts = DatasetCatalog.get(name)
        if isinstance(dicts, torch.utils.data.Dataset):
            logger.warning(f"Dataset '{name}' is a torch Dataset, not a list of dicts: it is not validated.")
            all_dicts.append(dicts)
            continue
        if not len(dicts):
            raise DatasetValidationError(f"Dataset '{name}' is empty" + (f" ({json_file})" if json_file else ""))
        classes = meta.get("thing_classes", None)
        num_boxes = sum(len(d.get("annotations", ())) for d in dicts)
        dicts, stats = sanitize_annotations(dicts, name, len(classes) if classes is not None else None)
        _log_box_stats(name, len(dicts), num_boxes, stats)
        if check_images:
            check_image_files(dicts, name, verify=verify_images, num_threads=num_threads)
        if proposal_files is not None:
            dicts = load_proposals_into_dataset(dicts, proposal_files[i])
        all_dicts.append(dicts)

    if any(isinstance(d, torch.utils.data.Dataset) for d in all_dicts):
        return torch.utils.data.ConcatDataset(all_dicts)
    dataset_dicts = list(itertools.chain.from_iterable(all_dicts))
    has_instances = "annotations" in dataset_dicts[0]
    if filter_empty and has_instances:
        before = len(dataset_dicts)
        dataset_dicts = filter_images_with_only_crowd_annotations(dataset_dicts)
        if before != len(dataset_dicts):
            logger.info(f"{before - len(dataset_dicts)} of {before} images have no usable box and are not used for training.")
    if min_keypoints > 0 and has_instances:
        dataset_dicts = filter_images_with_few_keypoints(dataset_dicts, min_keypoints)
    if check_consistency and has_instances:
        try:
            class_names = MetadataCatalog.get(names[0]).thing_classes
            utils.check_metadata_consistency("thing_classes", names)
            print_instances_class_histogram(dataset_dicts, class_names)
        except AttributeError:  # class names are not available for this dataset
            pass
    if not dataset_dicts:
        raise DatasetValidationError(f"No image with a usable box is left in {', '.join(names)}.")
    return dataset_dicts
