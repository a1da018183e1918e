"""Tables and plots of the speed benchmark's report (the JSON that ``benchmarks/speed.py``
writes, and reads back with ``--replot``; reports of earlier versions included)."""

from typing import List, Optional

__all__ = [
    "plain_ratios",
    "plot_report",
    "print_report",
    "round_speedups",
    "speedup_limit",
    "time_key",
]


def time_key(result: dict) -> str:
    """The time of a result: ``s_per_iter`` (training) or ``s_per_image`` (inference)."""
    return "s_per_iter" if "s_per_iter" in result else "s_per_image"


def plain_ratios(row: dict) -> dict:
    """What the speed-ups buy in one single-scale row: the plain model's time (no speed-ups) over
    that of each other variant of ours (``ours``, ``ours_optimized``, ...)."""
    plain = row.get("ours_plain")
    if not plain:
        return {}
    key = time_key(plain)
    return {
        name: plain[key] / v[key]
        for name, v in row.items()
        if name.startswith("ours") and name != "ours_plain" and isinstance(v, dict) and v.get(key)
    }


def speedup_limit(r: dict) -> Optional[dict]:
    """The largest training speed-up over the official code that ours could reach by making
    everything else free: the official step time over ours' time in convolutions, matrix
    products and drawing dropout masks."""
    kinds = (r.get("profile") or {}).get("ours", {}).get("train_op_kinds_s")
    trains = r["single_scale"]["train"]
    if not kinds or not trains or "official" not in trains[0]:
        return None
    shared = sum(v for k, v in kinds.items() if k != "everything else")
    official = min(trains[0][k]["s_per_iter"] for k in ("official", "official_same_malloc") if k in trains[0])
    return {"shared_s": shared, "official_s_per_iter": official, "limit": official / shared}


def _ratio(ours, official):
    return f"{official / ours:.2f}x" if ours and official else "-"


def round_speedups(ours: dict, official: dict) -> Optional[List[float]]:
    """Official time over ours in each interleaved round (the rounds pair measurements taken
    minutes apart); None without rounds."""
    key = f"rounds_{time_key(ours)}"
    a, b = ours.get(key), official.get(key)
    if not a or not b or len(a) != len(b):
        return None
    return [o / x for x, o in zip(a, b)]


def print_rounds(row: dict, ours_variants: List[str]) -> None:
    """The official / ours time ratio of each round, where a row was measured in rounds."""
    for variant in ours_variants:
        for against in ("official",) if variant == "ours_default_malloc" else ("official", "official_same_malloc"):
            ratios = round_speedups(row[variant], row[against]) if variant in row and against in row else None
            if ratios and len(ratios) > 1:
                print(f"  {against} / {variant}, round by round: " + ", ".join(f"{x:.2f}x" for x in ratios))


def print_plain_ratios(s: dict) -> None:
    """What the speed-ups buy: the plain model's time over ours', per single-scale row."""
    rows = [(task, row) for task in ("inference", "train") for row in s[task] if plain_ratios(row)]
    if not rows:
        return
    print("\nwhat the speed-ups buy (smca_d2.speedups): the plain model's time over each variant's")
    print("| task | size | precision | plain | ours | plain / ours | optimized (inference) | plain / optimized |")
    print("|---|---|---|---|---|---|---|---|")
    for task, row in rows:
        key = "s_per_image" if task == "inference" else "s_per_iter"
        ratios = plain_ratios(row)
        opt = row.get("ours_optimized")
        cells = [
            task if task == "inference" else f"train (batch {row['batch']})",
            f"{row['size'][0]}x{row['size'][1]}",
            "AMP" if row["amp"] else "fp32",
            f"{row['ours_plain'][key]:.3f}",
            f"{row['ours'][key]:.3f}",
            f"{ratios['ours']:.2f}x",
            f"{opt[key]:.3f}" if opt else "-",
            f"{ratios['ours_optimized']:.2f}x" if opt else "-",
        ]
        print("| " + " | ".join(cells) + " |")


def max_batch_rows(r: dict) -> List[dict]:
    """The ``--max-batch`` results of a report, one dict per model and precision: ``model``,
    ``amp``, ``size`` and a result per implementation (``ours``, and ``official`` for single-scale
    with the official code)."""
    rows = [{"model": "smca_single_scale", **row} for row in (r.get("single_scale") or {}).get("max_batch") or []]
    for row in r.get("other_models") or []:
        if row.get("max_batch"):
            size = (r.get("settings") or {}).get("train_size")
            rows.append({"model": row["model"], "amp": row["amp"], "size": size, "ours": row["max_batch"]})
    return rows


