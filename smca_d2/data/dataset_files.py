"""Fail early when a dataset is not registered or its json file / image folder is missing, saying
how to prepare it."""

import difflib
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.file_io import PathManager

from .datasets import datasets_root
from .errors import DatasetNotFoundError

__all__ = ["check_dataset_files"]

# How to obtain the datasets that smca_d2 knows (folder under $DETECTRON2_DATASETS -> hint).
_PREPARE_HINTS = {
    "synthetic": "python datasets/prepare_synthetic.py  (about 10 s, no network)",
    "deepforest": "python datasets/prepare_deepforest.py  (one 20 MB pip download)",
    "coco": "download COCO 2017 as described in datasets/README.md",
    "coco_sized": "python datasets/prepare_coco_sized.py  (a generated dataset of COCO's size, no network)",
}


def _prepare_hint(path: str) -> str:
    root = os.path.abspath(datasets_root())
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
