"""Shared pieces of the benchmark scripts (benchmarks/*.py, tools/benchmark.py): the record of
the machine a figure was measured on, and writing a result as JSON."""
import datetime
import json
import os
import platform
from typing import Optional

import torch

__all__ = ["environment", "write_json"]


def environment(device: str = "cpu", threads: Optional[int] = None) -> dict:
    """Date, machine, CPU count, device (the GPU's name for ``cuda``), torch version and threads."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if str(device).startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "threads": threads or torch.get_num_threads(),
    }


def write_json(path: str, record) -> None:
    """Write ``record`` to ``path`` (indented), creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
