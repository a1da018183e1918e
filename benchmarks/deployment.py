#!/usr/bin/env python
"""CPU inference per image of the deployment paths, side by side in one run, each with its
largest difference from the eager float32 model.

    python benchmarks/deployment.py                       # single-scale R50, 800x1066 and 800x1333
    python benchmarks/deployment.py --configs smca_multi_scale_r50_50ep.py --sizes 800x1066

Paths (``--variants``):

* ``eager_fp32``: the model as built (``model([{"image": ...}])``), float32;
* ``optimized_fp32``: with the inference speed-ups (``smca_d2.speedups.optimize_for_inference``:
  batch norms folded into convolutions, ...), as LazyPredictor runs it;
* ``onnxruntime_fp32``: the dynamic-size ONNX file of ``smca_d2.inference.export.export_onnx``
  (exported once, used for every size), ONNX Runtime on the CPU with as many threads as torch;
* ``optimized_bf16``: the optimized model under bfloat16 autocast
  (``LazyPredictor(precision="bfloat16")``), on CPUs with bfloat16 instructions.

Random weights (seeded; the time does not depend on them). Each round runs every path once on the
same image, in turn, after one untimed warm-up run each; the median over ``--rounds`` is reported.
Differences from ``eager_fp32`` on that image: the torch paths compare every query's class scores
and boxes (in pixels) before the top-k, so a reordering of near-equal scores does not count as a
difference; ONNX Runtime returns only the top-k detections and is compared detection by
detection.

``--ap CONFIG CHECKPOINT NAME`` (repeatable) also evaluates a trained checkpoint on its
config's test set twice, float32 and bfloat16 autocast (the optimized model, as
``LazyPredictor(precision=...)`` and ``train_net.py --eval-only train.amp.enabled=True`` run
it), and records the box AP and the time per image of each. ``--skip-speed`` runs only that.
Prints tables and writes JSON (``--output``).
"""

import argparse
import copy
import os
import statistics
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch
from common import environment, write_json
from torchvision.ops import box_convert

import smca_d2  # noqa: F401  (registrations)
from smca_d2.engine import inference_autocast, inference_dtype, load_config
from smca_d2.inference.export import SMCAExportWrapper, export_onnx
from smca_d2.speedups import optimize_for_inference

from detectron2.config import instantiate
from detectron2.structures import ImageList

VARIANTS = ("eager_fp32", "optimized_fp32", "onnxruntime_fp32", "optimized_bf16")
DEFAULT_CONFIGS = ["smca_single_scale_r50_50ep.py"]
DEFAULT_SIZES = [(800, 1066), (800, 1333)]


