"""``get_detection_dataset_dicts`` with every check of a dataset before training.

Policy (see "What happens when" in README.md):

* **refused before training**, with a :class:`~smca_d2.data.errors.DatasetValidationError` that
  names the dataset, the json file and the offending images / ids: a missing json or image folder
  (:class:`~smca_d2.data.errors.DatasetNotFoundError`, with how to prepare the dataset), a json
  that does not parse, duplicate image / annotation / category ids, category ids not in
  ``categories``, images without a positive ``height``/``width``, and (``check_images=True``)
  image files that are missing, unreadable, truncated or whose size differs from the json;
* **fixed, with a logged count**: boxes partly outside the image are clipped to it; boxes with
  NaN/inf coordinates, zero or negative width/height, or wholly outside the image are dropped;
  images left without annotations are dropped from training (``filter_empty``) and kept for
  evaluation.

In a LazyConfig::

    dataloader.train.dataset = L(validated_dataset_dicts)(names="my_train", verify_images=True)
"""

import itertools
import logging
from typing import Dict, List, Optional, Sequence

import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils

from .annotations import log_box_stats, sanitize_annotations
from .coco_json import gc_paused, load_coco_api, use_parsed_coco
from .dataset_files import check_dataset_files
from .errors import DatasetValidationError
from .image_checks import check_image_files

__all__ = ["validated_dataset_dicts"]

logger = logging.getLogger(__name__)


def validated_dataset_dicts(
    names,
    filter_empty: bool = True,
    min_keypoints: int = 0,
    proposal_files: Optional[Sequence[str]] = None,
    check_consistency: bool = True,
    *,
    check_images: bool = True,
    verify_images: bool = False,
    cache_image_checks: bool = True,
    num_threads: int = 8,
) -> List[Dict]:
    """:func:`detectron2.data.get_detection_dataset_dicts` with the checks of this package.

    For each dataset: the json and image folder must exist (:func:`check_dataset_files`); a COCO
    json is parsed once and checked (:func:`load_coco_api`), and detectron2's ``load_coco_json``
    builds the dicts from that parse (:func:`use_parsed_coco`), so that checking costs no second
    parse; boxes are clipped or dropped (:func:`sanitize_annotations`, counts logged); with
    ``check_images`` every image file is opened (:func:`check_image_files`; ``verify_images``
    decodes them in full), and a check that passed is not repeated while the json and the image
    files stay the same (``cache_image_checks``; the record is kept under ``$SMCA_D2_DATA_CACHE``,
    see :mod:`smca_d2.data.check_cache`). Then, as in detectron2, images with no (non-crowd)
    annotation are dropped when ``filter_empty``.

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
            # Parsed and checked once, and detectron2's load_coco_json builds the dicts from that
            # parse; the cyclic garbage collector waits meanwhile (gc_paused says why: neither
            # makes reference cycles).
            with gc_paused():
                coco_api = load_coco_api(json_file, name)
                with use_parsed_coco(json_file, coco_api):
                    del coco_api  # the context holds it until load_coco_json takes it
                    dicts = DatasetCatalog.get(name)
        else:
            dicts = DatasetCatalog.get(name)
        if isinstance(dicts, torch.utils.data.Dataset):
            logger.warning(f"Dataset '{name}' is a torch Dataset, not a list of dicts: it is not validated.")
            all_dicts.append(dicts)
            continue
        if not len(dicts):
            raise DatasetValidationError(f"Dataset '{name}' is empty" + (f" ({json_file})" if json_file else ""))
        classes = meta.get("thing_classes", None)
        num_boxes = sum(len(d.get("annotations", ())) for d in dicts)
        with gc_paused():  # the checks make no reference cycles
            dicts, stats = sanitize_annotations(dicts, name, len(classes) if classes is not None else None)
            log_box_stats(name, len(dicts), num_boxes, stats)
            if check_images:
                check_image_files(
                    dicts,
                    name,
                    verify=verify_images,
                    num_threads=num_threads,
                    json_file=json_file,
                    use_cache=cache_image_checks,
                )
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
            logger.info(
                f"{before - len(dataset_dicts)} of {before} images have no usable box and are not used for training."
            )
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
