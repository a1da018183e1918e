"""Export of SMCA-DETR models (single-scale, multi-scale, the DETR baseline) for deployment:
``torch.export`` programs and ONNX files, for one image size or for any.

:class:`SMCAExportWrapper` turns an ``SMCADETR`` into a module of plain tensors for one image:
``image`` float [3, H, W] (0..255, in the model's ``input_format``, not resized: boxes come back
in its pixels) -> ``(boxes [K, 4] XYXY pixels, scores [K], classes [K] int64)`` with
``K = min(test_topk, Q * C)``, sorted by decreasing score. The normalization, the padding to
``size_divisibility``, the padding mask, the position encodings, the Gaussian grids and the
top-k are all in the graph, so with ``dynamic=True`` one exported file takes images of any height
and width (between :data:`MIN_SIZE` and :data:`MAX_SIZE`).

Two differences from the eager ``model([{"image": ...}])``, both by design:

* ``detector_postprocess`` drops boxes that are empty after clipping, a data-dependent output
  size; the wrapper clips the boxes but keeps all ``K`` of them. The eager detections are the
  wrapper's minus its empty boxes.
* A dynamic graph always carries the padding mask (whether the image needs padding to
  ``size_divisibility`` depends on its size); for an image that needs none the mask is all False,
  which gives the unmasked result up to float rounding.

Usage::

    program = export_program(model, dynamic=True)
    boxes, scores, classes = program.module()(image_chw_float)
    export_onnx(model, "smca.onnx")  # dynamic height and width; run it with onnxruntime
"""

import importlib.util
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.structures import ImageList

__all__ = [
    "MAX_SIZE",
    "MIN_SIZE",
    "OUTPUT_NAMES",
    "ExportUnavailable",
    "SMCAExportWrapper",
    "dynamic_size_ok",
    "export_onnx",
    "export_program",
    "onnx_unavailable_reason",
]

#: Bounds of the image height and width a dynamic export accepts.
MIN_SIZE, MAX_SIZE = 32, 8192
#: Input and output names of the exported graphs.
INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "scores", "classes")
#: Example size traced when none is given (any size works; not a multiple of 32 on purpose, so
#: the traced example exercises the padding).
EXAMPLE_SIZE = (480, 600)


class ExportUnavailable(RuntimeError):
    """An export path cannot run in this environment (the message says why)."""


