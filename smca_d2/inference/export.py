"""Export of SMCA-DETR: ``torch.export`` (works) and ONNX (needs the ``onnx`` package).

:class:`SMCAExportWrapper` turns an ``SMCADETR`` into a module of plain tensors for one image of
a fixed size: ``image`` float [3, H, W] (0..255, in the model's ``input_format``) ->
``(boxes [K, 4] XYXY pixels, scores [K], classes [K])`` with ``K = min(test_topk, Q * C)``,
sorted by decreasing score. :func:`export_program` exports it with ``torch.export.export``;
the program reproduces the eager model's detections (tested).

What had to be worked around, and what is blocked (torch 2.14, detectron2 0.6, CPU):

* ``ImageList.from_tensors`` computes the padded size with ``torch.stack(sizes).max()``, a
  data-dependent value under ``torch.export`` ("Could not guard on data-dependent expression");
  the wrapper builds the ``ImageList`` directly (one image, padding to ``size_divisibility``
  computed from the static input shape).
* ``detector_postprocess`` drops boxes that are empty after clipping: a data-dependent output
  size. The wrapper clips the boxes but keeps all ``K`` of them; the eager model's detections are
  the wrapper's minus those empty boxes (none, in practice).
* The program is specialised to the example's ``H x W``: the feature-level shapes, padding masks
  and Gaussian grids are Python values during tracing. Export once per input size (the test
  resize makes sizes vary; pad or resize to one size for deployment).
* ONNX: ``torch.onnx.export`` needs the ``onnx`` package (legacy exporter: ``OnnxExporterError:
  Module onnx is not installed!``) and, for the default dynamo exporter, ``onnxscript`` too. Neither
  is installed in this project's environment (nor ``onnxruntime`` to run a result), so
  :func:`export_onnx` raises :class:`ExportUnavailable` with that reason; install ``onnx`` and
  ``onnxscript`` to use it. It has not been run here.

Usage::

    program = export_program(model, (800, 1066))
    boxes, scores, classes = program.module()(image_chw_float)
    torch.export.save(program, "smca.pt2")
"""

import importlib.util
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.structures import ImageList

__all__ = ["ExportUnavailable", "SMCAExportWrapper", "export_onnx", "export_program", "onnx_unavailable_reason"]


class ExportUnavailable(RuntimeError):
    """An export path cannot run in this environment (the message says why)."""


class SMCAExportWrapper(nn.Module):
    """``SMCADETR`` as ``image [3, H, W] -> (boxes, scores, classes)`` for one fixed-size image.

    Pre- and post-processing are the model's own (normalization, ``forward_outputs``,
    ``inference``); boxes are clipped to the image and all ``K`` detections are returned.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        height, width = int(image.shape[-2]), int(image.shape[-1])
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


def export_program(
    model: nn.Module, image_size: Tuple[int, int], example: Optional[torch.Tensor] = None
) -> "torch.export.ExportedProgram":
    """``torch.export.export`` of :class:`SMCAExportWrapper` for ``image_size`` inputs.

    Args:
        model: an ``SMCADETR``; it is put in eval mode.
        image_size: (H, W) of the images the program will take.
        example: an example image [3, H, W] (default: random values in 0..255).
    """
    model.eval()
    h, w = image_size
    if example is None:
        example = torch.rand(3, h, w, device=model.device) * 255
    if tuple(example.shape) != (3, h, w):
        raise ValueError(f"example has shape {tuple(example.shape)}, expected (3, {h}, {w})")
    with torch.no_grad():
        return torch.export.export(SMCAExportWrapper(model), (example,), strict=False)


def onnx_unavailable_reason(dynamo: bool = True) -> Optional[str]:
    """Why :func:`export_onnx` cannot run here (missing packages), or None if it can."""
    needed = ("onnx", "onnxscript") if dynamo else ("onnx",)
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (
        f"torch.onnx.export ({'dynamo' if dynamo else 'legacy TorchScript'} exporter) needs the "
        f"package(s) {', '.join(missing)}, which are not installed in this environment"
    )


def export_onnx(
    model: nn.Module,
    image_size: Tuple[int, int],
    path: str,
    *,
    dynamo: Optional[bool] = None,
    opset_version: int = 18,
) -> str:
    """Write an ONNX file of :class:`SMCAExportWrapper` (inputs ``image``; outputs ``boxes``,
    ``scores``, ``classes``) and check it with ``onnx.checker``.

    Args:
        dynamo: exporter to use; None: the dynamo exporter if ``onnxscript`` is installed, else
            the legacy one.

    Raises:
        ExportUnavailable: the required packages are not installed.
    """
    if dynamo is None:
        dynamo = onnx_unavailable_reason(dynamo=True) is None
    reason = onnx_unavailable_reason(dynamo)
    if reason is not None:
        raise ExportUnavailable(reason)
    import onnx

    model.eval()
    h, w = image_size
    example = torch.rand(3, h, w, device=model.device) * 255
    with torch.no_grad():
        torch.onnx.export(
            SMCAExportWrapper(model),
            (example,),
            path,
            input_names=["image"],
            output_names=["boxes", "scores", "classes"],
            opset_version=opset_version,
            dynamo=dynamo,
        )
    onnx.checker.check_model(onnx.load(path))
    return path
