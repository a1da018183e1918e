"""Checks and helpers used by train_net.py."""

from .amp import AMPTrainer, amp_dtype, inference_autocast, inference_dtype
from .checks import check_device, check_num_classes
from .config import (
    ConfigChange,
    UnknownConfigKeyError,
    adapt_foreign_config,
    check_config_datasets,
    check_override_keys,
    describe_config_changes,
    load_config,
)
from .distributed import DEFAULT_PEER_TIMEOUT, DistributedJobError, launch
from .ema import EMAHook, ModelEMA, use_ema_weights
from .hooks import DeterministicSteps, MetricsWriteError, NonFiniteLossCheck, NonFiniteLossError, PeriodicWriter

__all__ = [
    "AMPTrainer",
    "DEFAULT_PEER_TIMEOUT",
    "DistributedJobError",
    "ConfigChange",
    "DeterministicSteps",
    "EMAHook",
    "MetricsWriteError",
    "ModelEMA",
    "NonFiniteLossCheck",
    "NonFiniteLossError",
    "PeriodicWriter",
    "UnknownConfigKeyError",
    "adapt_foreign_config",
    "amp_dtype",
    "check_config_datasets",
    "check_device",
    "check_num_classes",
    "check_override_keys",
    "describe_config_changes",
    "inference_autocast",
    "inference_dtype",
    "launch",
    "load_config",
    "use_ema_weights",
]
