"""Bipartite (Hungarian) matching between predictions and ground truth for SMCA-DETR."""

from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert

from .box_ops import generalized_box_iou

__all__ = ["HungarianMatcher"]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets that minimizes a weighted matching cost.

    The cost of assigning query ``q`` to target ``t`` is::

        cost_bbox * L1(box_q, box_t) + cost_class * focal(logits_q, label_t) - cost_giou * GIoU

    Each image is matched on its own; when an image has more targets than queries, only as many
    targets as there are queries are matched.
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        """
        Args:
            cost_class: weight of the focal classification cost.
            cost_bbox: weight of the L1 cost between normalized ``(cx, cy, w, h)`` boxes.
            cost_giou: weight of the negative generalized IoU.
            focal_alpha: alpha of the focal cost.
            focal_gamma: gamma of the focal cost.
        """
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher needs at least one non-zero cost weight.")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, focal_alpha={self.focal_alpha}, "
            f"focal_gamma={self.focal_gamma}"
        )

    def _class_cost(self, logits: Tensor) -> Tensor:
        """Focal cost of labelling each query with the class of each target.

        Args:
            logits: [Q, N] sigmoid logit of each query for the class of each target, float32.

        Returns:
            Tensor: [Q, N] cost of assigning target ``n`` to query ``q``.
        """
        prob = logits.sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
        pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
        return pos - neg

    def _cost_matrix(self, logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor):
        """Matching cost for one image.

        Args:
            logits: [Q, C] sigmoid logits.
            boxes: [Q, 4] predicted normalized ``(cx, cy, w, h)`` boxes.
            tgt_labels: [N] int64 class indices.
            tgt_boxes: [N, 4] target normalized ``(cx, cy, w, h)`` boxes.

        Returns:
            Tensor: [Q, N] float32 cost.
        """
        # Half-precision costs lose the resolution needed to rank near-equal candidates.
        logits = logits.float()
        boxes = boxes.float()
        tgt_boxes = tgt_boxes.to(device=boxes.device, dtype=torch.float32)
        tgt_labels = tgt_labels.to(device=logits.device, dtype=torch.int64)

        cost_class = self._class_cost(logits[:, tgt_labels])
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class - self.cost_giou * giou

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: dict with
                * ``"pred_logits"``: [B, Q, C] sigmoid classification logits;
                * ``"pred_boxes"``: [B, Q, 4] normalized ``(cx, cy, w, h)`` boxes.
            targets: B dicts with
                * ``"labels"``: [N_i] int64 class indices in ``[0, C)``;
                * ``"boxes"``: [N_i, 4] normalized ``(cx, cy, w, h)`` boxes.

        Returns:
            list[tuple[Tensor, Tensor]]: for each image, ``(pred_idx, tgt_idx)``, two int64 CPU
            tensors of length ``min(Q, N_i)``: query ``pred_idx[k]`` is matched to target
            ``tgt_idx[k]``.

        Raises:
            ValueError: if the batch sizes disagree or a cost is NaN or infinite.
        """
        (indices,) = self.match_layers(outputs["pred_logits"][None], outputs["pred_boxes"][None], targets)
        return indices

    @torch.no_grad()
    def match_layers(self, logits: Tensor, boxes: Tensor, targets: List[Dict[str, Tensor]]):
        """Match the predictions of several decoder layers to the same targets, each layer and
        image on its own, as :meth:`forward` does for one layer.

        Args:
            logits: [L, B, Q, C] sigmoid classification logits of L decoder layers.
            boxes: [L, B, Q, 4] normalized ``(cx, cy, w, h)`` boxes.
            targets: B dicts as in :meth:`forward`.

        Returns:
            list[list[tuple[Tensor, Tensor]]]: for each layer, what :meth:`forward` returns.
        """
        num_layers, num_images, num_queries = logits.shape[:3]
        if len(targets) != num_images:
            raise ValueError(
                f"HungarianMatcher got {num_images} images of predictions but {len(targets)} target dicts."
            )

        empty = torch.empty(0, dtype=torch.int64)
        sizes = [len(t["labels"]) for t in targets]
        if not sum(sizes):
            return [[(empty, empty) for _ in targets] for _ in range(num_layers)]
        # The costs of every query against every target of the batch in one matrix per layer (a
        # few large operations instead of many small ones per image; the entries are the same),
        # copied to the host once; each image keeps the block of its own targets. Per layer, not
        # all layers in one matrix: the elementwise kernels' rounding depends on the number of
        # elements, and one layer's costs are then exactly those of that layer matched alone.
        tgt_labels = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets])
        batch_cost = torch.stack(
            [
                self._cost_matrix(layer_logits.flatten(0, 1), layer_boxes.flatten(0, 1), tgt_labels, tgt_boxes)
                for layer_logits, layer_boxes in zip(logits, boxes)
            ]
        ).cpu()
        all_finite = bool(torch.isfinite(batch_cost).all())
        blocks = batch_cost.view(num_layers, num_images, num_queries, -1).split(sizes, -1)

        matches = []
        for layer in range(num_layers):
            indices = []
            for i, (size, block) in enumerate(zip(sizes, blocks)):
                if size == 0:
                    indices.append((empty, empty))
                    continue
                cost = block[layer, i]
                if not all_finite and not torch.isfinite(cost).all():
                    raise ValueError(self._describe_non_finite(i, logits[layer, i], boxes[layer, i], targets[i]))
                rows, cols = linear_sum_assignment(cost.numpy())
                indices.append((torch.from_numpy(rows).long(), torch.from_numpy(cols).long()))
            matches.append(indices)
        return matches

    @staticmethod
    def _describe_non_finite(i: int, logits: Tensor, boxes: Tensor, target: Dict[str, Tensor]):
        culprits = [
            name
            for name, value in (
                ("pred_logits", logits),
                ("pred_boxes", boxes),
                ('targets["boxes"]', target["boxes"]),
            )
            if not torch.isfinite(value).all()
        ]
        source = "non-finite values in " + ", ".join(culprits) if culprits else "overflow while computing the costs"
        return (
            f"HungarianMatcher: the matching cost of image {i} contains NaN or inf ({source}). "
            "The model has probably diverged (try a lower learning rate or gradient clipping)."
        )
