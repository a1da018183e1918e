#!/usr/bin/env python
"""Convert the tree-crown sample data of the deepforest 2.1.0 wheel (MIT) to COCO format.

The wheel is fetched with ``pip download --no-deps deepforest==2.1.0`` unless ``--wheel`` names
it (or a directory holding it); deepforest is never installed. See datasets/README.md.

Usage (from the repository root)::

    python datasets/prepare_deepforest.py                  # -> $DETECTRON2_DATASETS/deepforest
    python datasets/prepare_deepforest.py --wheel /tmp/wheels --tile-size 320
"""

import argparse
import json
import os
import sys
import time

from smca_d2.data.datasets import datasets_root
from smca_d2.data.deepforest import prepare_deepforest


def default_output() -> str:
    return os.path.join(datasets_root(), "deepforest")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--output", default=default_output(), help="dataset root (default: %(default)s)")
    add(
        "--wheel",
        default=None,
        help="deepforest-2.1.0-*.whl, or a directory with it (downloaded there if missing); "
        "default: download to a temporary directory",
    )
    add("--tile-size", type=int, default=400, help="training tile side (default: %(default)s)")
    add(
        "--overlap",
        type=float,
        default=0.25,
        help="minimum tile overlap, as a fraction of the tile (default: %(default)s)",
    )
    add(
        "--min-visible",
        type=float,
        default=0.5,
        help="keep a box cut by a tile border if this fraction of it is inside (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        paths = prepare_deepforest(
            args.output,
            wheel_dir=args.wheel,
            tile_size=args.tile_size,
            overlap=args.overlap,
            min_visible=args.min_visible,
        )
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    elapsed = time.perf_counter() - start
    for split in ("train", "val"):
        with open(paths[f"{split}_json"]) as f:
            coco = json.load(f)
        print(
            f"{split:5s}: {len(coco['images']):4d} images, {len(coco['annotations']):5d} boxes"
            f" -> {paths[f'{split}_images']}, {paths[f'{split}_json']}"
        )
    print(f"wheel: {paths['wheel']}; done in {elapsed:.1f} s")


if __name__ == "__main__":
    main()
