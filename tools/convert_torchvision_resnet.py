#!/usr/bin/env python
"""Convert torchvision ResNet ImageNet weights into a Detectron2 backbone checkpoint.

    python tools/convert_torchvision_resnet.py --input resnet50-11ad3fa6.pth --output r50_d2.pth
    python train_net.py --config-file configs/smca_single_scale_r50_50ep.py \
        train.init_checkpoint=r50_d2.pth

``--input``: a torchvision ``resnet{18,34,50,101,152}`` state dict, read with
``torch.load(weights_only=True)``. The output, ``{"model": {"backbone.stem.conv1.weight": ...,
"backbone.res2.0.conv1.norm.weight": ...}, "__author__": ...}``, loads into smca_d2's configs
(Detectron2 ResNet, ``stride_in_1x1=False``) by exact key names; ``fc`` is dropped. With
``--config``, the result is checked against that config's backbone (every key present, shapes
equal). See ``smca_d2/checkpoint/torchvision_resnet.py``.
"""

import argparse
import os
import pickle
import sys

import torch

import smca_d2  # noqa: F401  (detectron2 compatibility fixes)
from smca_d2.checkpoint.torchvision_resnet import (
    convert_torchvision_resnet,
    load_torchvision_state_dict,
)
from smca_d2.model_zoo import resolve_config_file

AUTHOR = "smca_d2 convert_torchvision_resnet"


def check_against_config(converted, config_path: str):
    """Messages for keys or shapes of the config's backbone that the result does not match."""
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(resolve_config_file(config_path))
    backbone = instantiate(cfg.model.backbone)
    expected = {"backbone." + k: v.shape for k, v in backbone.state_dict().items()}
    problems = [f"missing: {k}" for k in expected if k not in converted]
    problems += [f"unexpected: {k}" for k in converted if k not in expected]
    problems += [
        f"shape of {k}: {tuple(converted[k].shape)} != {tuple(s)}"
        for k, s in expected.items()
        if k in converted and converted[k].shape != s
    ]
    return problems


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="torchvision ResNet state dict (.pth)")
    parser.add_argument("--output", required=True, help="Detectron2 checkpoint to write (.pth)")
    parser.add_argument("--depth", type=int, choices=(18, 34, 50, 101, 152), help="expected depth (checked)")
    parser.add_argument("--config", help="check the result against this config's backbone")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        state_dict = load_torchvision_state_dict(args.input)
        converted = convert_torchvision_resnet(state_dict, depth=args.depth)
    except (KeyError, ValueError, RuntimeError, pickle.UnpicklingError) as e:  # unsafe or corrupt file
        print(f"error: {e}", file=sys.stderr)
        return 1
    dropped = sorted(k for k in state_dict if k.startswith("fc."))
    print(f"read {len(state_dict)} tensors from {args.input}; converted {len(converted)} (dropped {dropped})")
    if args.config:
        problems = check_against_config(converted, args.config)
        if problems:
            print("error: the result does not match the backbone of " + args.config, file=sys.stderr)
            print("\n".join(problems[:20]), file=sys.stderr)
            return 1
        print(f"checked against the backbone of {args.config}: all keys and shapes match")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save({"model": converted, "__author__": AUTHOR}, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
