"""SMCA-DETR (Spatially Modulated Co-Attention) for Detectron2."""
from . import compat

compat.apply()

__version__ = "0.1.0"
