"""SMCA-DETR (Spatially Modulated Co-Attention) for Detectron2."""

from . import compat

compat.apply()

__version__ = "0.2.0"

from . import modeling  # noqa: E402,F401  (registers SMCADETR in detectron2's META_ARCH_REGISTRY)
from .data.datasets import register_prepared_datasets  # noqa: E402

register_prepared_datasets()
