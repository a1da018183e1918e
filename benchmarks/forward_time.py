#!/usr/bin/env python
"""Inference time per image of the shipped models, measured side by side in one run.

    python benchmarks/forward_time.py                      # CPU, 800x1066, R50 configs
    python benchmarks/forward_time.py --size 800 1333 --device cuda --output out.json

Random weights (the time does not depend on them); one image per forward; the first
``--warmup`` runs are not timed. Each model gets the inference speed-ups
(``smca_d2.speedups.optimize_for_inference``), as LazyPredictor and ``train_net.py --eval-only``
run it (``--plain``: the model as built). Prints a table and writes JSON.
"""

import argparse
import os
import platform
import statistics
import time

import torch
from common import write_json

import smca_d2  # noqa: F401
from smca_d2.speedups import optimize_for_inference

from detectron2.config import LazyConfig, instantiate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = [
    "smca_single_scale_r50_50ep.py",
    "smca_multi_scale_r50_50ep.py",
    "detr_baseline_r50_50ep.py",
]


def time_config(name, size, device, warmup, repeats, plain=False):
    cfg = LazyConfig.load(os.path.join(REPO, "configs", name))
    model = instantiate(cfg.model).to(device).eval()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not plain:  # the model's speed-ups only: this process's malloc is left as it is
        optimize_for_inference(model)
    h, w = size
    inputs = [{"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8).float().to(device)}]
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return {
        "config": name,
        "trainable_params": params,
        "median_s_per_image": statistics.median(times),
        "min_s_per_image": min(times),
        "runs": len(times),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1066), metavar=("H", "W"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain", action="store_true", help="time the models as built, without speed-ups")
    parser.add_argument("--output", default="output/benchmarks/forward_time.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    rows = [time_config(c, args.size, args.device, args.warmup, args.repeats, args.plain) for c in args.configs]
    print(
        f"\ninference, one {args.size[0]}x{args.size[1]} image, {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads" + (", models as built (no speed-ups)" if args.plain else "")
    )
    print(f"| {'config':34s} | {'params':>11s} | {'median s/img':>12s} | {'min s/img':>9s} |")
    print(f"|{'-' * 36}|{'-' * 13}|{'-' * 14}|{'-' * 11}|")
    for r in rows:
        print(
            f"| {r['config']:34s} | {r['trainable_params']:11,d} | {r['median_s_per_image']:12.3f} | {r['min_s_per_image']:9.3f} |"
        )
    result = {
        "size_hw": list(args.size),
        "device": args.device,
        "speedups": not args.plain,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": rows,
    }
    write_json(args.output, result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
