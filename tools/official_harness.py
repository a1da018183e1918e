"""Run the official SMCA-DETR code (a user's checkout of gaopengcuhk/SMCA-DETR) next to ours.

Used by ``tools/check_official_equivalence.py`` (imported from this folder) and the speed
benchmark (``benchmarks/speed_models.py``, through ``import_tool`` of benchmarks/common.py). It is
not part of the installed package: the official ``models`` and ``util`` packages are imported from
the given work tree at run time, and nothing of them is part of this repository. The official
model is built without downloading weights.
"""

import argparse
import contextlib
import os
import sys
import warnings
from typing import List, Sequence

import numpy as np
import torch

__all__ = [
    "TORCHVISION_MEAN",
    "TORCHVISION_STD",
    "build_official_model",
    "import_official",
    "official_args",
    "official_samples",
    "official_targets",
    "randomize_official",
    "run_official",
    "synthetic_image",
]

TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)


@contextlib.contextmanager
def _official_import_context(repo: str):
    """Put the official repo first on sys.path while its modules are imported.

    Its ``util/misc.py`` does ``float(torchvision.__version__[:3]) < 0.7`` at import time, which
    is true for torchvision 0.10+ ("0.2" for 0.29) and then imports ops that no longer exist; the
    version string is shown as "1.0" during the import only.
    """
    import torchvision

    clashes = [m for m in ("models", "util") if m in sys.modules]
    for m in clashes:
        origin = os.path.abspath(getattr(sys.modules[m], "__file__", "") or "")
        if not origin.startswith(os.path.abspath(repo) + os.sep):
            raise RuntimeError(
                f"a module named {m!r} is already imported from {origin}; cannot import the official code"
            )
    real_version = torchvision.__version__
    sys.path.insert(0, repo)
    torchvision.__version__ = "1.0"
    try:
        yield
    finally:
        torchvision.__version__ = real_version
        sys.path.remove(repo)


def official_args(device: str, **overrides) -> argparse.Namespace:
    """The official main.py's arguments for the single-scale SMCA R50 model (type3 scales);
    ``overrides`` replace some (e.g. ``num_queries=100``)."""
    args = argparse.Namespace(
        lr=1e-4,
        lr_backbone=1e-5,
        batch_size=2,
        weight_decay=1e-4,
        epochs=50,
        lr_drop=40,
        clip_max_norm=0.1,
        smooth=8.0,
        dynamic_scale="type3",
        frozen_weights=None,
        backbone="resnet50",
        dilation=False,
        position_embedding="sine",
        enc_layers=6,
        dec_layers=6,
        dim_feedforward=2048,
        hidden_dim=256,
        dropout=0.1,
        nheads=8,
        num_queries=300,
        pre_norm=False,
        masks=False,
        aux_loss=True,
        set_cost_class=2.0,
        set_cost_bbox=5.0,
        set_cost_giou=2.0,
        mask_loss_coef=1.0,
        dice_loss_coef=1.0,
        bbox_loss_coef=5.0,
        giou_loss_coef=2.0,
        eos_coef=0.1,
        dataset_file="coco",
        coco_path=None,
        coco_panoptic_path=None,
        remove_difficult=False,
        output_dir="",
        device=device,
        seed=42,
        resume="",
        start_epoch=0,
        eval=False,
        num_workers=2,
        world_size=1,
        dist_url="env://",
    )
    unknown = set(overrides) - set(vars(args))
    if unknown:
        raise TypeError(f"unknown official arguments {sorted(unknown)}")
    vars(args).update(overrides)
    return args


def import_official(repo: str):
    repo = os.path.abspath(repo)
    if not os.path.isfile(os.path.join(repo, "models", "detr.py")):
        raise FileNotFoundError(f"{repo} is not a work tree of the official SMCA-DETR code (no models/detr.py)")
    with _official_import_context(repo):
        import models.backbone as official_backbone
        import models.detr as official_detr
        import util.misc as official_misc
    return official_backbone, official_detr, official_misc


def build_official_model(
    repo: str, device: str, seed: int, randomize: bool = True, with_criterion: bool = False, **overrides
):
    """The official single-scale model (eval mode) with seeded weights, its arguments and its
    ``util.misc`` module (and its criterion first if ``with_criterion``).

    ``randomize`` perturbs the constant-initialised tensors (see :func:`randomize_official`);
    ``overrides`` change official arguments.
    """
    official_backbone, official_detr, official_misc = import_official(repo)
    # Backbone() passes pretrained=is_main_process() to torchvision: False means no download.
    official_backbone.is_main_process = lambda: False
    args = official_args(device, **overrides)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, criterion, _ = official_detr.build(args)
    if randomize:
        randomize_official(model, seed)
    model = model.to(device).eval()
    if with_criterion:
        return model, criterion.to(device), args, official_misc
    return model, args, official_misc


