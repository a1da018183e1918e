"""Write the tables of docs/BENCHMARKS.md from the benchmarks' JSON.

The tables sit between marker comments in docs/BENCHMARKS.md::

    <!-- BEGIN convergence-table -->  ...  <!-- END convergence-table -->
    <!-- BEGIN speed-tables -->       ...  <!-- END speed-tables -->
    <!-- BEGIN deployment-tables -->  ...  <!-- END deployment-tables -->
    <!-- BEGIN dataset-loading-table -->  ...  <!-- END dataset-loading-table -->

and are replaced as a whole; the prose around them is left as it is. The figures come from
``docs/benchmarks/<name>.json``, written by ``benchmarks/<name>.py`` (convergence, speed,
deployment, dataset_loading), with the ratios those scripts print.
The output depends on the JSON alone, so ``tests/test_docs.py`` can check that the committed
page is what this script writes.

    python docs/generate_benchmark_tables.py           # rewrite docs/BENCHMARKS.md
    python docs/generate_benchmark_tables.py --check   # exit 1 if it is not up to date
"""

import argparse
import json
import os
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINE = "detr_baseline"  # as in benchmarks/convergence.py
MODEL_NAMES = {
    "smca_single_scale": "SMCA single-scale",
    "smca_multi_scale": "SMCA multi-scale",
    "detr_baseline": "DETR baseline",
}
DATASET_NAMES = {"synthetic": "shapes", "deepforest": "trees"}


