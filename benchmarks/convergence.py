#!/usr/bin/env python
"""Convergence of SMCA vs. the DETR baseline: box AP against training iterations.

Trains every model of a benchmark (by default SMCA single-scale, SMCA multi-scale and the
DETR-style baseline, i.e. the same code with the spatial modulation off) with identical backbone,
data, schedule, batch and seeds through ``train_net.py``, evaluating box AP every
``train.eval_period`` iterations, then writes ``convergence.json`` and ``convergence.png`` (one
panel per dataset, one curve per model; the min..max band over seeds when there are several) and
prints a table.

Default run (the two CPU benchmarks, ~50 min on a 2-core machine)::

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
retrains it), so an interrupted benchmark continues where it stopped.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "detr_baseline"
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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--datasets", nargs="+", default=None, choices=sorted(BENCHMARKS),
        help="built-in benchmarks to run (default: all, unless --config is given)")
    add("--config", action="append", default=[], metavar="DATASET:MODEL=CONFIG",
        help="add a run: a LazyConfig for MODEL on DATASET (repeatable); the model named "
        f"'{BASELINE}' is the reference of the summary")
    add("--models", nargs="+", default=None, help="only these model names")
    add("--seeds", nargs="+", type=int, default=[0], help="training seeds (default: 0)")
    add("--num-gpus", type=int, default=1, help="processes per run (train_net.py --num-gpus)")
    add("--output", default="output/benchmarks/convergence",
        help="runs, JSON and plot go here (default: %(default)s)")
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


def read_curve(
    metrics_file: str, max_iter: int
) -> Tuple[List[Dict[str, float]], Optional[int], Optional[float]]:
    """``(evaluations, last_iteration, seconds_per_iteration)`` from a detectron2 metrics.json.

    Each evaluation is ``{"iter": number of iterations trained, "AP": ..., "AP50": ..., "AP75": ...}``.
    """
    evaluations, last_iter, times = {}, None, []
    if not os.path.isfile(metrics_file):
        return [], None, None
    with open(metrics_file) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a run killed while writing its last line
                continue
            it = record.get("iteration")
            if it is None:
                continue
            last_iter = it if last_iter is None else max(last_iter, it)
            if "time" in record:
                times.append(record["time"])
            if "bbox/AP" in record:
                # Periodic evaluations are logged at the iteration that ends the period (0-based),
                # the final one after training, at max_iter.
                trained = min(it + 1, max_iter)
                evaluations[trained] = {
                    "iter": trained,
                    **{k: record.get(f"bbox/{k}") for k in ("AP", "AP50", "AP75")},
                }
    sec_per_iter = sorted(times)[len(times) // 2] if times else None
    return [evaluations[k] for k in sorted(evaluations)], last_iter, sec_per_iter


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


def run_one(config: str, out_dir: str, seed: int, args) -> float:
    cmd = [
        sys.executable, os.path.join(ROOT, "train_net.py"),
        "--config-file", config, "--num-gpus", str(args.num_gpus),
        f"train.output_dir={out_dir}", f"train.seed={seed}", *args.opts,
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


def max_iter_of(config: str, opts: Sequence[str]) -> int:
    from smca_d2.engine import load_config

    return int(load_config(config, list(opts)).train.max_iter)


def check_overrides(args) -> Dict[Tuple[str, str], int]:
    """``train.max_iter`` of every run, with the overrides applied, before anything is trained.

    An override that a run to be trained does not accept stops the benchmark here, not after
    the runs before it have trained. Runs only reported (left out by ``--models``) whose config
    does not accept the overrides were not made with them, and are left out of the report.
    """
    from smca_d2.engine.config import UnknownConfigKeyError

    max_iters = OrderedDict()
    for (dataset, model), config in args.all_runs.items():
        try:
            max_iters[(dataset, model)] = max_iter_of(config, args.opts)
        except UnknownConfigKeyError as e:
            if (dataset, model) in args.runs and not args.plot_only:
                raise SystemExit(f"{dataset}/{model} ({os.path.relpath(config, ROOT)}): {e}\n"
                                 "Leave this model out with --models, or change its config file.")
            print(f"note: {dataset}/{model} not reported: its config does not take the overrides",
                  file=sys.stderr)
    return max_iters


def summarize(runs: List[dict]) -> Dict[str, dict]:
    """Per dataset and model: mean curve over seeds and the comparison with the baseline."""
    summary: Dict[str, dict] = OrderedDict()
    for run in runs:
        ds = summary.setdefault(run["dataset"], OrderedDict())
        ds.setdefault(run["model"], []).append(run)
    out: Dict[str, dict] = OrderedDict()
    for dataset, models in summary.items():
        out[dataset] = OrderedDict()
        for model, seed_runs in models.items():
            iters = sorted(set.intersection(*[{e["iter"] for e in r["evaluations"]} for r in seed_runs]))
            by_iter = [
                [next(e["AP"] for e in r["evaluations"] if e["iter"] == it) for r in seed_runs]
                for it in iters
            ]
            out[dataset][model] = {
                "seeds": [r["seed"] for r in seed_runs],
                "iters": iters,
                "AP_mean": [sum(v) / len(v) for v in by_iter],
                "AP_min": [min(v) for v in by_iter],
                "AP_max": [max(v) for v in by_iter],
                "AP50_final_mean": sum(r["evaluations"][-1]["AP50"] for r in seed_runs) / len(seed_runs)
                if iters else None,
                "sec_per_iter": sum(r["sec_per_iter"] or 0 for r in seed_runs) / len(seed_runs),
            }
        base = out[dataset].get(BASELINE)
        if not base or not base["iters"]:
            continue
        base_final, base_iters = base["AP_mean"][-1], base["iters"][-1]
        for model, m in out[dataset].items():
            if model == BASELINE or not m["iters"]:
                continue
            reach = next((it for it, ap in zip(m["iters"], m["AP_mean"]) if ap >= base_final), None)
            m["iters_to_baseline_final_AP"] = reach
            m["fraction_of_baseline_iters"] = reach / base_iters if reach is not None else None
            m["final_AP_ratio_to_baseline"] = m["AP_mean"][-1] / base_final if base_final > 0 else None
    return out


def print_table(summary: Dict[str, dict]) -> None:
    header = ("dataset", "model", "iters", "final AP", "final AP50", "x baseline AP",
              "iters to baseline's final AP", "s/iter")
    rows = []
    for dataset, models in summary.items():
        for model, m in models.items():
            if not m["iters"]:
                continue
            reach = m.get("iters_to_baseline_final_AP")
            frac = m.get("fraction_of_baseline_iters")
            ratio = m.get("final_AP_ratio_to_baseline")
            compared = model != BASELINE and "iters_to_baseline_final_AP" in m
            rows.append((
                dataset, model, str(m["iters"][-1]), f"{m['AP_mean'][-1]:.2f}",
                f"{m['AP50_final_mean']:.2f}",
                "-" if not compared else ("n/a" if ratio is None else f"{ratio:.2f}"),
                "-" if not compared else (
                    "not reached" if reach is None else f"{reach} ({frac:.2f} of baseline's)"),
                f"{m['sec_per_iter']:.3f}",
            ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def plot(summary: Dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(summary)
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for model, m in summary[dataset].items():
            if not m["iters"]:
                continue
            (line,) = ax.plot(m["iters"], m["AP_mean"], marker="o", ms=3, label=model)
            if len(m["seeds"]) > 1:
                ax.fill_between(m["iters"], m["AP_min"], m["AP_max"], color=line.get_color(), alpha=0.2)
        seeds = {len(m["seeds"]) for m in summary[dataset].values()}
        ax.set_title(f"{dataset} ({max(seeds)} seed{'s' if max(seeds) > 1 else ''})")
        ax.set_xlabel("iteration")
        ax.set_ylabel("box AP")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
            max_iter = max_iters[(dataset, model)]
            evaluations, last_iter, _ = read_curve(metrics, max_iter)
            done = bool(evaluations) and evaluations[-1]["iter"] == max_iter
            wall = None
            if train_now and (args.force or not done):
                ensure_dataset(dataset)
                wall = run_one(config, out_dir, seed, args)
            evaluations, last_iter, sec_per_iter = read_curve(metrics, max_iter)
            if not evaluations:
                if train_now:
                    print(f"warning: no evaluation in {metrics}; skipped", file=sys.stderr)
                continue
            results.append({
                "dataset": dataset, "model": model, "seed": seed,
                "config": os.path.relpath(config, ROOT), "overrides": list(args.opts),
                "max_iter": max_iter, "evaluations": evaluations,
                "sec_per_iter": sec_per_iter, "wall_s": wall,
            })
            final = evaluations[-1]
            print(f"{dataset}/{model}/seed{seed}: AP {final['AP']:.2f} AP50 {final['AP50']:.2f} "
                  f"at iter {final['iter']}" + (f" ({wall / 60:.1f} min)" if wall else ""), flush=True)

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
