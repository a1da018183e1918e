#!/usr/bin/env python
"""Speed and memory of SMCA-DETR, side by side with the official implementation.

    python benchmarks/speed.py                                   # ours only (CPU)
    python benchmarks/speed.py --official-repo /path/to/SMCA-DETR  # + the official code
    python benchmarks/speed.py --device cuda --amp --official-repo ...

``--official-repo`` is a work tree of gaopengcuhk/SMCA-DETR; its ``models`` and ``util`` are
imported from there at run time (nothing of it is part of this repository).

What is measured, in one run (every measurement in its own fresh process, ``speed_worker.py``,
so that peak memory belongs to one model and one task):

1. single-scale R50 SMCA, ours and official: inference time per image at each ``--sizes``
   (default 800x1066 and 800x1333), training time per iteration (``--train-batch`` images of
   ``--train-size``; forward, loss with Hungarian matching, backward, gradient clipping, AdamW
   step) and peak memory of each (CPU: peak resident set size above the level after the model is
   built, and the peak of the tensors one call allocates, from torch.profiler, which does not
   depend on malloc; GPU: ``torch.cuda.max_memory_allocated``); every variant runs in
   ``--inference-rounds`` / ``--train-rounds`` interleaved rounds, one process each (medians
   reported). Both models get the same random weights (the official ones, converted with
   smca_d2's converter, all 92 class columns) and the same inputs; the outputs of every decoder
   layer and the training losses are checked equal;
2. where the time goes (forward hooks): backbone, encoder, decoder, the Gaussian prior,
   matcher, backward + optimizer step, and what share of inference is the backbone (the limit
   of any speed-up of the rest);
3. our multi-scale SMCA and DETR baseline (inference and training);
4. how inference time grows with the image size and the number of queries (ours and official).

``--max-batch`` adds, for each model, training at the largest batch that fits (on a GPU: searched
for from the peak memory of batches 2 and 4 within ``--max-batch-memory`` of the device's memory,
``--max-batch-cap`` at most; on the CPU: ``--max-batch-cap`` images, no search). ``--models``
without ``smca_single_scale`` leaves out the single-scale sections (1, 2 and 4). The JSON is
written after each section, marked ``"complete": false`` until the run ends.

"ours" is the model with the speed-ups of the config's ``train.speedups``
(:func:`smca_d2.speedups.apply_speedups`), as train_net.py trains it (and evaluates it during
training); the variants of ours (:data:`INFERENCE_VARIANTS`, :data:`TRAIN_VARIANTS`; ``--variants``
picks some) change those options: "ours_optimized" gets the inference speed-ups, as LazyPredictor
and ``train_net.py --eval-only`` run it (frozen batch norms folded into the convolutions, a
channels-last backbone on the CPU); "ours_plain" is the model as built, without any speed-up (the
tables show what the speed-ups buy); "ours_channels_last" trains with ``channels_last=True``,
"ours_torch_dropout" (CPU) with torch's dropout masks (``fast_cpu_dropout=False``) and
"ours_default_malloc" (CPU) infers with glibc's malloc defaults (``keep_freed_cpu_memory=False``),
as the official code runs; the official code also runs once more with ours' malloc setting
("official_same_malloc"): the code-only comparison.

Prints tables (``speed_report.py``) and writes JSON (``--output``) and a PNG next to it;
``--replot JSON`` redraws both from an earlier run. ``--opts`` overrides our configs (e.g. a
smaller model for a quick check; not with ``--official-repo``).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from speed_models import CONFIGS
from speed_report import plain_ratios, plot_report, print_report, time_key

HERE = os.path.dirname(os.path.abspath(__file__))

# Variants of one single-scale row: name -> the spec entries that make it (see speed_models.py);
# "ours" first. ``cpu``: measured on the CPU only; ``official``: only with --official-repo.
INFERENCE_VARIANTS = {
    "ours": dict(impl="ours", speedups={}),
    "ours_optimized": dict(impl="ours", speedups={}, optimize=True),
    "ours_plain": dict(impl="ours", speedups=None),
    "ours_default_malloc": dict(impl="ours", speedups={"keep_freed_cpu_memory": False}),
    "official": dict(impl="official"),
    "official_same_malloc": dict(impl="official", keep_freed_memory=True),
}
TRAIN_VARIANTS = {
    "ours": dict(impl="ours", speedups={}),
    "ours_plain": dict(impl="ours", speedups=None),
    "ours_channels_last": dict(impl="ours", speedups={"channels_last": True}),
    "ours_torch_dropout": dict(impl="ours", speedups={"fast_cpu_dropout": False}),
    "official": dict(impl="official"),
    "official_same_malloc": dict(impl="official", keep_freed_memory=True),
}
CPU_ONLY = {"ours_default_malloc", "ours_torch_dropout", "official_same_malloc"}
VARIANTS = list(dict.fromkeys([*INFERENCE_VARIANTS, *TRAIN_VARIANTS]))
# Output equality: (variant, reference) pairs of the variants measured.
OUTPUT_PAIRS = [
    ("ours_optimized", "ours"),
    ("ours", "ours_plain"),
    ("ours", "official"),
    ("ours_optimized", "official"),
]


def parse_size(text: str):
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 800x1066), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--official-repo", default=None, help="work tree of gaopengcuhk/SMCA-DETR (optional)")
    add("--device", default="cpu")
    add("--amp", action="store_true", help="also measure mixed precision (CUDA only)")
    add("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    add("--sizes", type=parse_size, nargs="+", default=[(800, 1066), (800, 1333)], metavar="HxW")
    add("--train-size", type=parse_size, default=(800, 1066), metavar="HxW")
    add("--train-batch", type=int, default=2)
    add(
        "--max-batch",
        action="store_true",
        help="also train each model at the largest batch that fits (see --max-batch-cap)",
    )
    add(
        "--max-batch-cap",
        type=int,
        default=64,
        help="the largest batch --max-batch tries; on the CPU the batch it trains (default: %(default)s)",
    )
    add(
        "--max-batch-memory",
        type=float,
        default=0.9,
        help="fraction of the GPU's memory a --max-batch batch may take (default: %(default)s)",
    )
    add("--warmup", type=int, default=1)
    add(
        "--train-warmup",
        type=int,
        default=4,
        help="untimed training iterations first (until malloc's heap has grown to a step's peak; "
        "with glibc defaults the official code needs about 4)",
    )
    add("--repeats", type=int, default=3)
    add(
        "--inference-rounds",
        type=int,
        default=3,
        help="fresh processes per single-scale inference variant, run in turn like --train-rounds "
        "(default: %(default)s)",
    )
    add(
        "--train-rounds",
        type=int,
        default=3,
        help="fresh processes per training variant, run in turn (ours, official, ...) and reported "
        "as the median of the rounds' times (default: %(default)s)",
    )
    add(
        "--scaling-sizes",
        type=parse_size,
        nargs="*",
        default=[(480, 640), (640, 853), (800, 1066), (1024, 1365)],
        metavar="HxW",
    )
    add("--scaling-queries", type=int, nargs="*", default=[100, 300, 900])
    add("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    add(
        "--variants",
        nargs="+",
        default=VARIANTS,
        choices=VARIANTS,
        metavar="VARIANT",
        help="single-scale variants to measure (default: all; 'ours' always; the official ones "
        "need --official-repo): " + ", ".join(VARIANTS),
    )
    add("--skip", nargs="*", default=[], choices=["profile", "scaling", "train"])
    add(
        "--opts",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides of our configs, e.g. model.transformer.decoder.num_layers=2 (a quick check)",
    )
    add("--tol", type=float, default=1e-4, help="max |difference| of outputs (default: %(default)s)")
    add("--seed", type=int, default=0)
    add("--output", default="output/benchmarks/speed.json")
    add(
        "--replot",
        default=None,
        metavar="JSON",
        help="only print the tables and write the plot of an earlier run's JSON",
    )
    args = parser.parse_args(argv)
    if args.amp and not args.device.startswith("cuda"):
        parser.error("--amp needs --device cuda")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: torch sees no CUDA device on this machine")
    elif args.device != "cpu":
        parser.error(f"--device {args.device!r}: expected cpu or cuda[:N]")
    if args.official_repo and not os.path.isfile(os.path.join(args.official_repo, "models", "detr.py")):
        parser.error(f"--official-repo {args.official_repo!r} is not a work tree of SMCA-DETR (no models/detr.py)")
    if args.official_repo and args.opts:
        parser.error("--opts changes our model only: it cannot be compared with the official code")
    if args.max_batch_cap < 2:
        parser.error(f"--max-batch-cap {args.max_batch_cap}: expected 2 or more")
    if not 0 < args.max_batch_memory <= 1:
        parser.error(f"--max-batch-memory {args.max_batch_memory}: expected a fraction in (0, 1]")
    if any("=" not in o for o in args.opts):
        parser.error(f"--opts: expected KEY=VALUE, got {[o for o in args.opts if '=' not in o]}")
    args.variants = ["ours"] + [v for v in args.variants if v != "ours"]
    return args


def _describe(spec: dict) -> str:
    """One line for the progress output: implementation, model, task, size and variant."""
    desc = (
        f"{spec['impl']:8s} {spec.get('model', 'smca_single_scale'):17s} {spec['task']:9s} "
        f"{spec['size'][0]}x{spec['size'][1]}"
        + (f" q{spec['num_queries']}" if spec.get("num_queries") else "")
        + (" amp" if spec.get("amp") else "")
    )
    if spec["impl"] == "ours":
        speedups = spec.get("speedups")
        desc += " plain" if speedups is None else "".join(f" {k}={v}" for k, v in speedups.items())
        desc += " optimized" if spec.get("optimize") else ""
    elif spec.get("keep_freed_memory"):
        desc += " keep-freed"
    return desc


class Driver:
    """Runs one task per fresh worker process (speed_worker.py) with the run's settings."""

    def __init__(self, args, tmp):
        self.args, self.tmp, self.n = args, tmp, 0

    def spec(self, **spec) -> dict:
        a = self.args
        return {
            "device": a.device,
            "threads": a.threads,
            "warmup": a.warmup,
            "repeats": a.repeats,
            "train_warmup": a.train_warmup,
            "seed": a.seed,
            "official_repo": a.official_repo,
            "batch": a.train_batch,
            "max_batch_cap": a.max_batch_cap,
            "max_batch_memory": a.max_batch_memory,
            "opts": list(a.opts),
            "speedups": {},
            **spec,
        }

    def run(self, **spec) -> dict:
        """Run one task in a fresh process; returns its result dict."""
        spec = self.spec(**spec)
        desc = _describe(spec)
        print(f"  {desc} ...", end="", flush=True)
        t0 = time.perf_counter()
        result = self.launch(spec, desc)
        print(f" {time.perf_counter() - t0:.0f} s", flush=True)
        return result

    def launch(self, spec: dict, desc: str) -> dict:
        self.n += 1
        spec_file = os.path.join(self.tmp, f"spec{self.n}.json")
        out_file = os.path.join(self.tmp, f"result{self.n}.json")
        with open(spec_file, "w") as f:
            json.dump({**spec, "result_file": out_file}, f)
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "speed_worker.py"), spec_file], capture_output=True, text=True
        )
        if proc.returncode != 0:
            print(" FAILED")
            raise SystemExit(f"worker failed ({desc}):\n{proc.stderr[-4000:]}")
        with open(out_file) as f:
            return json.load(f)


