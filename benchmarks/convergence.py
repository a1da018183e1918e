#!/usr/bin/env python
"""Convergence of SMCA vs. the DETR baseline: box AP against training iterations.

Trains every model of a benchmark (by default SMCA single-scale, SMCA multi-scale and the
DETR-style baseline, i.e. the same code with the spatial modulation off) with identical backbone,
data, batch and seeds through ``train_net.py``, evaluating box AP every ``train.eval_period``
iterations. The baseline's schedule is ``--baseline-factor`` times longer (10), as the paper
compares SMCA at 50 epochs with DETR at 500: the summary gives the iterations it needs to reach
each model's final AP, as a multiple of that model's. Then the script writes ``convergence.json`` and ``convergence.png`` (one
panel per dataset, one curve per model; the min..max band over seeds when there are several) and
prints a table.

Default run (the two CPU benchmarks, the baseline trained 10x longer (``--baseline-factor``);
hours on a 2-core machine)::

    python benchmarks/convergence.py

Other choices::

    python benchmarks/convergence.py --datasets synthetic --seeds 0 1 2
    python benchmarks/convergence.py --datasets synthetic train.max_iter=200   # quick look
    # COCO on 8 GPUs, by configuration alone:
    python benchmarks/convergence.py --num-gpus 8 \\
        --config coco:smca_single_scale=configs/smca_single_scale_r50_50ep.py \\
        --config coco:smca_multi_scale=configs/smca_multi_scale_r50_50ep.py \\
        --config coco:detr_baseline=configs/detr_baseline_r50_50ep.py train.eval_period=7330

A run whose ``metrics.json`` already holds the final evaluation is not trained again (``--force``
retrains it), so an interrupted benchmark continues where it stopped. The curves, the summary,
the table and the plot are made by ``convergence_report.py``.
"""

import argparse
import os
import re
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

from convergence_report import BASELINE, plot, print_table, read_curve, summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDE = re.compile(r"^\+?[A-Za-z_][\w.]*=")  # a config override, not DATASET:MODEL=CONFIG

