"""The pictures that end ``make demo``: detections on validation images, SMCA's maps of a few
detections, and the learning curve of the run.

Each function draws one PNG with matplotlib (Agg) and returns its path:

* :func:`save_detection_grid`: a grid of images with the predicted boxes (solid, colour per
  class, name and score) and the ground-truth boxes (dashed white);
* :func:`save_maps_grid`: one row per detection: the image with its box, the Gaussian weight map
  ``exp(log G)`` and the co-attention map of the last decoder layer
  (:func:`~smca_d2.inference.gaussian_maps.compute_smca_maps`);
* :func:`save_learning_curve`: the training loss and the evaluated box AP against the iteration,
  read from detectron2's ``metrics.json``.

``tools/demo_report.py`` calls them after training; :func:`next_commands` is the text it prints
last.
"""

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .demo import filter_instances
from .gaussian_maps import _draw_panel, compute_smca_maps

__all__ = [
    "read_metrics",
    "save_detection_grid",
    "save_learning_curve",
    "save_maps_grid",
    "next_commands",
]

# Class colours (matplotlib's "tab10"), so that a class keeps its colour across pictures.
_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _box(ax, box, colour, dashed=False, width=1.5):
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(
        Rectangle(
            (x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=width, linestyle="--" if dashed else "-"
        )
    )


def _show(ax, image_rgb, title=None):
    ax.imshow(image_rgb)
    h, w = image_rgb.shape[:2]
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)


def _save(fig, path: str, dpi: int) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _read_rgb(path: str) -> np.ndarray:
    from detectron2.data.detection_utils import read_image

    return np.ascontiguousarray(read_image(path, format="RGB"))


def _as_input(predictor, image_rgb: np.ndarray) -> np.ndarray:
    """``image_rgb`` in the channel order the predictor was built to take."""
    return image_rgb if predictor.input_format == "RGB" else image_rgb[:, :, ::-1]


def _xyxy(annotation: Dict) -> Tuple[float, float, float, float]:
    from detectron2.structures import BoxMode

    return BoxMode.convert(list(annotation["bbox"]), annotation["bbox_mode"], BoxMode.XYXY_ABS)


