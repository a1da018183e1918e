"""Checks and helpers used by train_net.py."""
from .checks import check_device, check_num_classes

__all__ = ["check_device", "check_num_classes"]
