"""(Generalized) IoU of ``(x0, y0, x1, y1)`` boxes, for the matcher and the GIoU loss.

Box conversions are ``torchvision.ops.box_convert``. The IoU functions stay here, because
torchvision's differ where it matters:

* ``torchvision.ops.box_iou`` / ``generalized_box_iou`` divide by unclamped areas: two zero-area
  boxes (a prediction whose size underflowed, a degenerate target) give NaN, and a NaN cost
  matrix is infeasible for ``scipy.optimize.linear_sum_assignment``;
* ``torchvision.ops.generalized_box_iou_loss`` adds ``eps`` to every denominator, which biases
  the GIoU of small boxes by about ``eps / area`` (for a 16 px object in an 800x1066 image,
  normalized area 3e-4, by 3e-4 relative), where the official code (DETR's box ops) divides
  exactly.

Here the areas of unions and enclosing boxes are clamped from below with a small ``eps``: exact
(the official values) for every box with an area above ``eps``, finite values and gradients for
degenerate ones.
"""

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["box_area", "box_iou", "elementwise_box_iou", "elementwise_generalized_box_iou", "generalized_box_iou"]

_EPS = 1e-7


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``(x0, y0, x1, y1)`` boxes.

    Args:
        boxes: [..., 4] boxes as corners.

    Returns:
        Tensor: [...] areas. Boxes with ``x1 < x0`` or ``y1 < y0`` have area 0.
    """
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tuple[Tensor, Tensor]:
    """Pairwise IoU of two sets of ``(x0, y0, x1, y1)`` boxes.

    Args:
        boxes1: [N, 4] boxes.
        boxes2: [M, 4] boxes.

    Returns:
        tuple[Tensor, Tensor]: ``iou`` [N, M] and ``union`` [N, M]. ``union`` is clamped to at
        least ``eps``, so two zero-area boxes have IoU 0 rather than NaN.
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # [N, M, 2]
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = (area1[:, None] + area2[None, :] - inter).clamp(min=_EPS)
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (https://giou.stanford.edu/) of ``(x0, y0, x1, y1)`` boxes.

    Args:
        boxes1: [N, 4] boxes.
        boxes2: [M, 4] boxes.

    Returns:
        Tensor: [N, M] GIoU values in ``[-1, 1]``.
    """
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = (wh[..., 0] * wh[..., 1]).clamp(min=_EPS)
    return iou - (enclosing - union) / enclosing


def _check_pairs(name: str, boxes1: Tensor, boxes2: Tensor) -> None:
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"{name} needs boxes of equal shape, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}")


def _elementwise_iou_union(boxes1: Tensor, boxes2: Tensor) -> Tuple[Tensor, Tensor]:
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    inter_wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = (area1 + area2 - inter).clamp(min=_EPS)
    return inter / union, union


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of matched pairs ``(boxes1[i], boxes2[i])``: ``box_iou(boxes1, boxes2)[0].diag()``
    without building the [N, N] matrix.

    Args:
        boxes1: [N, 4] boxes.
        boxes2: [N, 4] boxes.

    Returns:
        Tensor: [N] IoU values in ``[0, 1]``.
    """
    _check_pairs("elementwise_box_iou", boxes1, boxes2)
    return _elementwise_iou_union(boxes1, boxes2)[0]


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU of matched pairs ``(boxes1[i], boxes2[i])``.

    Equal to ``generalized_box_iou(boxes1, boxes2).diag()`` without building the [N, N] matrix.

    Args:
        boxes1: [N, 4] boxes.
        boxes2: [N, 4] boxes.

    Returns:
        Tensor: [N] GIoU values in ``[-1, 1]``.
    """
    _check_pairs("elementwise_generalized_box_iou", boxes1, boxes2)
    iou, union = _elementwise_iou_union(boxes1, boxes2)
    encl_wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    enclosing = (encl_wh[:, 0] * encl_wh[:, 1]).clamp(min=_EPS)
    return iou - (enclosing - union) / enclosing
