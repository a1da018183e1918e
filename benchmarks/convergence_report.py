"""The convergence benchmark's results: box AP curves read from the runs' metrics.json files,
the summary against the DETR baseline, the table and the plot (``benchmarks/convergence.py``
trains the runs)."""

import json
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

__all__ = ["BASELINE", "plot", "print_table", "read_curve", "summarize"]

BASELINE = "detr_baseline"  # the reference model of the summary


def read_curve(metrics_file: str, max_iter: int) -> Tuple[List[Dict[str, float]], Optional[int], Optional[float]]:
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
            by_iter = [[next(e["AP"] for e in r["evaluations"] if e["iter"] == it) for r in seed_runs] for it in iters]
            out[dataset][model] = {
                "seeds": [r["seed"] for r in seed_runs],
                "iters": iters,
                "AP_mean": [sum(v) / len(v) for v in by_iter],
                "AP_min": [min(v) for v in by_iter],
                "AP_max": [max(v) for v in by_iter],
                "AP50_final_mean": sum(r["evaluations"][-1]["AP50"] for r in seed_runs) / len(seed_runs)
                if iters
                else None,
                "sec_per_iter": sum(r["sec_per_iter"] or 0 for r in seed_runs) / len(seed_runs),
            }
        base = out[dataset].get(BASELINE)
        if not base or not base["iters"]:
            continue
        base_final, base_iters = base["AP_mean"][-1], base["iters"][-1]
        for model, m in out[dataset].items():
            if model == BASELINE or not m["iters"]:
                continue
            final, final_iters = m["AP_mean"][-1], m["iters"][-1]
            # This model's iterations to the baseline's final AP, and the other way round: the
            # baseline's iterations to this model's final AP (the paper's "DETR needs 10x the
            # epochs"), when the baseline trains longer.
            reach = next((it for it, ap in zip(m["iters"], m["AP_mean"]) if ap >= base_final), None)
            m["iters_to_baseline_final_AP"] = reach
            m["fraction_of_baseline_iters"] = reach / base_iters if reach is not None else None
            m["final_AP_ratio_to_baseline"] = final / base_final if base_final > 0 else None
            base_reach = next((it for it, ap in zip(base["iters"], base["AP_mean"]) if ap >= final), None)
            m["baseline_iters_to_final_AP"] = base_reach
            m["baseline_iters_ratio"] = base_reach / final_iters if base_reach is not None else None
            m["baseline_AP_at_same_iters"] = next(
                (ap for it, ap in zip(base["iters"], base["AP_mean"]) if it == final_iters), None
            )
    return out


def print_table(summary: Dict[str, dict]) -> None:
    header = (
        "dataset",
        "model",
        "iters",
        "final AP",
        "final AP50",
        "baseline's iters to this AP",
        "x baseline's final AP",
        "iters to baseline's final AP",
        "s/iter",
    )
    rows = []
    for dataset, models in summary.items():
        for model, m in models.items():
            if not m["iters"]:
                continue
            compared = model != BASELINE and "iters_to_baseline_final_AP" in m
            reach, frac = m.get("iters_to_baseline_final_AP"), m.get("fraction_of_baseline_iters")
            base_reach, base_ratio = m.get("baseline_iters_to_final_AP"), m.get("baseline_iters_ratio")
            ratio = m.get("final_AP_ratio_to_baseline")
            rows.append(
                (
                    dataset,
                    model,
                    str(m["iters"][-1]),
                    f"{m['AP_mean'][-1]:.2f}",
                    f"{m['AP50_final_mean']:.2f}",
                    "-"
                    if not compared
                    else ("not reached" if base_reach is None else f"{base_reach} ({base_ratio:.1f}x)"),
                    "-" if not compared else ("n/a" if ratio is None else f"{ratio:.2f}"),
                    "-"
                    if not compared
                    else ("not reached" if reach is None else f"{reach} ({frac:.2f} of baseline's)"),
                    f"{m['sec_per_iter']:.3f}",
                )
            )
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
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
