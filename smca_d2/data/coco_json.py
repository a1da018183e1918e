"""A COCO instances json: parsed once, checked, and handed to detectron2's ``load_coco_json``.

detectron2's ``load_coco_json`` parses the json with ``pycocotools.coco.COCO(json_file)``. Checking
the json first with a ``json.load`` of its own would parse it twice, and parsing is most of the
cost of loading a large dataset (COCO train2017's json is 450 MB, mostly polygon coordinates).
:func:`load_coco_api` parses and checks the json and indexes it as pycocotools does;
:func:`use_parsed_coco` then hands that ``COCO`` object to ``load_coco_json`` while it runs, so
that detectron2 builds its dataset dicts, unchanged, from data that was parsed once.
"""

import contextlib
import gc
import io
import itertools
import json
import logging
import os
import threading
from collections import Counter, defaultdict
from typing import Dict, List, Optional

from detectron2.utils.file_io import PathManager

from .errors import DatasetValidationError, format_problems

__all__ = ["check_coco_dict", "gc_paused", "load_coco_api", "use_parsed_coco", "validate_coco_json"]

logger = logging.getLogger(__name__)

_NUMBER_TYPES = (int, float)


def _is_number(x) -> bool:
    return isinstance(x, _NUMBER_TYPES) and not isinstance(x, bool)


def _label(json_file: str, dataset_name: Optional[str]) -> str:
    return f"Dataset '{dataset_name}' ({json_file})" if dataset_name else json_file


def _read_json(json_file: str, label: str):
    try:
        with PathManager.open(json_file, "r") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetValidationError(f"{label}: not valid json: {e}") from None


def _check_structure(data, label: str) -> None:
    if not isinstance(data, dict):
        raise DatasetValidationError(f"{label}: expected a json object with 'images', 'annotations', 'categories'")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DatasetValidationError(f"{label}: no list {missing} in the json (is it a COCO instances file?)")
    if not all(isinstance(x, dict) for x in itertools.chain(data["images"], data["annotations"], data["categories"])):
        raise DatasetValidationError(f"{label}: 'images', 'annotations' and 'categories' must hold json objects")


def _image_problems(images: List[Dict]) -> List[str]:
    problems = []
    for img in images:
        h, w = img.get("height"), img.get("width")
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
            problems.append(
                f"image id {img.get('id')} ({img.get('file_name')}): height={h!r}, width={w!r} (need positive integers)"
            )
        if not img.get("file_name"):
            problems.append(f"image id {img.get('id')}: no file_name")
    return problems


def _boxes_are_four_numbers(annotations: List[Dict]) -> bool:
    """Whether every annotation's ``bbox`` (where present) is a list of four ints/floats, in passes
    over all boxes at C speed; the annotation-by-annotation check runs only when this one fails,
    to name the bad boxes."""
    boxes = [a.get("bbox") for a in annotations]
    if None in boxes:
        boxes = [b for b in boxes if b is not None]
    if set(map(type, boxes)) - {list} or set(map(len, boxes)) - {4}:
        return False
    return set(map(type, itertools.chain.from_iterable(boxes))) <= set(_NUMBER_TYPES)


def _duplicates(values: List) -> List:
    return sorted((v for v, n in Counter(values).items() if n > 1), key=str)


def check_coco_dict(data, label: str) -> Dict[str, int]:
    """The checks of :func:`validate_coco_json` on an already parsed json (``label`` names it in
    messages).

    Returns:
        counts of the json's images, annotations and categories, and of annotations whose
        ``image_id`` matches no image (these are ignored by detectron2, with a warning).

    Raises:
        DatasetValidationError
    """
    _check_structure(data, label)
    images, annotations, categories = data["images"], data["annotations"], data["categories"]
    problems: List[str] = []

    image_ids = [img.get("id") for img in images]
    duplicated = _duplicates(image_ids)
    if duplicated:
        files = defaultdict(list)
        wanted = set(duplicated)
        for img in images:
            if img.get("id") in wanted:
                files[img.get("id")].append(img.get("file_name"))
        problems += [f"duplicate image id {i}: {', '.join(map(str, files[i]))}" for i in duplicated]
    problems += _image_problems(images)

    category_ids = [c.get("id") for c in categories]
    problems += [f"duplicate category id {i}" for i in _duplicates(category_ids)]
    category_ids = set(category_ids)

    duplicated = _duplicates([a.get("id") for a in annotations])
    if duplicated:
        problems.append(
            f"{len(duplicated)} duplicate annotation id(s): {', '.join(map(str, duplicated[:10]))}"
            + (" ..." if len(duplicated) > 10 else "")
        )
    unknown = defaultdict(list)
    orphans = 0
    image_ids = set(image_ids)
    boxes_ok = _boxes_are_four_numbers(annotations)
    for ann in annotations:
        if ann.get("category_id") not in category_ids:
            unknown[ann.get("category_id")].append(ann.get("id"))
        if ann.get("image_id") not in image_ids:
            orphans += 1
        bbox = ann.get("bbox")
        if (
            not boxes_ok
            and bbox is not None
            and not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox)))
        ):
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


