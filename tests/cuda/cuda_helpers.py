"""Helpers of the CUDA tests (tests/cuda/): the marks every module sets, float32 without TF32, and
a tiny SMCA model with a batch of generated images."""

import pytest
import torch
from speed_worker import exact_float32 as _exact_float32
from tiny_smca import TINY_OVERRIDES as TINY_MODEL
from tiny_smca import rendered_batch

from smca_d2.engine import load_config

from detectron2.config import instantiate

# `pytest -m cuda` selects these tests; without a CUDA device they are skipped, not failed.
CUDA_MARKS = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tools/gpu_check.sh runs these)"),
]


def exact_float32():
    """cuDNN's convolutions and CUDA's matrix products in plain float32: torch lets cuDNN use TF32
    by default, whose 10-bit mantissa would hide float32 rounding behind its own."""
    return _exact_float32("cuda")


def tiny_config(*overrides):
    """The small R18 config of the demo's base (configs/common/r18_synthetic.py), shrunk."""
    from conftest import REPO

    return load_config(f"{REPO}/configs/common/r18_synthetic.py", [*TINY_MODEL, *overrides])


def tiny_model_and_batch(*overrides, device="cuda", images=2):
    """A seeded tiny model on ``device`` (training mode) and a batch of generated images."""
    torch.manual_seed(0)
    cfg = tiny_config(*overrides)
    model = instantiate(cfg.model).to(device)
    batch = rendered_batch(images)
    return cfg, model, batch
