"""Registration of the datasets that the prepare scripts under ``datasets/`` make.

COCO 2017 is registered by detectron2 itself (``coco_2017_train`` / ``coco_2017_val`` under
``$DETECTRON2_DATASETS``, default ``datasets/``). Any other COCO-format dataset takes one line::

    register_coco_instances("my_train", {}, "path/to/annotations.json", "path/to/images")

Registration is lazy: nothing is read until a dataset is used.

``smca_synthetic_train_800`` is the first 800 images of ``smca_synthetic_train`` (the training
set of the convergence benchmark; the generator draws each image from its own seed, so these are
the 800 images of a dataset generated with ``--num-train 800``). It is for training: COCOEvaluator
builds its ground truth from the dataset's dicts.
"""

import functools
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

# name -> (folder under $DETECTRON2_DATASETS, image folder, annotation file)
_PREPARED = {
    "smca_synthetic_train": ("synthetic", "train", "annotations/train.json"),
    "smca_synthetic_val": ("synthetic", "val", "annotations/val.json"),
    "smca_deepforest_train": ("deepforest", "train", "annotations/train.json"),
    "smca_deepforest_val": ("deepforest", "val", "annotations/val.json"),
}


# name -> (prepared dataset, number of its first images)
_SUBSETS = {"smca_synthetic_train_800": ("smca_synthetic_train", 800)}


def _first_images(name: str, parent: str, count: int):
    meta = MetadataCatalog.get(parent)
    return load_coco_json(meta.json_file, meta.image_root, name)[:count]


def datasets_root() -> str:
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def register_prepared_datasets(root: str = None) -> None:
    """Register the prepared datasets under ``root`` (default ``$DETECTRON2_DATASETS``)."""
    root = datasets_root() if root is None else root
    for name, (folder, images, annotations) in _PREPARED.items():
        if name in DatasetCatalog.list():
            continue
        register_coco_instances(name, {}, os.path.join(root, folder, annotations), os.path.join(root, folder, images))
    for name, (parent, count) in _SUBSETS.items():
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, functools.partial(_first_images, name, parent, count))
        MetadataCatalog.get(name).set(image_root=MetadataCatalog.get(parent).image_root, evaluator_type="coco")