def _max_batch_cells(result: Optional[dict]) -> List[str]:
    if not result:
        return ["-"] * 4
    if result.get("batch") is None:
        return [f"none ({result.get('limit')})", "-", "-", "-"]
    return [
        f"{result['batch']} ({result['limit']})",
        f"{result['s_per_iter']:.3f}",
        f"{result['images_per_s']:.2f}",
        f"{result.get('peak_mem_mib', float('nan')):.0f}",
    ]


def print_max_batch(r: dict) -> None:
    """Training at the largest batch that fits (``--max-batch``): batch, time per iteration,
    images per second and peak memory of each implementation."""
    rows = max_batch_rows(r)
    if not rows:
        return
    off = any("official" in row for row in rows)
    print("\ntraining at the largest batch that fits (why it stopped there: memory or --max-batch-cap)")
    impls = ["ours"] + (["official"] if off else [])
    header = ["model", "size", "precision"]
    for impl in impls:
        header += [f"batch {impl}", f"s/iter {impl}", f"images/s {impl}", f"peak memory {impl} (MiB)"]
    print("| " + " | ".join(header + (["images/s ours / official"] if off else [])) + " |")
    print("|---" * (len(header) + off) + "|")
    for row in rows:
        size = row.get("size")
        cells = [row["model"], f"{size[0]}x{size[1]}" if size else "-", "AMP" if row["amp"] else "fp32"]
        for impl in impls:
            cells += _max_batch_cells(row.get(impl))
        if off:
            o, f = row.get("ours") or {}, row.get("official") or {}
            cells.append(_ratio(f.get("images_per_s"), o.get("images_per_s")))
        print("| " + " | ".join(cells) + " |")


def print_report(r: dict) -> None:
    env = r["environment"]
    print(
        f"\n{env['date']}  {env['device']} ({env['processor']}, {env['cpu_count']} CPUs, "
        f"{env['threads']} threads), torch {env['torch']}"
    )
    s = r["single_scale"]
    for name, d in s["equal_outputs"].items():
        print(
            f"outputs {name} (all decoder layers): max |diff| logits {d['max_abs_logits']:.2e}, "
            f"boxes {d['max_abs_boxes']:.2e} -> {'EQUAL' if d['pass'] else 'DIFFERENT'}"
        )
    off = r["official"]
    gpu = r["environment"]["device"] != "cpu"
    peak = "peak memory" if gpu else "peak RSS"
    mems = ("peak_mem_mib",) + (() if gpu else ("tensor_peak_mib",))  # the memory columns
    if s["inference"] or s["train"]:
        print("\nsingle-scale R50")
        _print_single_scale(s, off, gpu, peak, mems)
    print_max_batch(r)
    _print_profile_and_others(r, off, gpu, peak, mems)


def _print_single_scale(s: dict, off: bool, gpu: bool, peak: str, mems: tuple) -> None:
    print(
        "| task | size | precision | ours | "
        + ("official | speed-up | " if off else "")
        + f"{peak} ours (MiB) | "
        + (f"{peak} official (MiB) | " if off else "")
        + ("" if gpu else "peak tensors ours (MiB) | " + ("peak tensors official (MiB) |" if off else ""))
    )
    print("|---|---|---|---|" + ("---|---|" if off else "") + ("---|---|" if off else "---|") * (1 if gpu else 2))

    def line(task, size, amp, o, f, key, unit):
        cells = [task, f"{size[0]}x{size[1]}", "AMP" if amp else "fp32", f"{o[key]:.3f} {unit}"]
        if f:
            cells += [f"{f[key]:.3f} {unit}", _ratio(o[key], f[key])]
        for mem in mems:
            cells.append(f"{o.get(mem, float('nan')):.0f}")
            if f:
                cells.append(f"{f.get(mem, float('nan')):.0f}")
        print("| " + " | ".join(cells) + " |")

    # (label, variant, against): a table line for each variant the row has; "official" lines
    # compare with the official code as its main.py runs, "official_same_malloc" with the same
    # malloc setting as ours.
    inference_lines = [
        ("inference", "ours", "official"),
        ("inference, optimized", "ours_optimized", "official"),
        ("inference, plain model (no speed-ups)", "ours_plain", "official"),
        ("inference vs official with the same malloc setting", "ours", "official_same_malloc"),
        ("inference, optimized vs official with the same malloc setting", "ours_optimized", "official_same_malloc"),
        ("inference, both with glibc's default malloc", "ours_default_malloc", "official"),
    ]
    train_lines = [
        ("", "ours", "official"),
        (", plain model (no speed-ups)", "ours_plain", "official"),
        (", channels-last", "ours_channels_last", "official"),
        (", torch's dropout masks", "ours_torch_dropout", "official"),
        (" vs official with the same malloc setting", "ours", "official_same_malloc"),
        (", channels-last vs official with the same malloc setting", "ours_channels_last", "official_same_malloc"),
    ]
    for row in s["inference"]:
        for label, variant, against in inference_lines:
            if variant in row and (against == "official" or against in row):
                line(label, row["size"], row["amp"], row[variant], row.get(against), "s_per_image", "s/img")
        print_rounds(row, ["ours", "ours_optimized", "ours_default_malloc"])
    for row in s["train"]:
        for label, variant, against in train_lines:
            if variant in row and (against == "official" or against in row):
                line(
                    f"train (batch {row['batch']}){label}",
                    row["size"],
                    row["amp"],
                    row[variant],
                    row.get(against),
                    "s_per_iter",
                    "s/iter",
                )
        print_rounds(row, ["ours", "ours_channels_last"])
        if "loss_equal" in row:
            print(
                f"  initial loss ours {row['ours']['initial_loss_no_dropout']:.6f} vs official "
                f"{row['official']['initial_loss_no_dropout']:.6f} (rel. diff {row['loss_rel_diff']:.1e})"
                f" -> {'EQUAL' if row['loss_equal'] else 'DIFFERENT'}"
            )
    print_plain_ratios(s)


