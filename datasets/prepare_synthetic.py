#!/usr/bin/env python
"""Generate the synthetic shapes dataset in COCO format.

Usage (from the repository root)::

    python datasets/prepare_synthetic.py                   # -> $DETECTRON2_DATASETS/synthetic
    python datasets/prepare_synthetic.py --num-train 800 --seed 1 --output /tmp/shapes
"""

import argparse
import importlib.util
import json
import os
import sys
import time


def _generator_module():
    """``smca_d2.data.synthetic``, loaded from its file: it needs only numpy and PIL, while
    importing the ``smca_d2`` package imports torch and detectron2 (seconds of a CPU's time,
    which `make demo` would spend before generating anything)."""
    if "smca_d2.data.synthetic" in sys.modules:
        return sys.modules["smca_d2.data.synthetic"]
    package = importlib.util.find_spec("smca_d2")  # finds the package without importing it
    if package is None:
        raise SystemExit("smca_d2 is not installed: run `make install` or `pip install -e .` first")
    path = os.path.join(package.submodule_search_locations[0], "data", "synthetic.py")
    spec = importlib.util.spec_from_file_location("_smca_d2_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the worker processes' jobs are pickled by module name
    spec.loader.exec_module(module)
    return module


def default_output() -> str:
    # As smca_d2.data.datasets.datasets_root() (tests/data/test_dataset_scripts.py checks it).
    return os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "synthetic")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--output", default=default_output(), help="dataset root (default: %(default)s)")
    add("--num-train", type=int, default=4000, help="training images (default: %(default)s)")
    add("--num-val", type=int, default=100, help="validation images (default: %(default)s)")
    add(
        "--image-size",
        type=int,
        nargs=2,
        default=(128, 128),
        metavar=("H", "W"),
        help="central image size (default: 128 128)",
    )
    add(
        "--size-jitter",
        type=int,
        default=32,
        help="each side varies by up to +-this many pixels (default: %(default)s)",
    )
    add("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)

    # Images per second on the fastest and the slowest 2-core hosts met (docs/DEMO_HISTORY.md).
    images = args.num_train + args.num_val
    low, high = (max(1, round(images / rate)) for rate in (500, 190))
    estimate = f"{low} s" if low == high else f"{low}-{high} s"
    print(
        f"generating {args.num_train} training and {args.num_val} validation images in {args.output}"
        f" (about {estimate} on 2 cores)",
        flush=True,
    )
    start = time.perf_counter()
    paths = _generator_module().make_synthetic_coco(
        args.output,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.image_size,
        size_jitter=args.size_jitter,
        seed=args.seed,
    )
    elapsed = time.perf_counter() - start
    for split in ("train", "val"):
        with open(paths[f"{split}_json"]) as f:
            coco = json.load(f)
        print(
            f"{split:5s}: {len(coco['images']):5d} images, {len(coco['annotations']):6d} boxes"
            f" -> {paths[f'{split}_images']}, {paths[f'{split}_json']}"
        )
    print(f"categories: {', '.join(c['name'] for c in coco['categories'])}; done in {elapsed:.1f} s")


if __name__ == "__main__":
    main()
