#!/usr/bin/env python
"""Draw SMCA's Gaussian weight maps and co-attention maps of chosen queries over images.

    python tools/visualize_gaussian_maps.py --config-file configs/demo/smca_r18_synthetic.py \
        --input photo.jpg more/ --output gaussian_maps/ --topk 5 \
        --opts train.init_checkpoint=output/demo/model_final.pth

For each image, ``OUTPUT/<image name>/queryNNN.png`` holds one figure per query: per feature
level, the head-averaged Gaussian ``exp(log G)`` of the decoder layer (``--layer``, default the
last) and its head-averaged co-attention ``softmax(logits + log G)``, with the predicted box and
the query's center. Queries: ``--queries 3 17 ...`` or the ``--topk`` highest scoring ones.
See ``smca_d2/inference/gaussian_maps.py``.
"""

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")

import smca_d2  # noqa: F401  (compatibility fixes, registrations)
from smca_d2.inference import LazyPredictor, collect_inputs
from smca_d2.inference.gaussian_maps import compute_smca_maps, save_smca_maps

from detectron2.data.detection_utils import read_image


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig of an SMCADETR model")
    parser.add_argument("--input", nargs="+", required=True, help="image files, glob patterns or folders")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--queries", type=int, nargs="+", help="query indices (default: the top-k)")
    parser.add_argument("--topk", type=int, default=5, help="number of top-scoring queries (5)")
    parser.add_argument("--layer", type=int, default=-1, help="decoder layer (-1: the last)")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: train.device if available)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="key=value config overrides")
    return parser


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    predictor = LazyPredictor(args.config_file, device=args.device, overrides=args.opts)
    for path in collect_inputs(args.input):
        maps = compute_smca_maps(
            predictor, read_image(path, format=predictor.input_format), args.queries, args.topk, args.layer
        )
        out_dir = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0])
        written = save_smca_maps(maps, out_dir)
        summary = ", ".join(
            f"q{int(q)} {maps.class_names[int(c)] if int(c) < len(maps.class_names) else int(c)} {s:.2f}"
            for q, c, s in zip(maps.queries, maps.classes, maps.scores)
        )
        print(f"{path}: {len(written)} figures in {out_dir} ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