def save_detection_grid(
    predictor,
    dataset_dicts: Sequence[Dict],
    output_path: str,
    *,
    confidence_threshold: float = 0.5,
    columns: int = 4,
    dpi: int = 100,
) -> str:
    """Run ``predictor`` on each record's image and draw them in a grid.

    Args:
        predictor: a :class:`~smca_d2.inference.LazyPredictor`.
        dataset_dicts: detectron2 dataset records (``file_name``, ``annotations`` with the
            contiguous ``category_id`` of the model's classes).
        output_path: the PNG to write.
        confidence_threshold: the lowest score drawn.
        columns: images per row.

    Returns:
        ``output_path``
    """
    if not dataset_dicts:
        raise ValueError("save_detection_grid needs at least one image")
    names = list(predictor.class_names)
    rows = -(-len(dataset_dicts) // columns)
    fig = _figure(2.6 * columns, 2.75 * rows + 0.5)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, record in zip(axes.flat, dataset_dicts):
        image = _read_rgb(record["file_name"])
        instances = filter_instances(predictor(_as_input(predictor, image))["instances"], confidence_threshold)
        instances = instances.to("cpu")
        _show(ax, image, os.path.basename(record["file_name"]))
        for annotation in record.get("annotations", []):
            _box(ax, _xyxy(annotation), "white", dashed=True, width=1.0)
        for box, cls, score in zip(
            instances.pred_boxes.tensor.numpy(), instances.pred_classes.tolist(), instances.scores.tolist()
        ):
            colour = _COLOURS[cls % len(_COLOURS)]
            _box(ax, box, colour)
            name = names[cls] if cls < len(names) else str(cls)
            ax.text(
                box[0],
                box[1] - 1,
                f"{name} {score:.2f}",
                fontsize=6,
                color="white",
                va="bottom",
                bbox=dict(facecolor=colour, edgecolor="none", pad=0.5, alpha=0.85),
            )
    fig.suptitle(f"predictions (solid, score >= {confidence_threshold:g}) and ground truth (dashed white)", fontsize=10)
    fig.tight_layout()
    return _save(fig, output_path, dpi)


def save_maps_grid(
    predictor, image_paths: Sequence[str], output_path: str, *, per_image: int = 2, dpi: int = 100
) -> str:
    """SMCA's maps for the ``per_image`` highest-scoring queries of each image, one row each.

    Columns: the image with the query's predicted box and Gaussian center, the head-averaged
    Gaussian weight map ``exp(log G)`` and the head-averaged co-attention map (the first feature
    level; the last decoder layer).

    Returns:
        ``output_path``
    """
    rows: List[Tuple] = []
    for path in image_paths:
        image = _read_rgb(path)
        maps = compute_smca_maps(predictor, _as_input(predictor, image), topk=per_image)
        gaussian = maps.gaussian_image(0)
        attention = maps.attention_image(0)
        for i in range(len(maps.queries)):
            rows.append((maps, i, None if gaussian is None else gaussian[i], attention[i]))
    if not rows:
        raise ValueError("save_maps_grid needs at least one image")
    fig = _figure(7.5, 2.5 * len(rows) + 0.4)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for (maps, i, gaussian, attention), row in zip(rows, axes):
        cls = int(maps.classes[i])
        name = maps.class_names[cls] if cls < len(maps.class_names) else str(cls)
        centre = maps.centers[i]
        _show(row[0], maps.image_rgb, f"query {int(maps.queries[i])}: {name} {maps.scores[i]:.2f}")
        _box(row[0], maps.boxes[i], "lime")
        row[0].scatter([centre[0]], [centre[1]], s=60, marker="x", c="red")
        for ax, heat, title in ((row[1], gaussian, "Gaussian exp(log G)"), (row[2], attention, "co-attention")):
            if heat is None:
                _show(ax, maps.image_rgb, title + ": none (unmodulated)")
            else:  # drawn as tools/visualize_gaussian_maps.py draws a panel
                _draw_panel(ax, maps.image_rgb, heat, maps.boxes[i], centre, None, title)
    fig.suptitle("SMCA, last decoder layer: the Gaussian prior and the attention it shapes", fontsize=10)
    fig.tight_layout()
    return _save(fig, output_path, dpi)


def read_metrics(path: str) -> Dict[str, List[Tuple[int, float]]]:
    """The training loss and the evaluated box AP of a detectron2 ``metrics.json``.

    Returns:
        ``{"loss": [(iteration, total_loss), ...], "ap": [(iterations trained, bbox/AP), ...]}``;
        a resumed run's repeated iterations keep their last value. detectron2 records a periodic
        evaluation at the index of the iteration it follows and the one after training at
        ``max_iter``: both become the number of iterations trained.
    """
    loss: Dict[int, float] = {}
    ap: Dict[int, float] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not JSON ({e.msg})") from None
            iteration = record.get("iteration")
            if iteration is None:
                continue
            if "total_loss" in record:
                loss[int(iteration)] = float(record["total_loss"])
            if "bbox/AP" in record:
                ap[int(iteration)] = float(record["bbox/AP"])
    last = max(loss, default=-1)
    trained = {(i if i > last else i + 1): v for i, v in ap.items()}
    return {"loss": sorted(loss.items()), "ap": sorted(trained.items())}


def save_learning_curve(metrics_path: str, output_path: str, *, title: Optional[str] = None, dpi: int = 100) -> str:
    """The loss (left axis) and the box AP (right axis) of a run against the iteration.

    Returns:
        ``output_path``
    """
    metrics = read_metrics(metrics_path)
    if not metrics["loss"]:
        raise ValueError(f"{metrics_path} has no training loss (total_loss) to draw")
    fig = _figure(6.0, 3.4)
    ax = fig.subplots()
    iterations, losses = zip(*metrics["loss"])
    ax.plot(iterations, losses, color="tab:blue", linewidth=1.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (all decoder layers)", color="tab:blue")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if metrics["ap"]:
        right = ax.twinx()
        ap_iterations, aps = zip(*metrics["ap"])
        right.plot(ap_iterations, aps, color="tab:red", marker="o", linewidth=1.2)
        right.set_ylabel("box AP, validation", color="tab:red")
        right.set_ylim(0, 100)
        right.annotate(
            f"{aps[-1]:.1f}",
            (ap_iterations[-1], aps[-1]),
            textcoords="offset points",
            xytext=(-10, 6),
            fontsize=8,
            color="tab:red",
        )
    ax.set_title(title or "learning curve", fontsize=10)
    fig.tight_layout()
    return _save(fig, output_path, dpi)


def next_commands(config_file: str, weights: str, python: str = ".venv/bin/python") -> str:
    """What to run after the demo, with this run's config and weights."""
    return "\n".join(
        [
            "Next:",
            "  run the model on your own images, a folder or a video (--video-input clip.mp4):",
            f"    {python} demo/demo.py --config-file {config_file} --input my_images/ --output my_detections/ \\",
            f"        --opts train.init_checkpoint={weights}",
            "  evaluate it again (COCO AP on the generated val split):",
            f"    {python} train_net.py --config-file {config_file} --eval-only train.init_checkpoint={weights}",
            "  SMCA's maps of any image:",
            f"    {python} tools/visualize_gaussian_maps.py --config-file {config_file} --input my_images/ \\",
            f"        --output maps/ --opts train.init_checkpoint={weights}",
            "  train on COCO (GPUs; datasets/README.md says where COCO goes):",
            "    python train_net.py --config-file configs/smca_single_scale_r50_50ep.py --num-gpus 8",
            "  more: docs/GETTING_STARTED.md",
        ]
    )
