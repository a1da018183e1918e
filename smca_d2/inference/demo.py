"""The reusable parts of ``demo/demo.py``: inputs, drawing, JSON output, images and videos.

Usage::

    predictor = LazyPredictor("configs/demo/smca_r18_synthetic.py", "model_final.pth")
    instances, drawing = run_on_image(predictor, read_image("photo.jpg", format="BGR"))
    json.dump(instances_to_json(instances, predictor.class_names), open("photo.json", "w"))
"""

import glob
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from detectron2.data.catalog import Metadata
from detectron2.structures import Instances

__all__ = [
    "IMAGE_EXTENSIONS",
    "collect_inputs",
    "draw_instances",
    "filter_instances",
    "instances_to_json",
    "output_paths",
    "run_on_image",
    "run_on_video",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def collect_inputs(patterns: Sequence[str]) -> List[str]:
    """Image files named by ``patterns``: files, glob patterns or folders (their images, sorted).

    Raises:
        FileNotFoundError: a pattern matches nothing.
    """
    paths: List[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, f)
                for f in os.listdir(pattern)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(pattern, f))
            )
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"no image found for input {pattern!r}")
        paths.extend(found)
    return list(dict.fromkeys(paths))  # in order, without duplicates


def output_paths(input_path: str, output: str, num_inputs: int, used: Optional[set] = None) -> Tuple[str, str]:
    """Where the drawing and the JSON of ``input_path`` go.

    ``output`` is a folder when it exists as one, when there are several inputs, or when it has no
    file extension (it is then created); otherwise it is the drawing's file name and the JSON is
    written next to it (same name, ``.json``).

    Args:
        used: names already given (for inputs from different folders with the same file name);
            updated in place.

    Returns:
        (drawing path, JSON path)
    """
    is_file = num_inputs == 1 and not os.path.isdir(output) and os.path.splitext(output)[1] != ""
    if is_file:
        image_path = output
    else:
        os.makedirs(output, exist_ok=True)
        stem, ext = os.path.splitext(os.path.basename(input_path))
        name, k = stem, 1
        while used is not None and name in used:
            name, k = f"{stem}_{k}", k + 1
        if used is not None:
            used.add(name)
        image_path = os.path.join(output, name + (ext if ext.lower() in IMAGE_EXTENSIONS else ".png"))
    parent = os.path.dirname(os.path.abspath(image_path))
    os.makedirs(parent, exist_ok=True)
    return image_path, os.path.splitext(image_path)[0] + ".json"


def filter_instances(instances: Instances, confidence_threshold: float) -> Instances:
    """The detections whose score is at least ``confidence_threshold``."""
    return instances[instances.scores >= confidence_threshold]


def instances_to_json(instances: Instances, class_names: Optional[Sequence[str]] = None, **extra) -> Dict:
    """Detections as plain JSON values.

    Returns:
        ``{**extra, "image_size": [h, w], "boxes": [[x0, y0, x1, y1], ...] (pixels),
        "scores": [...], "classes": [...], "class_names": [...]}``; a class without a name is
        named by its index.
    """
    instances = instances.to("cpu")
    classes = [int(c) for c in instances.pred_classes.tolist()]
    names = [class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c) for c in classes]
    return {
        **extra,
        "image_size": list(instances.image_size),
        "boxes": [[round(float(v), 3) for v in box] for box in instances.pred_boxes.tensor.tolist()],
        "scores": [round(float(s), 5) for s in instances.scores.tolist()],
        "classes": classes,
        "class_names": names,
    }


def draw_instances(
    image_rgb: np.ndarray, instances: Instances, class_names: Optional[Sequence[str]] = None
) -> np.ndarray:
    """Boxes, class names and scores drawn with Detectron2's ``Visualizer``.

    Args:
        image_rgb: HxWx3 uint8, RGB.

    Returns:
        HxWx3 uint8 RGB drawing.
    """
    # Imported here: the visualizer brings matplotlib, which train_net.py and the tools that only
    # load weights through this package do not need.
    from detectron2.utils.visualizer import ColorMode, Visualizer

    metadata = Metadata(name="smca_d2_demo")
    if class_names is not None:
        metadata.thing_classes = list(class_names)
    visualizer = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_instance_predictions(instances.to("cpu")).get_image()


def run_on_image(predictor, image: np.ndarray, confidence_threshold: float = 0.5) -> Tuple[Instances, np.ndarray]:
    """Run ``predictor`` on one image and draw the detections above the threshold.

    Args:
        predictor: a :class:`LazyPredictor`, or anything with ``input_format``, ``class_names``
            and a ``__call__`` that returns ``{"instances": Instances}`` as Detectron2's
            ``DefaultPredictor`` does.
        image: HxWx3 uint8 in ``predictor.input_format``.

    Returns:
        (kept Instances, RGB drawing)
    """
    instances = filter_instances(predictor(image)["instances"], confidence_threshold)
    image_rgb = image[:, :, ::-1] if predictor.input_format == "BGR" else image
    return instances, draw_instances(np.ascontiguousarray(image_rgb), instances, predictor.class_names)


def run_on_video(predictor, capture, confidence_threshold: float = 0.5) -> Iterator[Tuple[Instances, np.ndarray]]:
    """Frames of an opened ``cv2.VideoCapture``, one at a time, with their detections.

    Frames are BGR (OpenCV); the predictor is called with the channel order it expects.

    Yields:
        (kept Instances, BGR drawing of the frame)
    """
    while capture.isOpened():
        ok, frame_bgr = capture.read()
        if not ok:
            break
        frame = frame_bgr if predictor.input_format == "BGR" else np.ascontiguousarray(frame_bgr[:, :, ::-1])
        instances, drawing_rgb = run_on_image(predictor, frame, confidence_threshold)
        yield instances, np.ascontiguousarray(drawing_rgb[:, :, ::-1])
