"""Data: drop-in replacements of detectron2's dataset function, mapper and training loader that
validate the data and resume exactly, dataset registration, augmentations and dataset generators.

One module per job: ``dataset_files`` (registered, files present), ``coco_json`` (the json,
parsed once and checked), ``annotations`` (boxes clipped or dropped), ``images`` (reading image
files), ``image_checks`` (every image opens, has its size), ``check_cache`` (the record of a
passed image check), ``dataset_dicts`` (all of it, as ``get_detection_dataset_dicts``),
``mapper`` (``RobustDatasetMapper``), ``resumable_loader`` (``build_resumable_train_loader``),
``datasets`` (registration), ``transforms`` (DETR's augmentations), ``synthetic``,
``deepforest`` and ``coco_sized`` (dataset generators).
"""

from .dataset_dicts import validated_dataset_dicts
from .dataset_files import check_dataset_files
from .errors import DatasetNotFoundError, DatasetValidationError
from .images import read_image
from .mapper import RobustDatasetMapper
from .resumable_loader import ResumableTrainLoader, build_resumable_train_loader

__all__ = [
    "DatasetNotFoundError",
    "DatasetValidationError",
    "ResumableTrainLoader",
    "RobustDatasetMapper",
    "build_resumable_train_loader",
    "check_dataset_files",
    "read_image",
    "validated_dataset_dicts",
]