def _print_profile_and_others(r: dict, off: bool, gpu: bool, peak: str, mems: tuple) -> None:
    if r.get("profile"):
        print("\nwhere the time goes (seconds; inference: one image; train: one iteration)")
        parts = ["backbone", "encoder", "decoder", "gaussian_prior", "matcher"]
        print(
            "| impl | inference total | " + " | ".join(parts) + " | backbone share | train fwd+loss | "
            "train bwd+step | train backbone fwd | train matcher |"
        )
        print("|---" * (len(parts) + 7) + "|")
        for impl, p in r["profile"].items():
            ip, tp = p["inference_parts_s"], p["train_parts_s"]
            share = ip.get("backbone", 0) / p["inference_total_s"]
            cells = (
                [impl, f"{p['inference_total_s']:.3f}"]
                + [f"{ip[k]:.3f}" if k in ip else "n/a" for k in parts]
                + [
                    f"{share:.0%}",
                    f"{p['train_forward_and_loss_s']:.3f}",
                    f"{p['train_backward_and_step_s']:.3f}",
                    f"{tp.get('backbone', 0):.3f}",
                    f"{tp.get('matcher', 0):.3f}",
                ]
            )
            print("| " + " | ".join(cells) + " |")
        kinds = {impl: p["train_op_kinds_s"] for impl, p in r["profile"].items() if "train_op_kinds_s" in p}
        if kinds:
            names = list(next(iter(kinds.values())))
            print("\none training step by kind of operator (self CPU seconds, torch.profiler)")
            print("| impl | " + " | ".join(names) + " | total |")
            print("|---" * (len(names) + 2) + "|")
            for impl, k in kinds.items():
                print(f"| {impl} | " + " | ".join(f"{k[n]:.3f}" for n in names) + f" | {sum(k.values()):.3f} |")
            limit = speedup_limit(r)
            if limit:
                print(
                    f"ours spends {limit['shared_s']:.2f} s in convolutions and matrix products (oneDNN's and "
                    f"MKL's kernels, like the official code's) and drawing dropout masks: unless these get "
                    f"faster, ours could train at most {limit['limit']:.2f}x faster than the official "
                    f"{limit['official_s_per_iter']:.2f} s/iter."
                )

    if r.get("other_models"):
        print("\nother models (ours)")
        print(
            "| model | precision | "
            + " | ".join(f"inference {k} (s/img)" for k in r["other_models"][0]["inference"])
            + f" | train (s/iter) | {peak} train (MiB) |"
            + ("" if gpu else " peak tensors train (MiB) |")
        )
        print("|---" * (len(r["other_models"][0]["inference"]) + 4 + (not gpu)) + "|")
        for row in r["other_models"]:
            t = row["train"]
            print(
                f"| {row['model']} | {'AMP' if row['amp'] else 'fp32'} | "
                + " | ".join(f"{v['s_per_image']:.3f}" for v in row["inference"].values())
                + (
                    f" | {t['s_per_iter']:.3f} | " + " | ".join(f"{t.get(m, float('nan')):.0f}" for m in mems) + " |"
                    if t
                    else " | -" * (1 + len(mems)) + " |"
                )
            )

    if r.get("scaling"):
        print("\ninference time (s/img) vs image size and number of queries (single-scale)")
        impls = ["ours"] + (["official"] if off else [])
        print("| image size | " + " | ".join(impls) + (" | speed-up |" if off else " |"))
        print("|---" * (len(impls) + 1 + bool(off)) + "|")
        for row in r["scaling"]["sizes"]:
            print(
                f"| {row['size'][0]}x{row['size'][1]} | "
                + " | ".join(f"{row[i]:.3f}" for i in impls)
                + (f" | {_ratio(row['ours'], row['official'])} |" if off else " |")
            )
        print("| queries | " + " | ".join(impls) + (" | speed-up |" if off else " |"))
        print("|---" * (len(impls) + 1 + bool(off)) + "|")
        for row in r["scaling"]["queries"]:
            print(
                f"| {row['num_queries']} | "
                + " | ".join(f"{row[i]:.3f}" for i in impls)
                + (f" | {_ratio(row['ours'], row['official'])} |" if off else " |")
            )