@torch.no_grad()
def randomize_official(model, seed: int):
    """Perturb every constant-initialised tensor and calibrate the frozen-BN statistics."""
    gen = torch.Generator().manual_seed(seed + 1)

    def randn_like(t, std):
        return torch.randn(t.shape, generator=gen, dtype=t.dtype) * std

    frozen_bns = [m for m in model.backbone.modules() if type(m).__name__ == "FrozenBatchNorm2d"]
    for bn in frozen_bns:
        bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.5)
        bn.bias.copy_(randn_like(bn.bias, 0.2))
    for name, p in model.named_parameters():
        if name.startswith("backbone.") or p.numel() < 2:
            continue
        flat = p.detach().flatten()
        if torch.all(flat == flat[0]):  # LayerNorm weights/biases, zero biases, point3 (scales), class bias
            p.add_(randn_like(p, 0.1))

    # Running statistics: the per-channel mean/variance of each BN's input on a random image
    # (what a trained network's statistics are), times a random factor.
    def hook(module, inputs):
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3))
        module.running_mean.copy_(mean)
        module.running_var.copy_(var * (torch.rand(var.shape, generator=gen) * 0.4 + 0.8))

    handles = [bn.register_forward_pre_hook(hook) for bn in frozen_bns]
    image = torch.rand((1, 3, 256, 320), generator=gen) * 4 - 2
    model.backbone[0].body(image)
    for h in handles:
        h.remove()


def official_targets(images: Sequence[torch.Tensor], boxes_xyxy=None, labels=None, device="cpu") -> List[dict]:
    """The official code's per-image target dicts (sizes; normalized cxcywh boxes and labels if
    given, boxes in pixels XYXY)."""
    targets = []
    for i, img in enumerate(images):
        h, w = img.shape[-2:]
        t = {"size": torch.tensor([h, w], device=device), "orig_size": torch.tensor([h, w], device=device)}
        if boxes_xyxy is not None:
            b = boxes_xyxy[i].to(device)
            scale = torch.tensor([w, h, w, h], dtype=b.dtype, device=device)
            xyxy = b / scale
            t["boxes"] = torch.stack(
                [
                    (xyxy[:, 0] + xyxy[:, 2]) / 2,
                    (xyxy[:, 1] + xyxy[:, 3]) / 2,
                    xyxy[:, 2] - xyxy[:, 0],
                    xyxy[:, 3] - xyxy[:, 1],
                ],
                dim=-1,
            )
            t["labels"] = labels[i].to(device)
        targets.append(t)
    return targets


def official_samples(misc, images: Sequence[torch.Tensor], device):
    """The official NestedTensor batch of float RGB [3, H, W] images in 0..255."""
    mean = torch.tensor(TORCHVISION_MEAN).view(3, 1, 1)
    std = torch.tensor(TORCHVISION_STD).view(3, 1, 1)
    return misc.nested_tensor_from_tensor_list([((img / 255.0 - mean) / std).to(device) for img in images])


def run_official(model, misc, images, device, grad: bool = False):
    """images: list of float RGB [3, H, W] in 0..255. Returns the raw outputs dict."""
    samples = official_samples(misc, images, device)
    targets = official_targets(images, device=device)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model([samples, targets])


def synthetic_image(h: int, w: int, seed: int) -> torch.Tensor:
    """Deterministic RGB float [3, H, W] in 0..255: gradients, rectangles, discs and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w * 200, yy / h * 200, (xx + yy) / (h + w) * 120 + 60], axis=0)
    for _ in range(12):
        color = rng.uniform(0, 255, size=3)
        if rng.random() < 0.5:
            x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
            x1, y1 = x0 + rng.integers(10, w // 3), y0 + rng.integers(10, h // 3)
            img[:, y0:y1, x0:x1] = color[:, None, None]
        else:
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, min(h, w) / 4)
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
            img[:, disc] = color[:, None]
    img = img + rng.normal(0, 8, size=img.shape)
    return torch.from_numpy(np.clip(img, 0, 255).astype(np.float32))
