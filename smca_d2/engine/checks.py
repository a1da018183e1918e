"""Configuration checks that run before any work, with messages that say what to change."""

from typing import List, Tuple

import torch
from omegaconf import DictConfig

from detectron2.data import MetadataCatalog

from .config import config_dataset_names

__all__ = ["NUM_CLASSES_KEYS", "check_device", "check_num_classes", "num_classes_in_config"]

# Where detectron2-style model configs keep their class count, and the dataset metadata the count
# must match: SMCA-DETR, RetinaNet, FCOS (model.num_classes); Faster/Mask/Cascade/Keypoint R-CNN
# (model.roi_heads.num_classes); the semantic head of Panoptic FPN and semantic segmentation
# models (model.sem_seg_head.num_classes, against the dataset's stuff classes).
NUM_CLASSES_KEYS = (
    ("model.num_classes", "thing_classes"),
    ("model.roi_heads.num_classes", "thing_classes"),
    ("model.sem_seg_head.num_classes", "stuff_classes"),
)


def num_classes_in_config(cfg) -> List[Tuple[str, int, str]]:
    """The class counts that ``cfg`` sets at the keys of :data:`NUM_CLASSES_KEYS`, as
    ``(key, count, metadata field)``; keys the config does not have are left out."""
    found = []
    for key, field in NUM_CLASSES_KEYS:
        node = cfg
        for part in key.split("."):
            node = node.get(part, None) if isinstance(node, (DictConfig, dict)) else None
            if node is None:
                break
        if isinstance(node, int) and not isinstance(node, bool):
            found.append((key, node, field))
    return found


def check_num_classes(cfg) -> None:
    """Fail if the model's class count differs from the classes of the training/test datasets.

    The count is read where the model keeps it (:data:`NUM_CLASSES_KEYS`: ``model.num_classes``,
    ``model.roi_heads.num_classes``, ``model.sem_seg_head.num_classes``) and the message names
    that key. A model with none of these keys, or a dataset without class names, is not checked.

    Must run after the datasets were loaded once (their metadata is filled in on load).
    """
    found = num_classes_in_config(cfg)
    if not found:
        return
    for name in config_dataset_names(cfg, splits=("train", "test")):
        metadata = MetadataCatalog.get(name)
        for key, num_classes, field in found:
            classes = metadata.get(field, None)
            if classes is not None and len(classes) != num_classes:
                kind = "classes" if field == "thing_classes" else field.replace("_", " ")
                raise ValueError(
                    f"{key}={num_classes} but dataset '{name}' has {len(classes)} {kind} "
                    f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}). "
                    f"Set {key}={len(classes)} on the command line or in the config."
                )


def check_device(device: str) -> None:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={device} but no CUDA device is available; pass train.device=cpu.")
