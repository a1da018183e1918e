#!/usr/bin/env python
"""Time and peak memory of loading a COCO-sized dataset: detectron2's
``get_detection_dataset_dicts`` vs smca_d2's ``validated_dataset_dicts``, side by side in one run.

    python datasets/prepare_coco_sized.py --output /data/coco_sized     # once
    python benchmarks/dataset_loading.py --root /data/coco_sized

Both get the same dataset, registered with ``register_coco_instances``; ours also checks the json,
clips or drops bad boxes and checks the image files (default settings). Each measurement runs in
its own fresh process (``--ranks 2``: two processes on GLOO through ``smca_d2.engine.launch``),
which times the call alone (imports excluded), followed by one full garbage collection
(``gc.collect()``, so that collector work a loader leaves for later is counted), and reports its
peak resident memory (``getrusage(RUSAGE_SELF).ru_maxrss``, imports included). With several
ranks, the time is the slowest rank's and the memory the largest of the ranks' peaks.

Variants, run in turn in each of ``--rounds`` rounds (a slow spell of the machine hits all of
them; medians reported):

* ``detectron2``: ``get_detection_dataset_dicts(name)``; it keeps nothing between runs;
* ``detectron2_gc_paused``: the same with Python's cyclic garbage collector paused, as ours
  pauses it while the json is parsed and turned into dicts (``smca_d2.data.coco_json.gc_paused``):
  ours against this one is what its checks cost beyond detectron2's own work;
* ``ours_first``: ``validated_dataset_dicts(name)`` with an empty cache folder
  (``SMCA_D2_DATA_CACHE``): the image files are checked;
* ``ours_repeated``: the same again, with the record of that check: what every later run of an
  unchanged dataset costs.

The json is read once before the rounds so that every variant finds it in the page cache. The
image files are in whatever state the page cache leaves them (the first run's header reads cost
more on a cold disk). Prints a table and writes JSON (``--output``).
"""

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from common import environment, write_json

VARIANTS = ("detectron2", "detectron2_gc_paused", "ours_first", "ours_repeated")
DATASET_NAME = "coco_sized_benchmark"
#: ours / detectron2 on a repeated run, time and peak memory
GOAL_RATIO = 1.2