def _table(header: Sequence[str], rows: List[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _ratio(ours: Optional[float], other: Optional[float]) -> str:
    """Speed-up, other's time over ours' (as benchmarks/speed.py prints it)."""
    return f"{other / ours:.2f}x" if ours and other else "-"


def _size(size) -> str:
    return f"{size[0]}x{size[1]}"


def environment_line(env: dict) -> str:
    cpu = env.get("cpu_model") or env.get("processor", "?")
    return (
        f"Measured {env['date'][:10]} on `{env['device']}` ({cpu}, {env['cpu_count']} CPUs, "
        f"{env['threads']} threads), torch {env['torch']}."
    )


# ---------------------------------------------------------------------------------------------
# Convergence
# ---------------------------------------------------------------------------------------------
def render_convergence(data: dict) -> str:
    rows = []
    for dataset, models in data["summary"].items():
        for model, m in models.items():
            if not m["iters"]:
                continue
            compared = model != BASELINE and "iters_to_baseline_final_AP" in m
            ratio, reach = m.get("final_AP_ratio_to_baseline"), m.get("iters_to_baseline_final_AP")
            frac = m.get("fraction_of_baseline_iters")
            base_reach, base_ratio = m.get("baseline_iters_to_final_AP"), m.get("baseline_iters_ratio")
            rows.append(
                [
                    DATASET_NAMES.get(dataset, dataset),
                    MODEL_NAMES.get(model, model),
                    str(m["iters"][-1]),
                    f"{m['AP_mean'][-1]:.2f}",
                    f"{m['AP50_final_mean']:.1f}",
                    "-"
                    if not compared or "baseline_iters_to_final_AP" not in m
                    else ("not reached" if base_reach is None else f"{base_reach} ({base_ratio:.1f}x)"),
                    "-" if not compared else ("n/a" if ratio is None else f"{ratio:.1f}"),
                    "-"
                    if not compared
                    else ("not reached" if reach is None else f"{reach} ({frac:.2f} of the baseline's)"),
                    f"{m['sec_per_iter']:.2f}",
                    ", ".join(str(s) for s in m["seeds"]),
                ]
            )
    header = [
        "dataset",
        "model",
        "iterations",
        "final AP",
        "final AP50",
        "baseline's iterations to this AP",
        "x baseline's final AP",
        "iterations to the baseline's final AP",
        "s/iter",
        "seeds",
    ]
    lines = [environment_line(data["environment"]), ""] + _table(header, rows)
    # One table of AP curves per set of evaluation iterations (the baseline's run is longer).
    groups: Dict[tuple, list] = {}
    for dataset, models in data["summary"].items():
        for model, m in models.items():
            groups.setdefault(tuple(m["iters"]), []).append(
                [DATASET_NAMES.get(dataset, dataset), MODEL_NAMES.get(model, model)]
                + [f"{ap:.2f}" for ap in m["AP_mean"]]
            )
    for iters, curves in groups.items():
        lines += ["", "AP (mean over seeds) at each evaluation:", ""]
        lines += _table(["dataset", "model"] + [str(i) for i in iters], curves)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------
def _rounds(row: dict, ours: str, other: str, key: str) -> Optional[str]:
    a, b = row.get(ours, {}).get(f"rounds_{key}"), row.get(other, {}).get(f"rounds_{key}")
    if not a or not b or len(a) != len(b):
        return None
    return ", ".join(f"{o / x:.2f}x" for x, o in zip(a, b))


def _get(row: dict, variant: str, key: str, fmt: str) -> str:
    return format(row[variant][key], fmt) if variant in row else "-"


def _speed_inference(s: dict) -> List[str]:
    header = [
        "size",
        "ours",
        "ours, optimized",
        "ours, glibc malloc",
        "official",
        "official, same malloc",
        "speed-up vs official (ours / optimized)",
        "vs official, same malloc (ours / optimized)",
        "both glibc malloc",
    ]
    rows, rounds = [], []
    for row in s["inference"]:
        t = {
            v: row[v]["s_per_image"] if v in row else None
            for v in ("ours", "ours_optimized", "ours_default_malloc", "official", "official_same_malloc")
        }
        rows.append(
            [
                _size(row["size"]) + (" AMP" if row["amp"] else ""),
                _get(row, "ours", "s_per_image", ".3f"),
                _get(row, "ours_optimized", "s_per_image", ".3f"),
                _get(row, "ours_default_malloc", "s_per_image", ".3f"),
                _get(row, "official", "s_per_image", ".3f"),
                _get(row, "official_same_malloc", "s_per_image", ".3f"),
                f"{_ratio(t['ours'], t['official'])} / {_ratio(t['ours_optimized'], t['official'])}",
                f"{_ratio(t['ours'], t['official_same_malloc'])} / {_ratio(t['ours_optimized'], t['official_same_malloc'])}",
                _ratio(t["ours_default_malloc"], t["official"]),
            ]
        )
        for ours, other in (
            ("ours", "official"),
            ("ours", "official_same_malloc"),
            ("ours_optimized", "official"),
            ("ours_default_malloc", "official"),
        ):
            r = _rounds(row, ours, other, "s_per_image")
            if r:
                rounds.append([_size(row["size"]), f"{other} / {ours}", r])
    return (
        ["Inference, seconds per image (median of the rounds):", ""]
        + _table(header, rows)
        + ["", "Inference speed-up, round by round:", ""]
        + _table(["size", "ratio", "rounds"], rounds)
    )


def _speed_training(s: dict) -> List[str]:
    header = [
        "size, batch",
        "ours",
        "ours, channels-last",
        "ours, torch's dropout masks",
        "official",
        "official, same malloc",
        "speed-up vs official (ours / channels-last / torch's masks)",
        "vs official, same malloc (ours / channels-last)",
    ]
    rows, rounds, losses = [], [], []
    for row in s["train"]:
        t = {
            v: row[v]["s_per_iter"] if v in row else None
            for v in ("ours", "ours_channels_last", "ours_torch_dropout", "official", "official_same_malloc")
        }
        name = f"{_size(row['size'])}, {row['batch']}" + (" AMP" if row["amp"] else "")
        rows.append(
            [
                name,
                _get(row, "ours", "s_per_iter", ".2f"),
                _get(row, "ours_channels_last", "s_per_iter", ".2f"),
                _get(row, "ours_torch_dropout", "s_per_iter", ".2f"),
                _get(row, "official", "s_per_iter", ".2f"),
                _get(row, "official_same_malloc", "s_per_iter", ".2f"),
                " / ".join(_ratio(t[v], t["official"]) for v in ("ours", "ours_channels_last", "ours_torch_dropout")),
                " / ".join(_ratio(t[v], t["official_same_malloc"]) for v in ("ours", "ours_channels_last")),
            ]
        )
        for ours in ("ours", "ours_channels_last"):
            for other in ("official", "official_same_malloc"):
                r = _rounds(row, ours, other, "s_per_iter")
                if r:
                    rounds.append([name, f"{other} / {ours}", r])
        if "loss_equal" in row:
            losses.append(
                f"Initial training loss (dropout off), {name}: ours "
                f"{row['ours']['initial_loss_no_dropout']:.6f}, official "
                f"{row['official']['initial_loss_no_dropout']:.6f} (relative difference "
                f"{row['loss_rel_diff']:.1e}: {'equal' if row['loss_equal'] else 'DIFFERENT'})."
            )
    return (
        ["Training, seconds per iteration (median of the rounds):", ""]
        + _table(header, rows)
        + ["", "Training speed-up, round by round:", ""]
        + _table(["size, batch", "ratio", "rounds"], rounds)
        + ([""] + losses if losses else [])
    )


def _speed_memory(s: dict) -> List[str]:
    variants = [
        "ours",
        "ours_optimized",
        "ours_channels_last",
        "ours_torch_dropout",
        "ours_default_malloc",
        "official",
        "official_same_malloc",
    ]
    header = [
        "peak, MiB",
        "size",
        "ours",
        "ours, optimized",
        "ours, channels-last",
        "ours, torch's masks",
        "ours, glibc malloc",
        "official",
        "official, same malloc",
        "vs official, same malloc (ours / optimized)",
        "both glibc malloc",
    ]

    def frac(row, a, b, kind):
        x, y = row.get(a, {}).get(kind), row.get(b, {}).get(kind)
        return f"{x / y:.2f}" if x and y else "-"

    rows = []
    for task, key in (("inference", "inference"), ("training", "train")):
        for row in s[key]:
            for kind, label in (("tensor_peak_mib", "tensors"), ("peak_mem_mib", "RSS")):
                cells = [f"{task}, {label}", _size(row["size"])]
                cells += [f"{row[v][kind]:.0f}" if v in row and kind in row[v] else "-" for v in variants]
                cells.append(
                    f"{frac(row, 'ours', 'official_same_malloc', kind)} / "
                    f"{frac(row, 'ours_optimized', 'official_same_malloc', kind)}"
                )
                cells.append(frac(row, "ours_default_malloc", "official", kind))
                rows.append(cells)
    return [
        "Peak memory (tensors: the most that one call's tensors hold at once, whatever the allocator; "
        "RSS: peak resident memory above the level after the model is built, median of the processes; "
        "the ratios compare like with like):",
        "",
    ] + _table(header, rows)


def _speed_outputs(s: dict) -> List[str]:
    rows = [
        [
            name,
            str(d["layers"]),
            f"{d['max_abs_logits']:.1e}",
            f"{d['max_abs_boxes']:.1e}",
            "equal" if d["pass"] else "DIFFERENT",
        ]
        for name, d in s["equal_outputs"].items()
    ]
    return ["Outputs compared (all decoder layers):", ""] + _table(
        ["pair, batch, size", "layers", "max abs diff logits", "max abs diff boxes", "result"], rows
    )


def _speed_profile(r: dict) -> List[str]:
    prof = r.get("profile")
    if not prof:
        return []
    parts = ["backbone", "encoder", "decoder", "gaussian_prior"]
    rows = []
    for impl, p in prof.items():
        ip, tp = p["inference_parts_s"], p["train_parts_s"]
        share = ip.get("backbone", 0) / p["inference_total_s"]
        rows.append(
            [impl, f"{p['inference_total_s']:.3f}"]
            + [f"{ip[k]:.3f}" if k in ip else "n/a" for k in parts]
            + [
                f"{share:.0%}",
                f"{p['train_forward_and_loss_s']:.2f}",
                f"{tp.get('backbone', 0):.2f}",
                f"{tp.get('matcher', 0):.3f}",
                f"{p['train_backward_and_step_s']:.2f}",
            ]
        )
    header = [
        "",
        "inference total",
        "backbone",
        "encoder",
        "decoder",
        "Gaussian prior",
        "backbone share",
        "training: forward + loss",
        "backbone forward",
        "matcher",
        "backward + step",
    ]
    lines = ["Where the time goes (seconds; forward hooks, one process each):", ""] + _table(header, rows)
    kinds = {impl: p["train_op_kinds_s"] for impl, p in prof.items() if "train_op_kinds_s" in p}
    if kinds:
        names = list(next(iter(kinds.values())))
        lines += ["", "One training step by kind of operator (self CPU seconds, torch.profiler):", ""]
        lines += _table(
            ["", *names, "total"],
            [[impl] + [f"{k[n]:.2f}" for n in names] + [f"{sum(k.values()):.2f}"] for impl, k in kinds.items()],
        )
        trains = r["single_scale"]["train"]
        official = [
            trains[0][k]["s_per_iter"] for k in ("official", "official_same_malloc") if trains and k in trains[0]
        ]
        ours = kinds.get("ours")
        if ours and official:
            shared = sum(v for k, v in ours.items() if k != "everything else")
            lines += [
                "",
                f"Ours spends {shared:.2f} s of the profiled step in convolutions, matrix products and "
                f"drawing dropout masks: unless those get faster, it cannot train more than "
                f"{min(official) / shared:.2f}x faster than the official {min(official):.2f} s/iter.",
            ]
    return lines


def _speed_other_models(r: dict) -> List[str]:
    others = r.get("other_models")
    if not others:
        return []
    sizes = list(others[0]["inference"])
    header = (
        ["model", "parameters"]
        + [f"inference {k}, s/img" for k in sizes]
        + ["training, s/iter", "training peak tensors, MiB", "training peak RSS, MiB"]
    )
    rows = []
    for row in others:
        t = row["train"] or {}
        rows.append(
            [
                MODEL_NAMES.get(row["model"], row["model"]) + (" AMP" if row["amp"] else ""),
                f"{next(iter(row['inference'].values()))['params']:,}",
            ]
            + [f"{row['inference'][k]['s_per_image']:.3f}" for k in sizes]
            + [
                f"{t['s_per_iter']:.2f}" if t else "-",
                f"{t['tensor_peak_mib']:.0f}" if "tensor_peak_mib" in t else "-",
                f"{t['peak_mem_mib']:.0f}" if "peak_mem_mib" in t else "-",
            ]
        )
    return ["Other models (ours; parameters with the 92 official class columns):", ""] + _table(header, rows)


def _speed_scaling(r: dict) -> List[str]:
    sc = r.get("scaling")
    if not sc:
        return []
    off = r.get("official")
    lines = ["Inference time vs image size and number of queries (single-scale, s/img):", ""]
    lines += _table(
        ["image size", "ours"] + (["official", "speed-up"] if off else []),
        [
            [_size(x["size"]), f"{x['ours']:.3f}"]
            + ([f"{x['official']:.3f}", _ratio(x["ours"], x["official"])] if off else [])
            for x in sc["sizes"]
        ],
    )
    lines += [""] + _table(
        ["queries", "ours"] + (["official", "speed-up"] if off else []),
        [
            [str(x["num_queries"]), f"{x['ours']:.3f}"]
            + ([f"{x['official']:.3f}", _ratio(x["ours"], x["official"])] if off else [])
            for x in sc["queries"]
        ],
    )
    return lines


def render_speed(r: dict) -> str:
    s = r["single_scale"]
    blocks = [
        [environment_line(r["environment"]) + " Single-scale R50; speed-up = the other's time / ours."],
        _speed_inference(s),
        _speed_training(s),
        _speed_memory(s),
        _speed_outputs(s),
        _speed_profile(r),
        _speed_other_models(r),
        _speed_scaling(r),
    ]
    return "\n\n".join("\n".join(b) for b in blocks if b)


# ---------------------------------------------------------------------------------------------
# Deployment (benchmarks/deployment.py and benchmarks/precision_ap.py)
# ---------------------------------------------------------------------------------------------
DEPLOYMENT_PATHS = {
    "eager_fp32": "torch eager, float32",
    "optimized_fp32": "torch optimized (LazyPredictor), float32",
    "onnxruntime_fp32": "ONNX Runtime, float32 (dynamic-size file)",
    "optimized_bf16": "torch optimized, bfloat16 autocast",
}


def _deployment_speed(r: dict) -> List[str]:
    rows = []
    for result in r["results"]:
        eager = result["variants"].get("eager_fp32", {}).get("median_s_per_image")
        optimized = result["variants"].get("optimized_fp32", {}).get("median_s_per_image")
        for name, row in result["variants"].items():
            label = DEPLOYMENT_PATHS.get(name, name)
            if "skipped" in row:
                rows.append(
                    [result["config"], _size(result["size"]), label, "skipped: " + row["skipped"], "", "", "", ""]
                )
                continue
            t = row["median_s_per_image"]
            classes = row.get("classes_equal_fraction")
            diff = f"{row['max_box_diff_px']:.2g} px / {row['max_score_diff']:.2g}"
            rows.append(
                [
                    result["config"],
                    _size(result["size"]),
                    label,
                    f"{t:.3f}",
                    _ratio(t, eager),
                    _ratio(t, optimized),
                    diff + (f" (classes {classes:.0%} equal)" if classes is not None else ""),
                    row["compared"],
                ]
            )
    if not rows:
        return []
    header = ["config", "image", "path", "s / image", "vs eager", "vs optimized", "max diff: box / score", "compared"]
    rounds = max(row.get("rounds", 0) for result in r["results"] for row in result["variants"].values())
    intro = (
        environment_line(r["environment"]) + f" Median of {rounds} rounds; speed-up = the other's time / this one's."
    )
    return [intro, ""] + _table(header, rows)


def _deployment_ap(r: dict) -> List[str]:
    rows = []
    for result in r.get("precision_ap", []):
        fp32, bf16 = result["float32"], result["bfloat16"]
        rows.append(
            [
                result["dataset"],
                f"`{result['config']}`",
                f"{fp32['AP']:.2f} / {fp32['AP50']:.2f}",
                f"{bf16['AP']:.2f} / {bf16['AP50']:.2f}",
                f"{bf16['AP'] - fp32['AP']:+.2f}",
                _ratio(bf16["s_per_image"], fp32["s_per_image"]),
            ]
        )
    if not rows:
        return []
    header = [
        "val set",
        "config (trained checkpoint)",
        "float32 AP / AP50",
        "bfloat16 AP / AP50",
        "AP change",
        "bf16 speed-up",
    ]
    return [
        "Box AP of one trained checkpoint, evaluated in float32 and under bfloat16 autocast (optimized model):",
        "",
    ] + _table(header, rows)


def render_deployment(r: dict) -> str:
    blocks = [_deployment_speed(r), _deployment_ap(r)]
    return "\n\n".join("\n".join(b) for b in blocks if b)


# ---------------------------------------------------------------------------------------------
# Dataset loading (benchmarks/dataset_loading.py)
# ---------------------------------------------------------------------------------------------
def _times(ratio: float) -> str:
    """A ratio of ours to detectron2's (time or memory; below 1 is less)."""
    return f"{ratio:.2f}"


def render_dataset_loading(r: dict) -> str:
    d = r["dataset"]
    rows = []
    for result in r["results"]:
        v = result["variants"]
        d2, paused = v["detectron2"], v.get("detectron2_gc_paused")
        for run, label in (("first", "first (no record)"), ("repeated", "repeated (recorded)")):
            ours, ratio = v[f"ours_{run}"], result["ratios"][run]
            rows.append(
                [
                    str(result["ranks"]),
                    label,
                    f"{d2['seconds']:.1f}",
                    f"{paused['seconds']:.1f}" if paused else "-",
                    f"{ours['seconds']:.1f}",
                    _times(ratio["time"]),
                    _times(ratio["time_vs_gc_paused"]) if paused else "-",
                    f"{d2['peak_rss_mib']:.0f}",
                    f"{ours['peak_rss_mib']:.0f}",
                    _times(ratio["peak_rss"]),
                ]
            )
    header = [
        "ranks",
        "run of ours",
        "detectron2, s",
        "detectron2 with the GC paused, s",
        "ours, s",
        "ours / detectron2",
        "ours / detectron2 with the GC paused",
        "detectron2 peak RSS, MiB",
        "ours peak RSS, MiB",
        "ours / detectron2",
    ]
    g = r["goal"]
    intro = (
        environment_line(r["environment"])
        + f" Dataset: {d['images']:,} training images with {d['boxes']:,} boxes (after detectron2's filter),"
        f" a {d['json_mb']:.0f} MB json, {d['image_files']:,} image files. Median of {r['settings']['rounds']}"
        " rounds, each measurement a fresh process; time: the slowest rank, one `gc.collect()` included;"
        " memory: the largest peak of the ranks, imports included."
    )
    verdict = (
        f"On a repeated run ours takes {_times(g['repeated_time_ratio'])} of detectron2's time and "
        f"{_times(g['repeated_peak_rss_ratio'])} of its peak memory (goal: at most {g['max_ratio']}: "
        + ("met)." if g["met"] else "NOT met).")
    )
    return "\n".join([intro, ""] + _table(header, rows) + ["", verdict])


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------
RENDERERS: Dict[str, Callable[[dict], str]] = {
    "convergence-table": render_convergence,
    "speed-tables": render_speed,
    "deployment-tables": render_deployment,
    "dataset-loading-table": render_dataset_loading,
}
SOURCES = {
    "convergence-table": "convergence.json",
    "speed-tables": "speed.json",
    "deployment-tables": "deployment.json",
    "dataset-loading-table": "dataset_loading.json",
}


def replace_block(text: str, name: str, content: str) -> str:
    """``text`` with what lies between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` replaced."""
    pattern = re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n).*?(<!-- END {re.escape(name)} -->)", re.S)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"expected one '<!-- BEGIN {name} -->' ... '<!-- END {name} -->' block")
    note = f"<!-- generated by docs/generate_benchmark_tables.py from docs/benchmarks/{SOURCES[name]}: edit the JSON, not the table -->\n"
    return pattern.sub(lambda m: m.group(1) + note + content.rstrip("\n") + "\n" + m.group(2), text)


def generate(page: str, benchmarks_dir: str) -> str:
    """The page with every generated block rewritten from the JSON in ``benchmarks_dir``."""
    for name, render in RENDERERS.items():
        with open(os.path.join(benchmarks_dir, SOURCES[name])) as f:
            page = replace_block(page, name, render(json.load(f)))
    return page


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--page", default=os.path.join(HERE, "BENCHMARKS.md"), help="the page to rewrite")
    parser.add_argument("--benchmarks", default=os.path.join(HERE, "benchmarks"), help="folder of the JSON")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the page is out of date")
    args = parser.parse_args(argv)
    with open(args.page) as f:
        old = f.read()
    new = generate(old, args.benchmarks)
    if args.check:
        if new != old:
            print(f"{args.page} is out of date: run python docs/generate_benchmark_tables.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        with open(args.page, "w") as f:
            f.write(new)
    print(f"wrote {args.page}" if new != old else f"{args.page} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