_BAR_LEGEND = {
    "ours_optimized": "ours optimized (inference) / channels-last (train)",
    "ours_plain": "ours, plain model (no speed-ups)",
    "official_same_malloc": "official, same malloc setting as ours",
}


def _bars(ax, s: dict, names: List[str], field, ylabel: str, title: str, fmt: str) -> None:
    """Grouped bars, one group per single-scale task (inference sizes, training), one bar per
    variant in ``names`` ("ours_optimized" stands for channels-last in training); ``field(row
    entry, task)`` gives a bar's height (None: no bar)."""
    labels, values = [], {i: [] for i in names}
    for task, rows in (("inference", s["inference"]), ("train", s["train"])):
        for row in rows:
            labels.append(
                (f"infer {row['size'][0]}x{row['size'][1]}" if task == "inference" else f"train b{row['batch']}")
                + (" AMP" if row["amp"] else "")
            )
            for i in names:
                key = "ours_channels_last" if task == "train" and i == "ours_optimized" else i
                values[i].append((field(row[key], task) if key in row else None) or 0)
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        xs = [x + (k - (len(names) - 1) / 2) * width for x in range(len(labels))]
        bars = ax.bar(xs, values[name], width, label=_BAR_LEGEND.get(name, name))
        ax.bar_label(bars, labels=[fmt.format(v) if v else "" for v in values[name]], fontsize=6)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=15)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    tallest = max((v for vals in values.values() for v in vals), default=0) or 1.0
    ax.set_ylim(0, tallest * 1.7)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper left")


def plot_report(r: dict, path: str) -> None:
    """PNG: single-scale times and peak memory, ours vs official; inference time vs image size and
    vs queries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = ["ours"] + (["official"] if r["official"] else [])
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    s = r["single_scale"]
    rows = s["inference"] + s["train"]
    names = impls[:1] + [n for n in ("ours_optimized", "ours_plain") if any(n in row for row in rows)] + impls[1:]
    if any("official_same_malloc" in row for row in rows):
        names.append("official_same_malloc")
    _bars(
        axes[0],
        s,
        names,
        lambda e, task: e["s_per_image" if task == "inference" else "s_per_iter"],
        "seconds",
        "single-scale R50: time",
        "{:.2f}",
    )
    # Peak memory: the tensors' peak on the CPU (the same for both malloc settings), the allocator's
    # on a GPU.
    mem = "tensor_peak_mib" if r["environment"]["device"] == "cpu" else "peak_mem_mib"
    _bars(
        axes[1],
        s,
        [n for n in names if n != "official_same_malloc"],
        lambda e, task: e.get(mem),
        "MiB",
        "single-scale R50: peak " + ("tensor memory" if mem == "tensor_peak_mib" else "memory"),
        "{:.0f}",
    )
    sc = r.get("scaling")
    if sc:
        by_size, by_queries = axes[2], axes[3]
        for i in impls:
            by_size.plot(
                [row["size"][0] * row["size"][1] / 1e6 for row in sc["sizes"]],
                [row[i] for row in sc["sizes"]],
                marker="o",
                label=i,
            )
            by_queries.plot(
                [row["num_queries"] for row in sc["queries"]], [row[i] for row in sc["queries"]], marker="o", label=i
            )
        by_size.set_xlabel("image megapixels")
        by_size.set_title("inference vs image size")
        by_queries.set_xlabel("queries")
        by_queries.set_title("inference vs number of queries")
        for ax in (by_size, by_queries):
            ax.set_ylabel("s / image")
            ax.grid(alpha=0.3)
            ax.legend()
    env = r["environment"]
    fig.suptitle(
        f"{env['device']} ({env['cpu_count']} CPUs, {env['threads']} threads), torch {env['torch']}, {env['date'][:10]}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
