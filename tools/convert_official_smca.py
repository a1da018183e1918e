#!/usr/bin/env python
"""Convert an official SMCA-DETR checkpoint (gaopengcuhk/SMCA-DETR) for smca_d2: its single-scale
model, or the multi-scale model of its ``Multi_scale_SMCA.zip`` (recognised by its keys).

    python tools/convert_official_smca.py --input smca_r50.pth --output smca_r50_d2.pth

``--input`` is a checkpoint written by the official ``main.py`` (``{"model", "optimizer",
"lr_scheduler", "epoch", "args"}``; only ``model`` is used) or a bare ``{"model": state_dict}``.
It is read with ``torch.load(weights_only=True)``: files holding pickled objects other than
tensors, plain values and ``argparse.Namespace`` are refused.

The output is a Detectron2 checkpoint, ``{"model": state_dict, "__author__": ...}``, to use as
``train.init_checkpoint`` (loaded by ``DetectionCheckpointer``). ``--num-classes 80`` (default)
keeps the class rows of the 80 COCO categories in Detectron2's contiguous order; 91 or 92 keep
the official rows (set ``model.num_classes`` to match). Unless ``--no-check``, the result is
checked against the model built from ``--config`` (every parameter and buffer, with its shape):
by default ``smca_single_scale_r50_50ep.py``, or for the zip's model
``smca_conv_multi_scale_r50_50ep.py`` (``_r101_`` for an R101 backbone).
"""

import argparse
import os
import sys

import torch

import smca_d2  # noqa: F401  (detectron2 compatibility fixes)
from smca_d2.checkpoint import (
    UnsafeCheckpointError,
    check_complete,
    convert_official_state_dict,
    is_official_multi_scale,
    load_official_checkpoint,
)
from smca_d2.model_zoo import resolve_config_file

AUTHOR = "smca_d2 convert_official_smca"
DEFAULT_CONFIG = "smca_single_scale_r50_50ep.py"  # names of smca_d2.model_zoo
MULTI_SCALE_CONFIGS = {"R50": "smca_conv_multi_scale_r50_50ep.py", "R101": "smca_conv_multi_scale_r101_50ep.py"}


def default_config(official) -> str:
    """The config whose model an official state dict converts to (R101: res4 has 23 blocks)."""
    if not is_official_multi_scale(official):
        return DEFAULT_CONFIG
    r101 = any(".layer3.22." in k for k in official)
    return MULTI_SCALE_CONFIGS["R101" if r101 else "R50"]


def build_model(config_path: str, num_classes: int):
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(resolve_config_file(config_path))
    cfg.model.num_classes = num_classes
    return instantiate(cfg.model)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="official checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="Detectron2 checkpoint to write (.pth)")
    parser.add_argument(
        "--num-classes",
        type=int,
        default=80,
        choices=(80, 91, 92),
        help="80: COCO classes in Detectron2's contiguous order (default); 91/92: official rows",
    )
    parser.add_argument(
        "--config",
        default=None,
        help=f"smca_d2 config whose model the result is checked against (default: {DEFAULT_CONFIG}, or "
        f"for the multi-scale model of Multi_scale_SMCA.zip {MULTI_SCALE_CONFIGS['R50']} / "
        f"{MULTI_SCALE_CONFIGS['R101']})",
    )
    parser.add_argument("--no-check", action="store_true", help="do not build the model to check the result")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        official = load_official_checkpoint(args.input)
        converted = convert_official_state_dict(official, num_classes=args.num_classes)
    except (UnsafeCheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    total = sum(v.numel() for v in converted.values())
    print(f"read {len(official)} tensors from {args.input}")
    print(f"converted {len(converted)} keys, {total:,} values")
    rows_in = official["class_embed.weight"].shape[0] if "class_embed.weight" in official else "?"
    print(f"class head: {rows_in} official rows -> {converted['class_embed.weight'].shape[0]} classes")
    config = args.config or default_config(official)
    if is_official_multi_scale(official):
        print("model: the multi-scale SMCA of Multi_scale_SMCA.zip")

    if not args.no_check:
        model = build_model(config, args.num_classes)
        report = check_complete(converted, model)
        if not report.ok:
            print(f"error: the result does not match the model of {config}:\n{report}", file=sys.stderr)
            return 1
        params = dict(model.named_parameters())
        n_param = sum(converted[k].numel() for k in converted if k in params)
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"checked against {config}: all {len(converted)} parameters and buffers "
            f"present, shapes match ({len(params)} parameter tensors, {n_param:,} parameter values, "
            f"{n_trainable:,} trainable in the model)"
        )

    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"model": converted, "__author__": AUTHOR}, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
