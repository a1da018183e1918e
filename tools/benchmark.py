#!/usr/bin/env python
"""Speed of a LazyConfig model: inference images/s and training iterations/s, with data loading
excluded (one batch loaded once and reused) and included (the config's data loaders).

    python tools/benchmark.py --config-file configs/demo/smca_r18_synthetic.py
    python tools/benchmark.py --config-file CFG --tasks inference train --iters 20 \\
        --device cuda --output out.json train.init_checkpoint=...

Prints a table and writes JSON. The model has the config's weights if ``train.init_checkpoint``
is set, random ones otherwise (speed does not depend on them).
"""

import argparse
import itertools
import json
import os
import platform
import time

import torch

import smca_d2  # noqa: F401
from smca_d2.checkpoint import SafeCheckpointer
from smca_d2.engine import load_config, use_ema_weights
from smca_d2.speedups import apply_speedups
from smca_d2.speedups.memory import keeps_freed_cpu_memory

from detectron2.config import instantiate


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(step, iters, warmup, device):
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - start) / iters


def bench_inference(cfg, model, args):
    model.eval()
    loader = instantiate(cfg.dataloader.test)
    batches = itertools.cycle(loader)
    fixed = next(iter(loader))
    with torch.no_grad():
        excluded = _timed(lambda: model(fixed), args.iters, args.warmup, args.device)
        included = _timed(lambda: model(next(batches)), args.iters, args.warmup, args.device)
    n = len(fixed)
    return {"images_per_s_data_excluded": n / excluded, "images_per_s_data_included": n / included}


def bench_train(cfg, model, args):
    model.train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = iter(instantiate(cfg.dataloader.train))
    fixed = next(loader)

    def step(batch):
        losses = sum(model(batch).values())
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()

    excluded = _timed(lambda: step(fixed), args.iters, args.warmup, args.device)
    included = _timed(lambda: step(next(loader)), args.iters, args.warmup, args.device)
    return {
        "iters_per_s_data_excluded": 1 / excluded,
        "iters_per_s_data_included": 1 / included,
        "batch_size_per_process": len(fixed),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--tasks", nargs="+", default=["inference", "train"], choices=["inference", "train"])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="output/benchmarks/benchmark.json")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    args = parser.parse_args()

    cfg = load_config(args.config_file, args.opts)
    cfg.train.device = args.device
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(args.device)
    if cfg.train.init_checkpoint:
        SafeCheckpointer(model, ema_weights=use_ema_weights(cfg)).load(cfg.train.init_checkpoint)
    # The speed-ups train_net.py trains with (train.speedups), so that the figures are its own.
    apply_speedups(model, cfg.train.speedups, device=args.device, training=True)
    results = {}
    if "inference" in args.tasks:
        results["inference"] = bench_inference(cfg, model, args)
    if "train" in args.tasks:
        results["train"] = bench_train(cfg, model, args)
    if args.device.startswith("cuda"):
        results["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20

    print(f"\n{args.config_file} on {args.device} ({torch.get_num_threads()} threads), {args.iters} timed iterations")
    print("| measure | data loading excluded | data loading included |")
    print("|---|---|---|")
    if "inference" in results:
        r = results["inference"]
        print(f"| inference images/s | {r['images_per_s_data_excluded']:.2f} | {r['images_per_s_data_included']:.2f} |")
    if "train" in results:
        r = results["train"]
        print(
            f"| training iterations/s (batch {r['batch_size_per_process']}) | "
            f"{r['iters_per_s_data_excluded']:.2f} | {r['iters_per_s_data_included']:.2f} |"
        )
    record = {
        "config": args.config_file,
        "overrides": args.opts,
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "keep_freed_cpu_memory": keeps_freed_cpu_memory(),
        "iters": args.iters,
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
