#!/usr/bin/env python
"""Run an SMCA-DETR (or any LazyConfig detector) on images or a video and draw the detections.

    python demo/demo.py --config-file configs/demo/smca_r18_synthetic.py \
        --input photos/ extra/*.jpg --output out/ \
        --opts train.init_checkpoint=output/demo/model_final.pth
    python demo/demo.py --config-file CONFIG --video-input clip.mp4 --output clip_out.mp4 --opts ...

For every image it writes the drawing (Detectron2's ``Visualizer``, the test dataset's class
names) and a JSON of the detections above ``--confidence-threshold``: ``boxes`` (XYXY pixels),
``scores``, ``classes``, ``class_names``. ``--output`` is a folder, or a file name for a single
input or a video. The checkpoint is ``train.init_checkpoint`` (set it with ``--opts``).
"""

import argparse
import json
import os
import sys
import time

import cv2
import tqdm

import smca_d2  # noqa: F401  (compatibility fixes, registrations)
from smca_d2.checkpoint import CheckpointUnavailableError
from smca_d2.inference import LazyPredictor
from smca_d2.inference.demo import (
    collect_inputs,
    instances_to_json,
    output_paths,
    run_on_image,
    run_on_video,
)
from smca_d2.model_zoo import ConfigNotFoundError
from smca_d2.speedups import keep_freed_cpu_memory

from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig file")
    parser.add_argument("--input", nargs="+", help="image files, glob patterns or folders")
    parser.add_argument("--video-input", help="a video file")
    parser.add_argument("--output", help="output folder, or file for a single image / a video")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score drawn (0.5)")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: train.device if available)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="key=value config overrides")
    return parser


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)


def run_images(predictor, args, logger):
    paths = collect_inputs(args.input)
    used = set()
    for path in tqdm.tqdm(paths, disable=len(paths) <= 1, desc="images"):
        image = read_image(path, format="BGR")
        start = time.perf_counter()
        instances, drawing = run_on_image(predictor, image, args.confidence_threshold)
        logger.info("%s: %d detections in %.2fs", path, len(instances), time.perf_counter() - start)
        if not args.output:
            continue
        image_path, json_path = output_paths(path, args.output, len(paths), used)
        cv2.imwrite(image_path, drawing[:, :, ::-1])
        _write_json(json_path, instances_to_json(instances, predictor.class_names, file_name=path))


def run_video(predictor, args, logger):
    capture = cv2.VideoCapture(args.video_input)
    if not capture.isOpened():
        raise FileNotFoundError(f"cannot open video {args.video_input!r}")
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    num_frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    writer, frames = None, []
    if args.output:
        out = args.output
        if os.path.isdir(out) or not os.path.splitext(out)[1]:
            os.makedirs(out, exist_ok=True)
            out = os.path.join(out, os.path.splitext(os.path.basename(args.video_input))[0] + ".mp4")
        writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    try:
        results = run_on_video(predictor, capture, args.confidence_threshold)
        for index, (instances, drawing_bgr) in enumerate(tqdm.tqdm(results, total=num_frames, desc="frames")):
            frames.append(instances_to_json(instances, predictor.class_names, frame=index))
            if writer is not None:
                writer.write(drawing_bgr)
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    logger.info("%s: %d frames", args.video_input, len(frames))
    if writer is not None:
        _write_json(os.path.splitext(out)[0] + ".json", {"video": args.video_input, "frames": frames})


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logger = setup_logger(name="smca_d2")
    setup_logger(name="fvcore")  # checkpoint loading messages
    if bool(args.input) == bool(args.video_input):
        logger.error("give either --input or --video-input")
        return 2
    try:
        predictor = LazyPredictor(args.config_file, device=args.device, overrides=args.opts)
    except (ConfigNotFoundError, CheckpointUnavailableError) as e:  # a path to fix, not a bug
        logger.error("%s", e)
        return 2
    logger.info("checkpoint: %s", predictor.checkpoint or "(none: random weights)")
    if predictor.device.type == "cpu":
        keep_freed_cpu_memory()  # one image's buffers reused by the next (no page faults)
    if args.input:
        run_images(predictor, args, logger)
    else:
        run_video(predictor, args, logger)
    return 0


if __name__ == "__main__":
    sys.exit(main())
