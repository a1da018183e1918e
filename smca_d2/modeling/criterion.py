"""Set-prediction losses for SMCA-DETR."""

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert
from torchvision.ops import sigmoid_focal_loss as _torchvision_focal_loss

from .box_ops import elementwise_generalized_box_iou

__all__ = ["sigmoid_focal_loss", "SetCriterion"]

_LOSS_NAMES = ("loss_class", "loss_bbox", "loss_giou")


def sigmoid_focal_loss(
    inputs: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Focal loss (https://arxiv.org/abs/1708.02002, ``torchvision.ops.sigmoid_focal_loss``)
    summed over all elements and divided by ``num_boxes``, in float32.

    Summing over every query and class (rather than averaging over queries) is the "box"
    normalization of the official SMCA code.

    Args:
        inputs: [...] logits.
        targets: [...] binary targets, same shape as ``inputs``.
        num_boxes: normalizer, the number of target boxes.
        alpha: weight of positives, ``1 - alpha`` weights negatives; negative to disable.
        gamma: focusing exponent.

    Returns:
        Tensor: scalar loss, float32.
    """
    inputs = inputs.float()
    loss = _torchvision_focal_loss(inputs, targets.to(inputs.dtype), alpha=alpha, gamma=gamma, reduction="sum")
    return loss / num_boxes


class SetCriterion(nn.Module):
    """Losses of SMCA-DETR: match predictions to targets with a Hungarian matcher, then apply a
    sigmoid focal loss to the classes of all queries and L1 + GIoU losses to the matched boxes.

    The returned losses are already multiplied by their weights; the losses of auxiliary decoder
    layer ``i`` use the same weights and carry the suffix ``_i``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Optional[Dict[str, float]] = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        """
        Args:
            num_classes: number of object classes, without background.
            matcher: module mapping ``(outputs, targets)`` to per-image ``(pred_idx, tgt_idx)``,
                such as :class:`HungarianMatcher`.
            weight_dict: weights of ``"loss_class"``, ``"loss_bbox"`` and ``"loss_giou"``.
                Defaults to ``{"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}``.
            focal_alpha: alpha of the focal loss.
            focal_gamma: gamma of the focal loss.
        """
        super().__init__()
        if weight_dict is None:
            weight_dict = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
        if set(weight_dict) != set(_LOSS_NAMES):
            raise ValueError(
                f"SetCriterion weight_dict must have exactly the keys {list(_LOSS_NAMES)}, got {sorted(weight_dict)}."
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = {k: float(v) for k, v in weight_dict.items()}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, weight_dict={self.weight_dict}, "
            f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}"
        )

    @staticmethod
    def _src_permutation_idx(indices: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
        """(batch index, query index) of every matched query, both [sum_i M_i] int64."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def loss_class(self, outputs, targets, indices, num_boxes) -> Tensor:
        """Sigmoid focal loss against one-hot targets; unmatched queries are all-zero
        (background).

        Args:
            outputs: dict with ``"pred_logits"`` [B, Q, C].

        Returns:
            Tensor: scalar loss.
        """
        logits = outputs["pred_logits"]
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"SetCriterion expects {self.num_classes} class logits, got {logits.shape[-1]}.")
        batch_idx, src_idx = self._src_permutation_idx(indices)
        matched_labels = torch.cat([t["labels"][tgt].to(logits.device).long() for t, (_, tgt) in zip(targets, indices)])
        onehot = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        onehot[batch_idx.to(logits.device), src_idx.to(logits.device), matched_labels] = 1.0
        return sigmoid_focal_loss(logits, onehot, num_boxes, alpha=self.focal_alpha, gamma=self.focal_gamma)

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> Dict[str, Tensor]:
        """L1 and ``1 - GIoU`` losses of the matched boxes, summed and divided by ``num_boxes``.

        Args:
            outputs: dict with ``"pred_boxes"`` [B, Q, 4] normalized ``(cx, cy, w, h)``.

        Returns:
            dict[str, Tensor]: scalar ``"loss_bbox"`` and ``"loss_giou"``.
        """
        pred_boxes = outputs["pred_boxes"]
        batch_idx, src_idx = self._src_permutation_idx(indices)
        if src_idx.numel() == 0:
            # No matched box in the batch: the losses are zero, but must still depend on
            # pred_boxes so that DDP sees every parameter take part in the backward pass.
            zero = pred_boxes.float().sum() * 0.0
            return {"loss_bbox": zero, "loss_giou": zero.clone()}

        src = pred_boxes[batch_idx.to(pred_boxes.device), src_idx.to(pred_boxes.device)].float()
        tgt = torch.cat([t["boxes"][j].to(device=src.device) for t, (_, j) in zip(targets, indices)]).float()
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        giou = elementwise_generalized_box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def _num_boxes(self, targets: List[Dict[str, Tensor]], device: torch.device) -> float:
        """Average number of target boxes per process, at least 1."""
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], dtype=torch.float32, device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            world_size = dist.get_world_size()
        return torch.clamp(num_boxes / world_size, min=1).item()

    def _weighted_losses(self, outputs, targets, num_boxes, suffix: str) -> Dict[str, Tensor]:
        indices = self.matcher(outputs, targets)
        losses = {"loss_class": self.loss_class(outputs, targets, indices, num_boxes)}
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        return {k + suffix: v * self.weight_dict[k] for k, v in losses.items()}

    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """
        Args:
            outputs: dict with
                * ``"pred_logits"``: [B, Q, C] sigmoid classification logits;
                * ``"pred_boxes"``: [B, Q, 4] normalized ``(cx, cy, w, h)`` boxes;
                * ``"aux_outputs"`` (optional): list of dicts with the same two keys, one per
                  intermediate decoder layer.
            targets: B dicts with ``"labels"`` [N_i] int64 in ``[0, C)`` and ``"boxes"``
                [N_i, 4] normalized ``(cx, cy, w, h)``.

        Returns:
            dict[str, Tensor]: weighted scalar losses ``loss_class``, ``loss_bbox``,
            ``loss_giou``, plus ``loss_class_i``, ``loss_bbox_i``, ``loss_giou_i`` for each
            auxiliary output ``i``.
        """
        num_boxes = self._num_boxes(targets, outputs["pred_logits"].device)
        losses = self._weighted_losses(outputs, targets, num_boxes, suffix="")
        for i, aux_outputs in enumerate(outputs.get("aux_outputs") or []):
            losses.update(self._weighted_losses(aux_outputs, targets, num_boxes, suffix=f"_{i}"))
        return losses
