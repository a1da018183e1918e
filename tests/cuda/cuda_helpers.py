"""Helpers of the CUDA tests (tests/cuda/): the marks every module sets, float32 without TF32, and
a tiny SMCA model with a batch of generated images."""

import numpy as np
import pytest
import torch
from speed_worker import exact_float32 as _exact_float32
from tiny_smca import TINY_OVERRIDES as TINY_MODEL

from smca_d2.data.synthetic import render_image
from smca_d2.engine import load_config

from detectron2.config import instantiate
from detectron2.structures import Boxes, Instances

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
    batch = []
    for seed in range(images):
        image, objects = render_image(96, 112, np.random.default_rng(seed))
        boxes = torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in objects], dtype=torch.float32)
        classes = torch.tensor([category - 1 for category, _ in objects])
        batch.append(
            {
                "image": torch.as_tensor(image).permute(2, 0, 1).float(),
                "instances": Instances((96, 112), gt_boxes=Boxes(boxes), gt_classes=classes),
            }
        )
    return cfg, model, batch
