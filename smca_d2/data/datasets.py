"""Registration of the datasets that the prepare scripts under ``datasets/`` make.

COCO 2017 is registered by detectron2 itself (``coco_2017_train`` / ``coco_2017_val`` under
``$DETECTRON2_DATASETS``, default ``datasets/``). Any other COCO-format dataset takes one line::

    register_coco_instances("my_train", {}, "path/to/annotations.json", "path/to/images")

Registration is lazy: nothing is read until a dataset is used.
"""
import os

from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

# name -> (folder under $DETECTRON2_DATASETS, image folder, annotation file)
_PREPARED = {
    "smca_synthetic_train": ("synthetic", "train", "annotations/train.json"),
    "smca_synthetic_val": ("synthetic", "val", "annotations/val.json"),
    "smca_deepforest_train": ("deepforest", "train", "annotations/train.json"),
    "smca_deepforest_val": ("deepforest", "val", "annotations/val.json"),
}


def datasets_root() -> str:
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def register_prepared_datasets(root: str = None) -> None:
    """Register the prepared datasets under ``root`` (default ``$DETECTRON2_DATASETS``)."""
    root = datasets_root() if root is None else root
    for name, (folder, images, annotations) in _PREPARED.items():
        if name in DatasetCatalog.list():
            continue
        register_coco_instances(
            name, {}, os.path.join(root, folder, annotations), os.path.join(root, folder, images)
        )
