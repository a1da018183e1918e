#!/usr/bin/env python
"""The end of ``make demo``: pictures of what the trained model does, and what to run next.

    python tools/demo_report.py --config-file configs/demo/smca_r18_synthetic.py

Reads the run's folder (``train.output_dir`` of the config, or ``--run-dir``) and writes there:

* ``detections.png``: validation images with the predicted and the ground-truth boxes;
* ``smca_maps.png``: SMCA's Gaussian weight maps and co-attention maps of a few detections;
* ``learning_curve.png``: the training loss and the box AP against the iteration;

then prints their paths and the next commands. See ``smca_d2/inference/demo_report.py``.
"""

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")

import smca_d2  # noqa: F401  (compatibility fixes, registrations)
from smca_d2.engine import load_config
from smca_d2.inference import LazyPredictor
from smca_d2.inference.demo_report import next_commands, save_detection_grid, save_learning_curve, save_maps_grid

from detectron2.data import DatasetCatalog


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig of the trained model")
    parser.add_argument("--run-dir", help="the training run's folder (default: the config's train.output_dir)")
    parser.add_argument("--weights", help="checkpoint (default: RUN_DIR/model_final.pth)")
    parser.add_argument("--num-images", type=int, default=8, help="validation images in detections.png (8)")
    parser.add_argument("--maps-images", type=int, default=2, help="images in smca_maps.png, 2 detections each (2)")
    parser.add_argument("--confidence-threshold", type=float, default=0.4, help="minimum score drawn (0.4)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="key=value config overrides")
    return parser


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    run_dir = args.run_dir or cfg.train.output_dir
    weights = args.weights or os.path.join(run_dir, "model_final.pth")
    metrics = os.path.join(run_dir, "metrics.json")
    for path, what in ((weights, "checkpoint"), (metrics, "metrics.json")):
        if not os.path.isfile(path):
            sys.exit(f"demo_report.py: no {what} at {path}: train first (make demo, or train_net.py with this config)")

    predictor = LazyPredictor(cfg, weights, device="cpu", input_format="RGB")
    names = cfg.dataloader.test.dataset.names
    records = DatasetCatalog.get(names if isinstance(names, str) else names[0])
    written = [
        save_detection_grid(
            predictor,
            records[: args.num_images],
            os.path.join(run_dir, "detections.png"),
            confidence_threshold=args.confidence_threshold,
        ),
        save_maps_grid(
            predictor, [r["file_name"] for r in records[: args.maps_images]], os.path.join(run_dir, "smca_maps.png")
        ),
        save_learning_curve(
            metrics, os.path.join(run_dir, "learning_curve.png"), title=os.path.basename(args.config_file)
        ),
    ]
    print("Pictures of this run:")
    for path, what in zip(
        written, ("detections on validation images", "SMCA's Gaussian and co-attention maps", "learning curve")
    ):
        print(f"  {what:40s} {path}")
    print(next_commands(args.config_file, weights))
    return 0


if __name__ == "__main__":
    sys.exit(main())
