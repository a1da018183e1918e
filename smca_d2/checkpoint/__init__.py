"""Checkpoint conversion: official SMCA-DETR (gaopengcuhk/SMCA-DETR) weights for smca_d2.

``convert_official_state_dict`` maps the official single-scale model's state dict (torchvision
ResNet backbone, DETR head with one class row per COCO category id), or that of the multi-scale
model of the official ``Multi_scale_SMCA.zip`` (``is_official_multi_scale``), to ``SMCADETR``'s keys
(Detectron2 ResNet, 80 contiguous COCO classes by default); ``load_official_checkpoint`` reads an
official checkpoint safely (``weights_only=True``, ``argparse.Namespace`` allowed);
``check_complete`` compares a converted state dict with a model. ``tools/convert_official_smca.py``
writes a Detectron2 checkpoint usable as ``train.init_checkpoint``.
"""

from .official import (
    COCO_NUM_CLASS_SLOTS,
    CompletenessReport,
    UnsafeCheckpointError,
    check_complete,
    coco_contiguous_category_ids,
    convert_official_state_dict,
    is_official_multi_scale,
    load_official_checkpoint,
)
from .safe_load import (
    EMA_KEY,
    TRUST_ENV,
    CheckpointMismatchError,
    CheckpointUnavailableError,
    CheckpointWriteError,
    DamagedCheckpointError,
    NonFiniteWeightsError,
    SafeCheckpointer,
    atomic_write,
    load_checkpoint_file,
    load_numpy_pickle,
)

__all__ = [
    "EMA_KEY",
    "TRUST_ENV",
    "CheckpointMismatchError",
    "CheckpointUnavailableError",
    "CheckpointWriteError",
    "DamagedCheckpointError",
    "NonFiniteWeightsError",
    "SafeCheckpointer",
    "atomic_write",
    "load_checkpoint_file",
    "load_numpy_pickle",
    "COCO_NUM_CLASS_SLOTS",
    "CompletenessReport",
    "UnsafeCheckpointError",
    "check_complete",
    "coco_contiguous_category_ids",
    "convert_official_state_dict",
    "is_official_multi_scale",
    "load_official_checkpoint",
]
from .torchvision_resnet import convert_torchvision_resnet  # noqa: F401
