"""Checks and helpers used by train_net.py."""
from .amp import AMPTrainer, amp_dtype
from .checks import check_device, check_num_classes
from .config import (
    UnknownConfigKeyError,
    check_config_datasets,
    check_override_keys,
    load_config,
    prepare_config,
)
from .ema import EMAHook, ModelEMA, use_ema_weights
from .hooks import DeterministicSteps, NonFiniteLossCheck, NonFiniteLossError
from .resumable import ResumableTrainLoader, build_resumable_train_loader

__all__ = [
    "AMPTrainer",
    "DeterministicSteps",
    "EMAHook",
    "ModelEMA",
    "NonFiniteLossCheck",
    "NonFiniteLossError",
    "ResumableTrainLoader",
    "UnknownConfigKeyError",
    "amp_dtype",
    "build_resumable_train_loader",
    "check_config_datasets",
    "check_device",
    "check_num_classes",
    "check_override_keys",
    "load_config",
    "prepare_config",
    "use_ema_weights",
]