#: The built-in benchmarks: dataset -> model name -> config file (relative to the repository).
BENCHMARKS: Dict[str, Dict[str, str]] = {
    dataset: OrderedDict(
        (name, f"configs/convergence/{dataset}_{name}.py")
        for name in ("smca_single_scale", "smca_multi_scale", BASELINE)
    )
    for dataset in ("synthetic", "deepforest")
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add(
        "--datasets",
        nargs="+",
        default=None,
        choices=sorted(BENCHMARKS),
        help="built-in benchmarks to run (default: all, unless --config is given)",
    )
    add(
        "--config",
        action="append",
        default=[],
        metavar="DATASET:MODEL=CONFIG",
        help="add a run: a LazyConfig for MODEL on DATASET (repeatable); the model named "
        f"'{BASELINE}' is the reference of the summary",
    )
    add("--models", nargs="+", default=None, help="only these model names")
    add("--seeds", nargs="+", type=int, default=[0], help="training seeds (default: 0)")
    add("--num-gpus", type=int, default=1, help="processes per run (train_net.py --num-gpus)")
    add(
        "--baseline-factor",
        type=int,
        default=10,
        metavar="K",
        help=f"the '{BASELINE}' model trains K times the iterations of its config, with its lr "
        "drop and its evaluation period scaled along (K/2 times the period: twice the "
        "evaluations over the longer run); the paper compares SMCA at 50 epochs with DETR at "
        "500 (default: %(default)s)",
    )
    add("--output", default="output/benchmarks/convergence", help="runs, JSON and plot go here (default: %(default)s)")
    add("--force", action="store_true", help="retrain runs that are already complete")
    add("--plot-only", action="store_true", help="only collect existing runs and plot")
    parser.epilog = "Trailing key=value overrides (e.g. train.max_iter=200) go to every run."
    # key=value overrides may follow options taking several values (--models a b key=value).
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = [a for a in argv if OVERRIDE.match(a)]
    args = parser.parse_args([a for a in argv if not OVERRIDE.match(a)])
    args.opts = opts
    runs = OrderedDict()  # (dataset, model) -> config
    datasets = args.datasets if args.datasets is not None else ([] if args.config else sorted(BENCHMARKS))
    for dataset in datasets:
        for model, config in BENCHMARKS[dataset].items():
            runs[(dataset, model)] = os.path.join(ROOT, config)
    for spec in args.config:
        try:
            key, config = spec.split("=", 1)
            dataset, model = key.split(":", 1)
        except ValueError:
            parser.error(f"--config {spec!r}: expected DATASET:MODEL=CONFIG")
        if not os.path.isfile(config):
            parser.error(f"--config {spec!r}: no such file {config!r}")
        runs[(dataset, model)] = os.path.abspath(config)
    args.all_runs = OrderedDict(runs)  # reported (when on disk) even if not trained now
    if args.models is not None:
        unknown = set(args.models) - {m for _, m in runs}
        if unknown:
            parser.error(f"--models: unknown {sorted(unknown)}; known: {sorted({m for _, m in runs})}")
        runs = OrderedDict((k, v) for k, v in runs.items() if k[1] in args.models)
    if not runs:
        parser.error("nothing to run")
    args.runs = runs
    return args


def ensure_dataset(dataset: str) -> None:
    """Make the generated / deepforest datasets on first use (the registered paths)."""
    from smca_d2.data.datasets import datasets_root

    root = os.path.join(ROOT, datasets_root())  # as train_net.py, which runs in ROOT, sees it
    if dataset == "synthetic" and not os.path.isfile(os.path.join(root, "synthetic/annotations/val.json")):
        from smca_d2.data.synthetic import make_synthetic_coco

        make_synthetic_coco(os.path.join(root, "synthetic"))  # the defaults, as make demo
    elif dataset == "deepforest" and not os.path.isfile(os.path.join(root, "deepforest/annotations/val.json")):
        from smca_d2.data.deepforest import prepare_deepforest

        prepare_deepforest(os.path.join(root, "deepforest"))


def run_one(config: str, out_dir: str, seed: int, args, opts: Sequence[str]) -> float:
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train_net.py"),
        "--config-file",
        config,
        "--num-gpus",
        str(args.num_gpus),
        f"train.output_dir={out_dir}",
        f"train.seed={seed}",
        *opts,
    ]
    os.makedirs(out_dir, exist_ok=True)
    metrics = os.path.join(out_dir, "metrics.json")
    if os.path.exists(metrics):  # an earlier, incomplete or forced run: start over
        os.remove(metrics)
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(os.path.join(out_dir, "stdout.txt"), "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"training failed (exit {proc.returncode}); see {out_dir}/stdout.txt")
    return time.perf_counter() - start


def run_overrides(model: str, config: str, args) -> Tuple[List[str], int]:
    """``(overrides, max_iter)`` of one model's runs: the trailing overrides, and for the
    baseline the longer schedule of ``--baseline-factor`` (after the user's overrides, so that
    ``train.max_iter=200`` gives the baseline ``200 * K``)."""
    from smca_d2.engine import load_config

    opts = list(args.opts)
    train = load_config(config, opts).train
    max_iter = int(train.max_iter)
    if model == BASELINE and args.baseline_factor != 1:
        max_iter *= args.baseline_factor
        period = max(1, int(train.eval_period) * args.baseline_factor // 2)
        opts += [f"train.max_iter={max_iter}", f"train.eval_period={period}"]
    return opts, max_iter


def check_overrides(args) -> Dict[Tuple[str, str], Tuple[List[str], int]]:
    """``(overrides, train.max_iter)`` of every run (:func:`run_overrides`), read before anything
    is trained.

    An override that a run to be trained does not accept stops the benchmark here, not after
    the runs before it have trained. Runs only reported (left out by ``--models``) whose config
    does not accept the overrides were not made with them, and are left out of the report.
    """
    from smca_d2.engine.config import UnknownConfigKeyError

    max_iters = OrderedDict()
    for (dataset, model), config in args.all_runs.items():
        try:
            max_iters[(dataset, model)] = run_overrides(model, config, args)
        except UnknownConfigKeyError as e:
            if (dataset, model) in args.runs and not args.plot_only:
                raise SystemExit(
                    f"{dataset}/{model} ({os.path.relpath(config, ROOT)}): {e}\n"
                    "Leave this model out with --models, or change its config file."
                ) from None
            print(f"note: {dataset}/{model} not reported: its config does not take the overrides", file=sys.stderr)
    return max_iters


def main(argv=None) -> dict:
    args = parse_args(argv)
    import smca_d2  # noqa: F401  (registers the datasets)

    max_iters = check_overrides(args)
    os.makedirs(args.output, exist_ok=True)
    results = []
    for (dataset, model), config in args.all_runs.items():
        if (dataset, model) not in max_iters:
            continue
        train_now = (dataset, model) in args.runs and not args.plot_only
        for seed in args.seeds:
            out_dir = os.path.abspath(os.path.join(args.output, dataset, model, f"seed{seed}"))
            metrics = os.path.join(out_dir, "metrics.json")
            opts, max_iter = max_iters[(dataset, model)]
            evaluations, last_iter, _ = read_curve(metrics, max_iter)
            done = bool(evaluations) and evaluations[-1]["iter"] == max_iter
            wall = None
            if train_now and (args.force or not done):
                ensure_dataset(dataset)
                wall = run_one(config, out_dir, seed, args, opts)
            evaluations, last_iter, sec_per_iter = read_curve(metrics, max_iter)
            if not evaluations:
                if train_now:
                    print(f"warning: no evaluation in {metrics}; skipped", file=sys.stderr)
                continue
            results.append(
                {
                    "dataset": dataset,
                    "model": model,
                    "seed": seed,
                    "config": os.path.relpath(config, ROOT),
                    "overrides": opts,
                    "max_iter": max_iter,
                    "evaluations": evaluations,
                    "sec_per_iter": sec_per_iter,
                    "wall_s": wall,
                }
            )
            final = evaluations[-1]
            print(
                f"{dataset}/{model}/seed{seed}: AP {final['AP']:.2f} AP50 {final['AP50']:.2f} "
                f"at iter {final['iter']}" + (f" ({wall / 60:.1f} min)" if wall else ""),
                flush=True,
            )

    import torch
    from common import environment, write_json

    summary = summarize(results)
    env = environment("cuda" if torch.cuda.is_available() else "cpu")
    report = {"environment": env, "runs": results, "summary": summary}
    json_path = os.path.join(args.output, "convergence.json")
    write_json(json_path, report)
    png_path = os.path.join(args.output, "convergence.png")
    plot(summary, png_path)
    print()
    print_table(summary)
    print(f"\nwrote {json_path} and {png_path}")
    return report


if __name__ == "__main__":
    main()