class SMCAExportWrapper(nn.Module):
    """``SMCADETR`` as ``image [3, H, W] -> (boxes, scores, classes)`` for one image.

    Pre- and post-processing are the model's own (normalization, ``forward_outputs``,
    ``inference``); boxes are clipped to the image and all ``K`` detections are returned. The
    image size is read from the input's shape without turning it into Python numbers, so the
    traced graph stays symbolic in H and W.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.training = model.training

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        height, width = image.shape[-2:]
        x = (image.to(model.pixel_mean.dtype) - model.pixel_mean) / model.pixel_std
        div = int(getattr(model, "size_divisibility", 0) or 0)
        if div > 1:
            x = F.pad(x, (0, -width % div, 0, -height % div))
        images = ImageList(x[None], [(height, width)])
        outputs = model.forward_outputs(images)
        result = model.inference(outputs["pred_logits"], outputs["pred_boxes"], images.image_sizes)[0]
        boxes = result.pred_boxes.tensor
        limits = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
        boxes = torch.minimum(boxes.clamp(min=0), limits)
        return boxes, result.scores, result.pred_classes


def _trace_inputs(model: nn.Module, image_size, example, dynamic):
    """The example image to trace (checked) and the ``dynamic_shapes`` of an export: dynamic
    height and width unless ``image_size`` is given (or ``dynamic`` says otherwise)."""
    if dynamic is None:
        dynamic = image_size is None
    h, w = image_size if image_size is not None else EXAMPLE_SIZE
    if example is None:
        example = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255
    if example.dim() != 3 or example.shape[0] != 3:
        raise ValueError(f"example has shape {tuple(example.shape)}, expected (3, H, W)")
    if image_size is not None and tuple(example.shape[1:]) != (h, w):
        raise ValueError(f"example has shape {tuple(example.shape)}, expected (3, {h}, {w})")
    if not dynamic_size_ok(*example.shape[1:]):
        raise ValueError(f"image size {tuple(example.shape[1:])}: height and width must be in [{MIN_SIZE}, {MAX_SIZE}]")
    shapes = None
    if dynamic:
        height = torch.export.Dim("height", min=MIN_SIZE, max=MAX_SIZE)
        width = torch.export.Dim("width", min=MIN_SIZE, max=MAX_SIZE)
        shapes = {INPUT_NAME: {1: height, 2: width}}
    return example.to(model.pixel_mean.device), shapes


def dynamic_size_ok(height: int, width: int) -> bool:
    """Whether a dynamic export takes an image of this size."""
    return MIN_SIZE <= int(height) <= MAX_SIZE and MIN_SIZE <= int(width) <= MAX_SIZE


def export_program(
    model: nn.Module,
    image_size: Optional[Tuple[int, int]] = None,
    example: Optional[torch.Tensor] = None,
    *,
    dynamic: Optional[bool] = None,
) -> "torch.export.ExportedProgram":
    """``torch.export.export`` of :class:`SMCAExportWrapper`.

    Args:
        model: an ``SMCADETR``; it is put in eval mode.
        image_size: (H, W) of the images a fixed-size program takes; None: a dynamic program.
        example: an example image [3, H, W] to trace (default: random values in 0..255).
        dynamic: one program for any image size (default: when ``image_size`` is None).
    """
    model.eval()
    example, dynamic_shapes = _trace_inputs(model, image_size, example, dynamic)
    with torch.no_grad():
        return torch.export.export(SMCAExportWrapper(model), (example,), dynamic_shapes=dynamic_shapes, strict=False)


def onnx_unavailable_reason() -> Optional[str]:
    """Why :func:`export_onnx` cannot run here (missing packages), or None if it can."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (
        f"ONNX export (torch.onnx.export, dynamo exporter) needs the package(s) {', '.join(missing)}, "
        "which are not installed in this environment: pip install 'smca-d2[export]'"
    )


def export_onnx(
    model: nn.Module,
    path: str,
    image_size: Optional[Tuple[int, int]] = None,
    *,
    dynamic: Optional[bool] = None,
    opset_version: int = 18,
    example: Optional[torch.Tensor] = None,
    optimize: bool = True,
) -> str:
    """Write an ONNX file of :class:`SMCAExportWrapper` (input ``image`` float [3, H, W];
    outputs ``boxes``, ``scores``, ``classes``) and check it with ``onnx.checker``.

    Args:
        path: the ``.onnx`` file to write.
        image_size: (H, W) of a fixed-size graph; None: dynamic height and width.
        dynamic: as for :func:`export_program` (default: when ``image_size`` is None).
        optimize: run the exporter's graph optimizer (constant folding, common
            subexpressions); ONNX Runtime optimizes the graph again when it loads it.

    Raises:
        ExportUnavailable: ``onnx`` / ``onnxscript`` are not installed.
    """
    reason = onnx_unavailable_reason()
    if reason is not None:
        raise ExportUnavailable(reason)
    import onnx

    model.eval()
    example, dynamic_shapes = _trace_inputs(model, image_size, example, dynamic)
    # The module, not an ExportedProgram of it: the exporter's own trace decomposes the graph
    # for ONNX; re-decomposing a program from export_program fails on a strided view.
    with torch.no_grad():
        torch.onnx.export(
            SMCAExportWrapper(model),
            (example,),
            path,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=dynamic_shapes,
            opset_version=opset_version,
            dynamo=True,
            optimize=optimize,
            external_data=False,  # one self-contained file (the models here are far below 2 GB)
            verbose=False,
        )
    onnx.checker.check_model(onnx.load(path))
    return path