def median_of_rounds(results: List[dict]) -> dict:
    """One variant measured in several rounds (processes): the first round's result with the
    median time (``s_per_iter`` or ``s_per_image``) and the median peak memory of all rounds,
    and each round's (``rounds_<key>``). The peak RSS of one process varies by tens of MiB with
    where ``malloc`` happens to place blocks (one arena per thread)."""
    merged = dict(results[0])
    for key in (time_key(merged), "peak_mem_mib"):
        values = [r[key] for r in results if key in r]
        if values:
            merged[key] = statistics.median(values)
            merged[f"rounds_{key}"] = values
    return merged


def run_rounds(drv: "Driver", variants: Dict[str, dict], rounds: int, **spec) -> Dict[str, dict]:
    """Each variant (name -> spec) run ``rounds`` times, in interleaved rounds (v1, v2, ..., v1,
    v2, ...: a slow spell of the machine hits all variants), merged by :func:`median_of_rounds`."""
    results: Dict[str, List[dict]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, variant in variants.items():
            results[name].append(drv.run(**spec, **variant))
    return {name: median_of_rounds(r) for name, r in results.items()}


def max_abs_diff(a_file: str, b_file: str) -> dict:
    import torch

    a, b = torch.load(a_file), torch.load(b_file)
    return {
        "max_abs_logits": max(float((x[0] - y[0]).abs().max()) for x, y in zip(a, b)),
        "max_abs_boxes": max(float((x[1] - y[1]).abs().max()) for x, y in zip(a, b)),
        "layers": len(a),
    }


def chosen_variants(catalog: Dict[str, dict], args) -> Dict[str, dict]:
    """The variants of ``catalog`` this run measures (``--variants``, the device, the official code)."""
    return {
        name: v
        for name, v in catalog.items()
        if name in args.variants
        and (args.device == "cpu" or name not in CPU_ONLY)
        and (args.official_repo or v["impl"] != "official")
    }


def shared_official_weights(args, tmp) -> str:
    """The official model, seeded and perturbed, saved as the official main.py saves: the
    weights of both implementations (ours through the converter)."""
    import torch
    from speed_models import harness

    import smca_d2  # noqa: F401

    model, official_ns, _ = harness().build_official_model(args.official_repo, "cpu", args.seed)
    ckpt = os.path.join(tmp, "official.pth")
    torch.save({"model": model.state_dict(), "args": official_ns, "epoch": 0}, ckpt)
    return ckpt


def check_outputs(drv: Driver, args, tmp, common: dict) -> dict:
    """Every decoder layer's outputs of the pairs of :data:`OUTPUT_PAIRS` that this run measures."""
    measured = set(chosen_variants(INFERENCE_VARIANTS, args))
    pairs = [(a, b) for a, b in OUTPUT_PAIRS if a in measured and b in measured]
    equal = {}
    for batch in (1, 2):
        files = {}
        for name in dict.fromkeys(n for pair in pairs for n in pair):
            files[name] = os.path.join(tmp, f"out_{name}_{batch}.pt")
            drv.run(
                task="outputs", size=args.sizes[0], batch=batch, save=files[name], **INFERENCE_VARIANTS[name], **common
            )
        for a, b in pairs:
            d = max_abs_diff(files[a], files[b])
            d["pass"] = d["max_abs_logits"] <= args.tol and d["max_abs_boxes"] <= args.tol
            equal[f"{a} vs {b}, batch {batch}, {args.sizes[0][0]}x{args.sizes[0][1]}"] = d
    return equal


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            report = json.load(f)
        print_report(report)
        png = os.path.splitext(args.replot)[0] + ".png"
        plot_report(report, png)
        print(f"\nwrote {png}")
        return report

    from common import environment, write_json

    report: dict = {
        "environment": environment(args.device, args.threads),
        # (the official checkout's folder and the output's file name only: no machine paths in
        # results people share)
        "settings": {
            k: (os.path.basename(os.path.normpath(v)) if k in ("official_repo", "output") and v else v)
            for k, v in vars(args).items()
            if k != "replot"
        },
        "official": bool(args.official_repo),
    }
    impls = ["ours"] + (["official"] if args.official_repo else [])
    precisions = [False] + ([True] if args.amp else [])
    single_scale = "smca_single_scale" in args.models
    report["complete"] = False
    with tempfile.TemporaryDirectory() as tmp:
        drv = Driver(args, tmp)
        common = {"model": "smca_single_scale"}
        single = report["single_scale"] = {"inference": [], "train": [], "equal_outputs": {}}
        if single_scale:
            if args.official_repo:
                common["official_checkpoint"] = shared_official_weights(args, tmp)
            print("single-scale R50: ours" + (" vs official" if args.official_repo else ""))
            single["equal_outputs"] = check_outputs(drv, args, tmp, common)
            write_json(args.output, report)
        for amp in precisions if single_scale else []:
            for size in args.sizes:
                row = {"size": list(size), "amp": amp}
                row.update(
                    run_rounds(
                        drv,
                        chosen_variants(INFERENCE_VARIANTS, args),
                        args.inference_rounds,
                        task="inference",
                        size=size,
                        amp=amp,
                        **common,
                    )
                )
                row["speed_up_over_plain"] = plain_ratios(row)
                single["inference"].append(row)
            if "train" not in args.skip:
                row = {"size": list(args.train_size), "batch": args.train_batch, "amp": amp}
                row.update(
                    run_rounds(
                        drv,
                        chosen_variants(TRAIN_VARIANTS, args),
                        args.train_rounds,
                        task="train",
                        size=args.train_size,
                        amp=amp,
                        **common,
                    )
                )
                row["speed_up_over_plain"] = plain_ratios(row)
                if args.official_repo:
                    a, b = row["ours"]["initial_loss_no_dropout"], row["official"]["initial_loss_no_dropout"]
                    row["loss_rel_diff"] = abs(a - b) / max(abs(b), 1e-12)
                    row["loss_equal"] = row["loss_rel_diff"] <= args.tol
                single["train"].append(row)
            write_json(args.output, report)
        if single_scale and args.max_batch and "train" not in args.skip:
            single["max_batch"] = [
                {
                    "size": list(args.train_size),
                    "amp": amp,
                    **{
                        impl: drv.run(task="max_batch", size=args.train_size, amp=amp, **TRAIN_VARIANTS[impl], **common)
                        for impl in impls
                    },
                }
                for amp in precisions
            ]
            write_json(args.output, report)

        if single_scale and "profile" not in args.skip:
            print("where the time goes (single-scale R50)")
            report["profile"] = {
                impl: drv.run(task="profile", size=args.train_size, **INFERENCE_VARIANTS[impl], **common)
                for impl in impls
            }
            write_json(args.output, report)

        others = [m for m in args.models if m != "smca_single_scale"]
        if others:
            print("other models (ours)")
        report["other_models"] = []
        for model in others:
            for amp in precisions:
                row = {"model": model, "amp": amp, "inference": {}, "train": None}
                for size in args.sizes:
                    row["inference"][f"{size[0]}x{size[1]}"] = drv.run(
                        impl="ours", model=model, task="inference", size=size, amp=amp
                    )
                if "train" not in args.skip:
                    row["train"] = drv.run(impl="ours", model=model, task="train", size=args.train_size, amp=amp)
                    if args.max_batch:
                        row["max_batch"] = drv.run(
                            impl="ours", model=model, task="max_batch", size=args.train_size, amp=amp
                        )
                report["other_models"].append(row)
                write_json(args.output, report)

        if single_scale and "scaling" not in args.skip:
            print("scaling with image size and queries (single-scale, inference)")
            report["scaling"] = {"sizes": [], "queries": []}
            for size in args.scaling_sizes:
                report["scaling"]["sizes"].append(
                    {
                        "size": list(size),
                        **{
                            impl: drv.run(
                                task="inference", size=size, **INFERENCE_VARIANTS[impl], model="smca_single_scale"
                            )["s_per_image"]
                            for impl in impls
                        },
                    }
                )
            for q in args.scaling_queries:
                report["scaling"]["queries"].append(
                    {
                        "num_queries": q,
                        **{
                            impl: drv.run(
                                task="inference",
                                size=args.sizes[0],
                                num_queries=q,
                                **INFERENCE_VARIANTS[impl],
                                model="smca_single_scale",
                            )["s_per_image"]
                            for impl in impls
                        },
                    }
                )

    report["complete"] = True
    print_report(report)
    write_json(args.output, report)
    png = os.path.splitext(args.output)[0] + ".png"
    plot_report(report, png)
    print(f"\nwrote {args.output} and {png}")
    return report


if __name__ == "__main__":
    main()
