#!/usr/bin/env python
"""Export a trained SMCA-DETR model (single-scale, multi-scale or the DETR baseline) to ONNX or to
a ``torch.export`` program, and check the result against the eager model.

    python tools/export_model.py --config-file configs/smca_single_scale_r50_50ep.py \
        --format onnx --output smca.onnx train.init_checkpoint=/path/to/model_final.pth

The weights are those of ``train.init_checkpoint`` (a path or URL; an empty string exports the
randomly initialised model, with a warning). Without ``--height/--width`` the file takes images of
any height and width (``--dynamic``, the default); with them, only that size.

The exported graph takes one image, float [3, H, W] with values 0..255 in the config's
``model.input_format`` (BGR for the configs here), already resized as the model expects (the
config's test resize, e.g. shortest edge 800, is not in the graph), and returns ``boxes`` [K, 4]
(XYXY, in the pixels of that image), ``scores`` [K] and ``classes`` [K] (int64), sorted by score,
``K = min(model.test_topk, num_queries * num_classes)``.

After writing the file, the exported model (ONNX Runtime for ONNX) and the eager model are run on
random images (``--check-sizes``, two sizes by default; ``--check-sizes`` with no size skips
this) and the largest differences are printed; ``--tolerance`` makes a larger box difference
(relative to the image size) an error.
"""

import argparse
import logging
import os
import sys
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

import smca_d2  # noqa: F401  (compatibility fixes, registrations)
from smca_d2.checkpoint import CheckpointUnavailableError
from smca_d2.engine import load_config
from smca_d2.inference import load_inference_weights
from smca_d2.inference.export import (
    MAX_SIZE,
    MIN_SIZE,
    ExportUnavailable,
    SMCAExportWrapper,
    dynamic_size_ok,
    export_onnx,
    export_program,
)
from smca_d2.model_zoo import ConfigNotFoundError

from detectron2.config import instantiate

logger = logging.getLogger("smca_d2.export")

FORMATS = ("onnx", "torch_export")


class ExportMismatch(RuntimeError):
    """The exported model's detections differ from the eager model's."""


DEFAULT_CHECK_SIZES = ((480, 640), (600, 452))


