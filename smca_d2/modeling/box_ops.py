"""Box conversions and (generalized) IoU for DETR-style set prediction.

All IoU functions take boxes in ``(x0, y0, x1, y1)`` format. They are safe for degenerate boxes:
areas of unions and enclosing boxes are clamped with a small ``eps`` so that zero-area boxes
give finite values (and finite gradients) instead of NaN.
"""
from typing import Tuple

import torch
from torch import Tensor

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_area",
    "box_iou",
    "generalized_box_iou",
    "elementwise_generalized_box_iou",
]

_EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Convert ``(cx, cy, w, h)`` boxes to ``(x0, y0, x1, y1)``.

    Args:
        boxes: [..., 4] boxes as centers and sizes.

    Returns:
        Tensor: [..., 4] boxes as corners.
    """
    cx, cy, w, h = boxes.unbind(-1)
    half_w, half_h = 0.5 * w, 0.5 * h
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Convert ``(x0, y0, x1, y1)`` boxes to ``(cx, cy, w, h)``.

    Args:
        boxes: [..., 4] boxes as corners.

    Returns:
        Tensor: [..., 4] boxes as centers and sizes.
    """
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


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


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU of matched pairs ``(boxes1[i], boxes2[i])``.

    Equal to ``generalized_box_iou(boxes1, boxes2).diag()`` without building the [N, N] matrix.

    Args:
        boxes1: [N, 4] boxes.
        boxes2: [N, 4] boxes.

    Returns:
        Tensor: [N] GIoU values in ``[-1, 1]``.
    """
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"elementwise_generalized_box_iou needs boxes of equal shape, got "
            f"{tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    inter_wh = (
        torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])
    ).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = (area1 + area2 - inter).clamp(min=_EPS)
    encl_wh = (
        torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])
    ).clamp(min=0)
    enclosing = (encl_wh[:, 0] * encl_wh[:, 1]).clamp(min=_EPS)
    return inter / union - (enclosing - union) / enclosing
