"""Tiny SMCA models for the inference tests: the small R18 config
(configs/common/r18_synthetic.py), shrunk; no training."""

import os

import numpy as np
import torch

from smca_d2.engine import load_config

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R18_CONFIG = os.path.join(REPO, "configs", "common", "r18_synthetic.py")
MULTI_SCALE_CONFIG = os.path.join(REPO, "configs", "smca_multi_scale_r50_50ep.py")

TINY_DECODER = [
    "model.transformer.decoder.num_layers=2",
    "model.transformer.decoder.d_model=64",
    "model.transformer.decoder.nhead=4",
    "model.transformer.decoder.dim_feedforward=128",
    "model.num_queries=10",
]
TINY_OVERRIDES = ["model.transformer.encoder.num_layers=1"] + TINY_DECODER


def tiny_config(path=R18_CONFIG):
    """The config at ``path`` with a 1-layer encoder (if it has ``num_layers``), a 2-layer
    decoder, d_model 64 and 10 queries."""
    overrides = TINY_OVERRIDES if path == R18_CONFIG else TINY_DECODER
    return load_config(path, overrides)


def write_checkpoint(cfg, path, seed=0):
    """Save the weights of a freshly built ``cfg.model`` (seeded) as a Detectron2 checkpoint."""
    torch.manual_seed(seed)
    model = instantiate(cfg.model)
    DetectionCheckpointer(model, save_dir=os.path.dirname(path)).save(os.path.splitext(os.path.basename(path))[0])
    return path, model


def random_image(height, width, seed=0):
    """A BGR uint8 image: noise with a few coloured rectangles."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    for _ in range(3):
        h, w = rng.integers(height // 6, height // 2), rng.integers(width // 6, width // 2)
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        image[y : y + h, x : x + w] = rng.integers(100, 255, size=3)
    return image


def rendered_batch(count, height=96, width=112):
    """``count`` generated training images (smca_d2.data.synthetic) with their instances, as
    model inputs."""
    from smca_d2.data.synthetic import render_image

    from detectron2.structures import Boxes, Instances

    batch = []
    for seed in range(count):
        image, objects = render_image(height, width, np.random.default_rng(seed))
        boxes = torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in objects], dtype=torch.float32)
        classes = torch.tensor([category - 1 for category, _ in objects])
        batch.append(
            {
                "image": torch.as_tensor(image).permute(2, 0, 1).float(),
                "instances": Instances((height, width), gt_boxes=Boxes(boxes), gt_classes=classes),
            }
        )
    return batch
