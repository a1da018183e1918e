"""Shared pieces of the benchmark scripts (benchmarks/*.py): the record of
the machine a figure was measured on, writing a result as JSON, and importing a script of
``tools/``. Not part of the installed package: the scripts of this folder import it as
``common`` (a script's own folder is on ``sys.path``)."""

import datetime
import importlib.util
import json
import os
import platform
import sys
from typing import Optional

import torch

__all__ = ["REPO_ROOT", "cpu_model", "environment", "import_tool", "write_json"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> Optional[str]:
    """The CPU's model name (``/proc/cpuinfo``), or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def environment(device: str = "cpu", threads: Optional[int] = None) -> dict:
    """Date, machine, CPU model and count, device (the GPU's name for ``cuda``), torch version
    and threads."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
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


def import_tool(name: str):
    """The module of ``tools/<name>.py`` (e.g. ``official_harness``), imported under its own name
    once per process, without adding ``tools/`` to ``sys.path``: the scripts' folders are not
    packages, and only this one module is needed from there."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