def validate_coco_json(json_file: str, dataset_name: Optional[str] = None) -> Dict[str, int]:
    """Structural checks of a COCO json that ``load_coco_json`` does not make (or makes with an
    assertion that names neither the file nor the ids).

    Refused: a file that does not parse; missing ``images``/``annotations``/``categories``;
    duplicate image, annotation or category ids (pycocotools silently keeps the last image of a
    duplicated id and gives it the annotations of both); annotations whose ``category_id`` is not
    in ``categories``; images without a positive integer ``height`` / ``width``; annotations whose
    ``bbox`` is not four numbers.

    Returns:
        the counts of :func:`check_coco_dict`.

    Raises:
        DatasetValidationError
    """
    label = _label(json_file, dataset_name)
    return check_coco_dict(_read_json(json_file, label), label)


def _index_is_consistent(coco_api) -> bool:
    """Whether pycocotools' index shows none of the problems that :func:`check_coco_dict` looks
    for (ids that the index merged, categories that annotations name but the json does not
    have), with the box check as the only pass over the annotations."""
    data = coco_api.dataset
    return (
        len(coco_api.imgs) == len(data["images"])
        and len(coco_api.anns) == len(data["annotations"])
        and len(coco_api.cats) == len(data["categories"])
        and set(coco_api.catToImgs) <= set(coco_api.cats)
        and not _image_problems(data["images"])
        and _boxes_are_four_numbers(data["annotations"])
    )


def load_coco_api(json_file: str, dataset_name: Optional[str] = None):
    """The ``pycocotools.coco.COCO`` of ``json_file`` (the parsed json in ``.dataset``, indexed by
    ``createIndex()``, as ``COCO(json_file)`` makes it), parsed once and checked as by
    :func:`validate_coco_json`.

    The checks read pycocotools' index, which has the answer to most of them (a duplicated id is
    a key the index holds once); only when it shows a problem is the json checked entry by entry,
    to name the offending ids.

    Raises:
        DatasetValidationError
    """
    from pycocotools.coco import COCO

    label = _label(json_file, dataset_name)
    data = _read_json(json_file, label)
    _check_structure(data, label)
    coco_api = COCO()
    coco_api.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco_api.createIndex()
    except (KeyError, TypeError) as e:  # a missing or unhashable id
        check_coco_dict(data, label)
        raise DatasetValidationError(
            f"{label}: pycocotools cannot index it ({type(e).__name__}: {e}). Every image, annotation and "
            "category needs an 'id', and every annotation an 'image_id' and a 'category_id'."
        ) from None
    if not _index_is_consistent(coco_api):
        check_coco_dict(data, label)
    orphans = sum(len(coco_api.imgToAnns[i]) for i in set(coco_api.imgToAnns) - set(coco_api.imgs))
    if orphans:
        logger.warning(f"{label}: {orphans} annotation(s) refer to image ids not in 'images'; they are ignored.")
    return coco_api


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector paused while in this context (and resumed after, if it
    ran before).

    A COCO-sized json parses into millions of dicts and lists, and detectron2 builds a million
    more from them. None of them is part of a reference cycle, so the collector frees nothing
    there; but each of its full passes visits every one of them, and as their number grows it
    makes many such passes: they take much of the time of loading the json, and every full pass
    during the checks that follow visits the whole dataset again. Use it around code that makes
    no reference cycles (reference counting, which frees everything else, is not paused).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_handover_lock = threading.RLock()


@contextlib.contextmanager
def use_parsed_coco(json_file: str, coco_api):
    """While in this context, the first ``pycocotools.coco.COCO(path)`` of ``json_file`` (as
    detectron2's ``load_coco_json`` makes, through ``PathManager.get_local_path``) returns
    ``coco_api`` instead of parsing the file again; every other construction is pycocotools' own.

    ``load_coco_json`` imports ``COCO`` from ``pycocotools.coco`` when it is called (detectron2
    v0.6 and main alike), so the class is replaced in that module for the duration of the
    context. ``coco_api`` is handed over once: ``load_coco_json`` changes keypoints of the data in
    place, so a second load must parse the file afresh.
    """
    import pycocotools.coco as coco_module

    target = os.path.abspath(PathManager.get_local_path(json_file))
    original = coco_module.COCO
    pending = [coco_api]

    class _ParsedOnceCOCO(original):
        def __new__(cls, annotation_file=None, *args, **kwargs):
            if pending and annotation_file is not None and os.path.abspath(str(annotation_file)) == target:
                return pending.pop()  # not an instance of this class: __init__ does not run
            return original(annotation_file, *args, **kwargs)

    with _handover_lock:
        coco_module.COCO = _ParsedOnceCOCO
        try:
            yield
        finally:
            coco_module.COCO = original
            if pending:
                logger.debug(f"{json_file} was not loaded with pycocotools: its parsed data was not used.")
                pending.clear()
