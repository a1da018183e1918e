#!/usr/bin/env python
"""Generate a dataset with the size and statistics of COCO train2017 (118,287 images, 860,001
boxes, a 450 MB json), for tests and benchmarks of data loading.

Usage (from the repository root)::

    python datasets/prepare_coco_sized.py                          # -> $DETECTRON2_DATASETS/coco_sized
    python datasets/prepare_coco_sized.py --scale 0.01 --output /tmp/coco_sized_small
"""

import argparse
import logging
import os
import time

from smca_d2.data.coco_sized import COCO_TRAIN2017_IMAGES, make_coco_sized_dataset
from smca_d2.data.datasets import datasets_root


def default_output() -> str:
    return os.path.join(datasets_root(), "coco_sized")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--output", default=default_output(), help="dataset root (default: %(default)s)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--scale", type=float, help="a fraction of COCO's size, e.g. 0.01 (boxes scale alike)")
    size.add_argument("--num-images", type=int, help=f"images (default: COCO's {COCO_TRAIN2017_IMAGES})")
    add("--num-boxes", type=int, help="boxes (default: COCO's boxes per image times the images)")
    add("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    add("--no-images", action="store_true", help="write the json only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    num_images = args.num_images or COCO_TRAIN2017_IMAGES
    if args.scale is not None:
        num_images = max(1, round(COCO_TRAIN2017_IMAGES * args.scale))
    start = time.perf_counter()
    paths = make_coco_sized_dataset(
        args.output, num_images=num_images, num_boxes=args.num_boxes, seed=args.seed, write_images=not args.no_images
    )
    size_mb = os.path.getsize(paths["json_file"]) / 1e6
    print(
        f"{paths['json_file']} ({size_mb:.0f} MB) and {paths['image_root']}: {num_images} images; "
        f"done in {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