def default_root() -> str:
    return os.path.join(os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets")), "coco_sized")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(spec: dict) -> None:
    """One rank of one measurement: load the dataset with ``spec["loader"]`` and write the time
    and memory to ``spec["result_dir"]/rank<r>.json``."""
    os.environ["SMCA_D2_DATA_CACHE"] = spec["cache_dir"]
    import smca_d2  # noqa: F401  (detectron2 compatibility fixes)
    from smca_d2.data import validated_dataset_dicts
    from smca_d2.data.coco_json import gc_paused

    from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
    from detectron2.data.datasets import register_coco_instances
    from detectron2.utils import comm

    if DATASET_NAME in DatasetCatalog.list():  # an earlier measurement in this process
        DatasetCatalog.remove(DATASET_NAME)
        MetadataCatalog.remove(DATASET_NAME)
    register_coco_instances(DATASET_NAME, {}, spec["json_file"], spec["image_root"])

    def load(name):
        if spec["loader"] == "ours":
            return validated_dataset_dicts(name)
        if spec["loader"] == "detectron2_gc_paused":
            with gc_paused():
                return get_detection_dataset_dicts(name)
        return get_detection_dataset_dicts(name)

    records_folder = os.path.join(spec["cache_dir"], "image_checks")
    cached_before = len(os.listdir(records_folder)) if os.path.isdir(records_folder) else 0
    rss_before = _peak_rss_mib()
    comm.synchronize()
    start = time.perf_counter()
    dicts = load(DATASET_NAME)
    gc.collect()
    seconds = time.perf_counter() - start
    result = {
        "rank": comm.get_rank(),
        "seconds": seconds,
        "peak_rss_mib": _peak_rss_mib(),
        "rss_before_mib": rss_before,
        "images": len(dicts),
        "boxes": sum(len(d["annotations"]) for d in dicts),
        "cache_records_before": cached_before,
    }
    os.makedirs(spec["result_dir"], exist_ok=True)
    with open(os.path.join(spec["result_dir"], f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)


def worker_main(spec: dict) -> None:
    """What the process of one measurement runs: :func:`measure` on ``spec["ranks"]`` ranks."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from smca_d2.engine import launch

    launch(measure, spec["ranks"], dist_url="auto", args=(spec,))


def run_worker(spec: dict) -> List[dict]:
    """One measurement in a fresh process; the result of each rank."""
    spec_file = spec["result_dir"] + ".spec.json"
    with open(spec_file, "w") as f:
        json.dump(spec, f)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", spec_file], capture_output=True, text=True
    )
    with open(spec["result_dir"] + ".log", "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"measurement {spec['loader']} on {spec['ranks']} rank(s) failed:\n{proc.stderr[-4000:]}")
    return read_results(spec)


def read_results(spec: dict) -> List[dict]:
    results = []
    for rank in range(spec["ranks"]):
        with open(os.path.join(spec["result_dir"], f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results


def summarize(rounds: Dict[str, List[List[dict]]]) -> dict:
    """Per variant: the slowest rank's time and the largest peak of each round, their medians;
    and the ratios ours / detectron2 of the medians, on a first and on a repeated run."""
    variants = {}
    for name, measured in rounds.items():
        seconds = [max(r["seconds"] for r in ranks) for ranks in measured]
        peaks = [max(r["peak_rss_mib"] for r in ranks) for ranks in measured]
        before = [max(r["rss_before_mib"] for r in ranks) for ranks in measured]
        variants[name] = {
            "seconds": statistics.median(seconds),
            "peak_rss_mib": statistics.median(peaks),
            "rss_before_mib": statistics.median(before),
            "rounds_seconds": seconds,
            "rounds_peak_rss_mib": peaks,
            "images": measured[0][0]["images"],
            "boxes": measured[0][0]["boxes"],
            "cache_records_before": [ranks[0]["cache_records_before"] for ranks in measured],
            "per_rank": measured,
        }
    ratios = {}
    for run in ("first", "repeated"):
        ours = variants[f"ours_{run}"]
        ratios[run] = {
            "time": ours["seconds"] / variants["detectron2"]["seconds"],
            "peak_rss": ours["peak_rss_mib"] / variants["detectron2"]["peak_rss_mib"],
        }
        if "detectron2_gc_paused" in variants:
            paused = variants["detectron2_gc_paused"]
            ratios[run]["time_vs_gc_paused"] = ours["seconds"] / paused["seconds"]
            ratios[run]["peak_rss_vs_gc_paused"] = ours["peak_rss_mib"] / paused["peak_rss_mib"]
    return {"variants": variants, "ratios": ratios}


def print_table(results: List[dict]) -> None:
    """Time in seconds and peak RSS in MiB; d2 = detectron2, d2 paused = with the collector paused."""
    print(
        f"{'ranks':>5} {'run':9} {'d2 s':>7} {'paused s':>8} {'ours s':>7} {'/d2':>6} {'/paused':>7} "
        f"{'d2 MiB':>7} {'paused MiB':>10} {'ours MiB':>8} {'/d2':>6}"
    )
    for r in results:
        d2, paused = r["variants"]["detectron2"], r["variants"]["detectron2_gc_paused"]
        for run in ("first", "repeated"):
            ours, ratio = r["variants"][f"ours_{run}"], r["ratios"][run]
            print(
                f"{r['ranks']:>5} {run:9} {d2['seconds']:7.2f} {paused['seconds']:8.2f} {ours['seconds']:7.2f} "
                f"{ratio['time']:5.2f}x {ratio['time_vs_gc_paused']:6.2f}x {d2['peak_rss_mib']:7.0f} "
                f"{paused['peak_rss_mib']:10.0f} {ours['peak_rss_mib']:8.0f} {ratio['peak_rss']:5.2f}x"
            )


def goal(results: List[dict]) -> dict:
    worst_time = max(r["ratios"]["repeated"]["time"] for r in results)
    worst_rss = max(r["ratios"]["repeated"]["peak_rss"] for r in results)
    return {
        "max_ratio": GOAL_RATIO,
        "repeated_time_ratio": worst_time,
        "repeated_peak_rss_ratio": worst_rss,
        "met": worst_time <= GOAL_RATIO and worst_rss <= GOAL_RATIO,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=default_root(), help="a dataset of datasets/prepare_coco_sized.py")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="processes per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default="output/benchmarks/dataset_loading.json")
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        with open(args.worker) as f:
            worker_main(json.load(f))
        return {}

    json_file = os.path.join(args.root, "annotations", "instances.json")
    image_root = os.path.join(args.root, "images")
    if not os.path.isfile(json_file) or not os.path.isdir(image_root):
        raise SystemExit(
            f"No dataset under {args.root}: make one with `python datasets/prepare_coco_sized.py --output {args.root}`"
        )
    with open(json_file, "rb") as f:  # into the page cache, for every variant alike
        while f.read(1 << 24):
            pass
    with os.scandir(image_root) as entries:
        image_files = sum(1 for _ in entries)
    dataset = {
        "root": os.path.abspath(args.root),
        "json_mb": os.path.getsize(json_file) / 1e6,
        "image_files": image_files,
    }
    print(f"dataset {args.root}: {dataset['json_mb']:.0f} MB json, {image_files} image files")

    results = []
    with tempfile.TemporaryDirectory(prefix="dataset_loading_") as tmp:
        cache_dir = os.path.join(tmp, "cache")
        n = 0
        for ranks in args.ranks:
            rounds: Dict[str, List[List[dict]]] = {v: [] for v in VARIANTS}
            for k in range(args.rounds):
                for variant in VARIANTS:
                    if variant == "ours_first":
                        shutil.rmtree(cache_dir, ignore_errors=True)
                    n += 1
                    spec = {
                        "loader": "ours" if variant.startswith("ours") else variant,
                        "ranks": ranks,
                        "json_file": json_file,
                        "image_root": image_root,
                        "cache_dir": cache_dir,
                        "result_dir": os.path.join(tmp, f"m{n}"),
                    }
                    print(f"  {ranks} rank(s), round {k + 1}/{args.rounds}, {variant} ...", end="", flush=True)
                    start = time.perf_counter()
                    rounds[variant].append(run_worker(spec))
                    print(f" {time.perf_counter() - start:.0f} s", flush=True)
            results.append({"ranks": ranks, **summarize(rounds)})
    for r in results:
        first, repeated = r["variants"]["ours_first"], r["variants"]["ours_repeated"]
        if set(first["cache_records_before"]) != {0} or 0 in repeated["cache_records_before"]:
            raise SystemExit("the cache folder was not in the state each variant needs")
    dataset.update(images=results[0]["variants"]["detectron2"]["images"])
    dataset.update(boxes=results[0]["variants"]["detectron2"]["boxes"])
    print_table(results)
    record = {
        "environment": environment("cpu"),
        "dataset": dataset,
        "settings": {"rounds": args.rounds, "ranks": args.ranks},
        "results": results,
        "goal": goal(results),
    }
    g = record["goal"]
    print(
        f"repeated run, ours / detectron2: time {g['repeated_time_ratio']:.2f}x, peak memory "
        f"{g['repeated_peak_rss_ratio']:.2f}x (goal <= {GOAL_RATIO}x: {'met' if g['met'] else 'NOT met'})"
    )
    write_json(args.output, record)
    print(f"wrote {args.output}")
    return record


if __name__ == "__main__":
    main()