def _size(text: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HxW, e.g. 800x1066") from None
    if not dynamic_size_ok(h, w):
        raise argparse.ArgumentTypeError(f"{text!r}: height and width must be in [{MIN_SIZE}, {MAX_SIZE}]")
    return h, w


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="a LazyConfig file or a model-zoo config name")
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--output", required=True, help="file to write (.onnx or .pt2)")
    size = parser.add_argument_group("image size (default: dynamic)")
    size.add_argument("--height", type=int, help="fixed input height (with --width)")
    size.add_argument("--width", type=int, help="fixed input width (with --height)")
    size.add_argument("--dynamic", action="store_true", help="one file for any height and width (the default)")
    parser.add_argument(
        "--check-sizes",
        nargs="*",
        type=_size,
        default=None,
        metavar="HxW",
        help="image sizes on which the export is compared with the eager model "
        "(default: the fixed size, or two sizes for a dynamic export; none: skip the check)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest accepted box difference relative to the image size (default: 1e-4)",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    parser.add_argument(
        "--no-optimize",
        action="store_true",
        help="ONNX: skip the exporter's graph optimizer (a faster export; ONNX Runtime optimizes the graph when it loads it)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, key=value")
    return parser


def _check_args(parser: argparse.ArgumentParser, args) -> Optional[Tuple[int, int]]:
    if (args.height is None) != (args.width is None):
        parser.error("--height and --width go together (or neither, for a dynamic export)")
    if args.height is not None and args.dynamic:
        parser.error("--dynamic exports for any size: leave out --height/--width, or leave out --dynamic")
    fixed = None
    if args.height is not None:
        if not dynamic_size_ok(args.height, args.width):
            parser.error(f"--height/--width must be in [{MIN_SIZE}, {MAX_SIZE}]")
        fixed = (args.height, args.width)
    if fixed is not None and args.check_sizes and any(s != fixed for s in args.check_sizes):
        parser.error(f"a fixed-size export takes {fixed[0]}x{fixed[1]} images only: --check-sizes must be that size")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        parser.error(f"--output {args.output}: the folder {out_dir} does not exist")
    return fixed


def build_model(config_file: str, opts: Sequence[str]) -> torch.nn.Module:
    """``cfg.model`` on the CPU in eval mode, with the weights of ``train.init_checkpoint``."""
    cfg = load_config(config_file, list(opts))
    model = instantiate(cfg.model).to("cpu").eval()
    checkpoint = cfg.train.get("init_checkpoint", "") if "train" in cfg else ""
    if checkpoint:
        load_inference_weights(model, checkpoint, ema_weights=bool(cfg.train.get("ema", {}).get("enabled", False)))
    else:
        logger.warning("train.init_checkpoint is empty: exporting the randomly initialised model")
    return model


def _runner(fmt: str, path: str):
    """A function ``image [3, H, W] float tensor -> (boxes, scores, classes)`` numpy arrays that
    runs the exported file."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            return None
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda image: session.run(None, {"image": image.numpy()})
    module = torch.export.load(path).module()

    def run(image):
        with torch.no_grad():
            return [t.numpy() for t in module(image)]

    return run


def check_export(model, fmt: str, path: str, sizes: Sequence[Tuple[int, int]], tolerance: float) -> List[dict]:
    """Run the exported file and the eager model on one random image per size; the largest
    differences, per size.

    Raises:
        ExportMismatch: a box or a class differs beyond the tolerance.
    """
    run = _runner(fmt, path)
    if run is None:
        logger.warning("onnxruntime is not installed: the ONNX file was not run (pip install 'smca-d2[export]')")
        return []
    wrapper = SMCAExportWrapper(model)
    rows = []
    for i, (h, w) in enumerate(sizes):
        image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(i)) * 255
        with torch.no_grad():
            ref = [t.numpy() for t in wrapper(image)]
        start = time.perf_counter()
        out = run(image)
        seconds = time.perf_counter() - start
        box_diff = float(np.abs(out[0] - ref[0]).max()) if len(ref[0]) else 0.0
        row = {
            "size": [h, w],
            "max_box_diff_px": box_diff,
            "max_box_diff_rel": box_diff / max(h, w),
            "max_score_diff": float(np.abs(out[1] - ref[1]).max()) if len(ref[1]) else 0.0,
            "classes_equal": bool(np.array_equal(out[2], ref[2])),
            "seconds": seconds,
        }
        rows.append(row)
        print(
            f"{h}x{w}: max box difference {box_diff:.3g} px ({row['max_box_diff_rel']:.2g} of the image size), "
            f"max score difference {row['max_score_diff']:.3g}, classes {'equal' if row['classes_equal'] else 'DIFFER'}"
        )
        if row["max_box_diff_rel"] > tolerance or not row["classes_equal"]:
            raise ExportMismatch(
                f"the exported model differs from the eager model at {h}x{w} (max box difference "
                f"{box_diff:.3g} px, classes {'equal' if row['classes_equal'] else 'differ'}); tolerance {tolerance}"
            )
    return rows


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    parser = argument_parser()
    args = parser.parse_args(argv)
    fixed = _check_args(parser, args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("smca_d2").setLevel(logging.INFO)
    model = build_model(args.config_file, args.opts)
    kind = f"{fixed[0]}x{fixed[1]} images" if fixed else "any image size"
    start = time.perf_counter()
    if args.format == "onnx":
        export_onnx(model, args.output, fixed, opset_version=args.opset, optimize=not args.no_optimize)
    else:
        torch.export.save(export_program(model, fixed), args.output)
    print(f"wrote {args.output} ({args.format}, {kind}) in {time.perf_counter() - start:.1f} s")
    sizes = args.check_sizes
    if sizes is None:
        sizes = [fixed] if fixed else list(DEFAULT_CHECK_SIZES)
    return check_export(model, args.format, args.output, sizes, args.tolerance)


if __name__ == "__main__":
    try:
        main()
    except (ConfigNotFoundError, CheckpointUnavailableError, ExportUnavailable, ExportMismatch) as e:
        sys.exit(f"export_model.py: {e}")