def _size(text: str):
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def _image(h: int, w: int) -> torch.Tensor:
    """A photo-like test image: smooth colour gradients with rectangles, float CHW 0..255."""
    rng = np.random.default_rng(h * 10000 + w)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    image = np.stack([128 + 100 * np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], axis=0)
    for _ in range(8):
        y, x = rng.integers(0, h - h // 5), rng.integers(0, w - w // 5)
        image[:, y : y + h // 6, x : x + w // 6] = rng.integers(0, 255, size=(3, 1, 1))
    return torch.as_tensor(image, dtype=torch.float32)


def _raw_outputs(model, image: torch.Tensor, dtype) -> Dict[str, np.ndarray]:
    """Every query's class scores [Q, C] and XYXY pixel boxes [Q, 4] for one unpadded image."""
    h, w = image.shape[-2:]
    x = (image - model.pixel_mean) / model.pixel_std
    images = ImageList.from_tensors([x], model.size_divisibility)
    with torch.no_grad(), inference_autocast("cpu", dtype):
        out = model.forward_outputs(images)
    boxes = box_convert(out["pred_boxes"][0].float(), "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
    return {"scores": out["pred_logits"][0].float().sigmoid().numpy(), "boxes": boxes.numpy()}


def _topk_outputs(model, image: torch.Tensor) -> List[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in SMCAExportWrapper(model)(image)]


def _diff(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> Dict[str, float]:
    return {
        "max_box_diff_px": float(np.abs(a["boxes"] - b["boxes"]).max()),
        "max_score_diff": float(np.abs(a["scores"] - b["scores"]).max()),
    }


def _topk_diff(a: List[np.ndarray], b: List[np.ndarray]) -> Dict[str, float]:
    return {
        "max_box_diff_px": float(np.abs(a[0] - b[0]).max()),
        "max_score_diff": float(np.abs(a[1] - b[1]).max()),
        "classes_equal_fraction": float((a[2] == b[2]).mean()),
    }


def build_variants(model, names, threads: int, workdir: str) -> Dict[str, dict]:
    """For each path: a ``run(image)`` function and what it needs to compare its outputs."""
    variants = {}
    optimized = None
    if {"optimized_fp32", "optimized_bf16"} & set(names):
        optimized = optimize_for_inference(copy.deepcopy(model))
    for name in names:
        if name == "eager_fp32":
            variants[name] = {"run": lambda img, m=model: m([{"image": img}]), "model": model, "dtype": None}
        elif name == "optimized_fp32":
            variants[name] = {"run": lambda img, m=optimized: m([{"image": img}]), "model": optimized, "dtype": None}
        elif name == "optimized_bf16":
            dtype = inference_dtype("cpu", "bfloat16")
            if dtype is None:
                variants[name] = {"skipped": "this CPU has no bfloat16 instructions"}
                continue

            def run(img, m=optimized, d=dtype):
                with inference_autocast("cpu", d):
                    return m([{"image": img}])

            variants[name] = {"run": run, "model": optimized, "dtype": dtype}
        elif name == "onnxruntime_fp32":
            try:
                import onnxruntime
            except ImportError:
                variants[name] = {"skipped": "onnxruntime is not installed (pip install 'smca-d2[export]')"}
                continue
            path = os.path.join(workdir, "model.onnx")
            start = time.perf_counter()
            export_onnx(model, path)
            export_s = time.perf_counter() - start
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            variants[name] = {
                "run": lambda img, s=session: s.run(None, {"image": img.numpy()}),
                "export_s": export_s,
                "onnx_mb": os.path.getsize(path) / 2**20,
            }
        else:
            raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    return variants


def measure(config: str, sizes, names, rounds: int, threads: int, overrides=()) -> List[dict]:
    """The rows of one config at every size (the ONNX file is exported once, for any size)."""
    cfg = load_config(config, list(overrides))
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    results = []
    with tempfile.TemporaryDirectory() as workdir, torch.no_grad():
        variants = build_variants(model, names, threads, workdir)
        active = {n: v for n, v in variants.items() if "run" in v}
        for size in sizes:
            image = _image(*size)
            times: Dict[str, List[float]] = {n: [] for n in active}
            for v in active.values():  # warm-up
                v["run"](image)
            for _ in range(rounds):
                for name, v in active.items():
                    start = time.perf_counter()
                    v["run"](image)
                    times[name].append(time.perf_counter() - start)
            reference_raw = _raw_outputs(model, image, None)
            reference_topk = _topk_outputs(model, image)
            rows = {}
            for name, v in variants.items():
                if "skipped" in v:
                    rows[name] = {"skipped": v["skipped"]}
                    continue
                if name == "onnxruntime_fp32":
                    diff = _topk_diff([np.asarray(a) for a in v["run"](image)], reference_topk)
                    diff["compared"] = "top-k detections"
                else:
                    diff = _diff(_raw_outputs(v["model"], image, v["dtype"]), reference_raw)
                    diff["compared"] = "every query"
                rows[name] = {
                    "median_s_per_image": statistics.median(times[name]),
                    "min_s_per_image": min(times[name]),
                    "rounds": len(times[name]),
                    **diff,
                    **{k: v[k] for k in ("export_s", "onnx_mb") if k in v},
                }
            results.append({"config": config, "size": list(size), "variants": rows})
    return results


def evaluate_precisions(config: str, checkpoint: str, name: str, overrides=()) -> dict:
    """Box AP and time per image of ``checkpoint`` on ``config``'s test set in float32 and under
    bfloat16 autocast."""
    from smca_d2.inference import load_inference_weights

    from detectron2.evaluation import inference_on_dataset

    cfg = load_config(config, ["train.device=cpu", *overrides])
    if "output_dir" in cfg.dataloader.evaluator:
        cfg.dataloader.evaluator.output_dir = None
    model = instantiate(cfg.model).eval()
    load_inference_weights(model, checkpoint)
    optimize_for_inference(model)
    loader = instantiate(cfg.dataloader.test)
    record = {"dataset": name, "config": config, "checkpoint": os.path.basename(checkpoint), "images": len(loader)}
    for precision in ("float32", "bfloat16"):
        dtype = inference_dtype("cpu", precision)
        if precision == "bfloat16" and dtype is None:
            record[precision] = {"skipped": "this CPU has no bfloat16 instructions"}
            continue
        start = time.perf_counter()
        with torch.no_grad(), inference_autocast("cpu", dtype):
            results = inference_on_dataset(model, loader, instantiate(cfg.dataloader.evaluator))
        seconds = time.perf_counter() - start
        bbox = results["bbox"]
        record[precision] = {
            "AP": bbox["AP"],
            "AP50": bbox["AP50"],
            "AP75": bbox["AP75"],
            "s_per_image": seconds / len(loader),
        }
    return record


def print_ap_table(rows: List[dict]) -> None:
    print(f"{'val set':10} {'precision':10} {'AP':>7} {'AP50':>7} {'s/image':>8}")
    for r in rows:
        for precision in ("float32", "bfloat16"):
            row = r[precision]
            if "skipped" in row:
                print(f"{r['dataset']:10} {precision:10} skipped: {row['skipped']}")
            else:
                print(f"{r['dataset']:10} {precision:10} {row['AP']:7.2f} {row['AP50']:7.2f} {row['s_per_image']:8.3f}")


def print_table(results: List[dict]) -> None:
    print(f"{'config':34} {'size':>9} {'path':18} {'s/image':>8} {'vs eager':>8} {'max box px':>10} {'max score':>9}")
    for r in results:
        eager = r["variants"].get("eager_fp32", {}).get("median_s_per_image")
        for name, row in r["variants"].items():
            size = f"{r['size'][0]}x{r['size'][1]}"
            if "skipped" in row:
                print(f"{r['config']:34} {size:>9} {name:18} skipped: {row['skipped']}")
                continue
            t = row["median_s_per_image"]
            ratio = f"{eager / t:.2f}x" if eager else "-"
            print(
                f"{r['config']:34} {size:>9} {name:18} {t:8.3f} {ratio:>8} "
                f"{row['max_box_diff_px']:10.2g} {row['max_score_diff']:9.2g}"
            )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="config files or model-zoo names")
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, type=_size, metavar="HxW")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default="output/benchmarks/deployment.json")
    parser.add_argument(
        "--ap",
        nargs=3,
        action="append",
        default=[],
        metavar=("CONFIG", "CHECKPOINT", "NAME"),
        help="also evaluate this trained checkpoint in float32 and bfloat16 (repeatable)",
    )
    parser.add_argument("--skip-speed", action="store_true", help="only the --ap evaluations")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, key=value (every config)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    if not args.skip_speed:
        results = [
            row
            for config in args.configs
            for row in measure(config, args.sizes, args.variants, args.rounds, args.threads, args.opts)
        ]
        print_table(results)
    ap_rows = [evaluate_precisions(config, checkpoint, name) for config, checkpoint, name in args.ap]
    if ap_rows:
        print_ap_table(ap_rows)
    record = {"environment": environment("cpu", args.threads), "results": results, "precision_ap": ap_rows}
    write_json(args.output, record)
    print(f"wrote {args.output}")
    return record


if __name__ == "__main__":
    main()
