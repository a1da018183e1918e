"""Set-prediction losses for SMCA-DETR."""

from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import box_convert
from torchvision.ops import sigmoid_focal_loss as _torchvision_focal_loss

from .box_ops import elementwise_box_iou, elementwise_generalized_box_iou

__all__ = ["sigmoid_focal_loss", "varifocal_loss", "SetCriterion"]

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


def varifocal_loss(
    inputs: Tensor, quality: Tensor, positive: Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Varifocal loss (VarifocalNet, https://arxiv.org/abs/2008.13367, as RT-DETR applies it to
    matched queries) summed over all elements and divided by ``num_boxes``, in float32.

    A positive's target is its quality (the IoU of its box with its target's) instead of 1, and it
    is weighted by that quality; a negative is weighted as in the focal loss, by
    ``(1 - alpha) * p ** gamma``. The weights and targets carry no gradient.

    Args:
        inputs: [...] logits.
        quality: [...] targets in ``[0, 1]``, 0 where ``positive`` is False.
        positive: [...] bool, the matched query-class entries.
        num_boxes: normalizer, the number of target boxes.
        alpha, gamma: as in :func:`sigmoid_focal_loss` (only the negatives' weight uses them).

    Returns:
        Tensor: scalar loss, float32.
    """
    inputs = inputs.float()
    quality = quality.float()
    weight = torch.where(positive, quality, (1 - alpha) * inputs.detach().sigmoid().pow(gamma))
    loss = F.binary_cross_entropy_with_logits(inputs, quality, weight=weight, reduction="sum")
    return loss / num_boxes


_CLASS_LOSSES = ("focal", "varifocal")


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
        class_loss: str = "focal",
    ):
        """
        Args:
            num_classes: number of object classes, without background.
            matcher: module mapping ``(outputs, targets)`` to per-image ``(pred_idx, tgt_idx)``,
                such as :class:`HungarianMatcher`; its ``match_layers(logits, boxes, targets)``,
                where it has one, matches all decoder layers in one call.
            weight_dict: weights of ``"loss_class"``, ``"loss_bbox"`` and ``"loss_giou"``.
                Defaults to ``{"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}``.
            focal_alpha: alpha of the focal loss.
            focal_gamma: gamma of the focal loss.
            class_loss: ``"focal"`` (the paper's: one-hot targets) or ``"varifocal"`` (not in the
                paper: a matched query's target is the IoU of its box with its target's, see
                :func:`varifocal_loss`; then the scores rank the detections by their expected
                IoU, and the class loss sees how well each box fits).
        """
        super().__init__()
        if weight_dict is None:
            weight_dict = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
        if set(weight_dict) != set(_LOSS_NAMES):
            raise ValueError(
                f"SetCriterion weight_dict must have exactly the keys {list(_LOSS_NAMES)}, got {sorted(weight_dict)}."
            )
        if class_loss not in _CLASS_LOSSES:
            raise ValueError(f"SetCriterion class_loss must be one of {list(_CLASS_LOSSES)}, got {class_loss!r}.")
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_loss = class_loss
        self.weight_dict = {k: float(v) for k, v in weight_dict.items()}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, weight_dict={self.weight_dict}, "
            f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}, class_loss={self.class_loss!r}"
        )

    def loss_class(self, logits: Tensor, matched: "_Matched", num_boxes: float, boxes: Tensor) -> Tensor:
        """Class loss of every query: the focal loss against one-hot targets, or the varifocal
        loss against the matched boxes' IoUs (``class_loss``); unmatched queries are all-zero
        (background).

        Args:
            logits: [L, B, Q, C] class logits of L decoder layers.
            matched: the matched queries and their targets.
            boxes: [L, B, Q, 4] the layers' normalized ``(cx, cy, w, h)`` boxes (the varifocal
                loss's targets; the class loss gives them no gradient).

        Returns:
            Tensor: [L] loss of each layer.
        """
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"SetCriterion expects {self.num_classes} class logits, got {logits.shape[-1]}.")
        entries = (matched.layer, matched.image, matched.query, matched.labels)
        target = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        # One layer at a time: the elementwise kernels then see the tensors of one layer alone and
        # round exactly as they do without the other layers (the vectorized loops' remainders
        # depend on the number of elements).
        if self.class_loss == "focal":
            target[entries] = 1.0
            losses = [
                sigmoid_focal_loss(
                    layer_logits, layer_target, num_boxes, alpha=self.focal_alpha, gamma=self.focal_gamma
                )
                for layer_logits, layer_target in zip(logits, target)
            ]
        else:
            with torch.no_grad():
                src = box_convert(boxes[matched.layer, matched.image, matched.query].float(), "cxcywh", "xyxy")
                target[entries] = elementwise_box_iou(src, box_convert(matched.boxes.float(), "cxcywh", "xyxy"))
            positive = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            positive[entries] = True
            losses = [
                varifocal_loss(
                    layer_logits, layer_target, layer_positive, num_boxes, self.focal_alpha, self.focal_gamma
                )
                for layer_logits, layer_target, layer_positive in zip(logits, target, positive)
            ]
        return torch.stack(losses)

    def loss_boxes(self, boxes: Tensor, matched: "_Matched", num_boxes: float) -> Tensor:
        """L1 and ``1 - GIoU`` losses of the matched boxes, summed and divided by ``num_boxes``.

        Args:
            boxes: [L, B, Q, 4] normalized ``(cx, cy, w, h)`` boxes of L decoder layers.
            matched: the matched queries and their targets.

        Returns:
            Tensor: [L, 2] L1 and GIoU loss of each layer. Without any matched box they are
            zero, but still depend on ``boxes``, so that DDP sees every parameter take part in
            the backward pass.
        """
        src = boxes[matched.layer, matched.image, matched.query].float()
        tgt = matched.boxes.float()
        l1 = (src - tgt).abs()
        giou = elementwise_generalized_box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"))
        # The matches are in layer order: each layer's are one run of rows, summed on its own.
        per_layer = [
            torch.stack([layer_l1.sum(), (1 - layer_giou).sum()])
            for layer_l1, layer_giou in zip(l1.split(matched.per_layer), giou.split(matched.per_layer))
        ]
        return torch.stack(per_layer) / num_boxes

    def _match_layers(self, logits: Tensor, boxes: Tensor, targets: List[Dict[str, Tensor]]):
        """The matcher's ``match_layers``, or its forward once per layer for a matcher without one."""
        match_layers = getattr(self.matcher, "match_layers", None)
        if match_layers is not None:
            return match_layers(logits, boxes, targets)
        return [self.matcher({"pred_logits": lo, "pred_boxes": bo}, targets) for lo, bo in zip(logits, boxes)]

    def _num_boxes(self, targets: List[Dict[str, Tensor]], device: torch.device) -> float:
        """Average number of target boxes per process, at least 1."""
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], dtype=torch.float32, device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            world_size = dist.get_world_size()
        return torch.clamp(num_boxes / world_size, min=1).item()

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
        layers = [*(outputs.get("aux_outputs") or []), outputs]
        # All decoder layers together, as [L, B, Q, ...] tensors: the matches handed to the losses
        # in one set of index tensors, the box losses of all layers computed at once; the same
        # values, to the bit, as one layer at a time.
        logits = torch.stack([layer["pred_logits"] for layer in layers])
        boxes = torch.stack([layer["pred_boxes"] for layer in layers])
        num_boxes = self._num_boxes(targets, logits.device)
        matched = _Matched.gather(self._match_layers(logits, boxes, targets), targets, logits.device)
        class_loss = self.loss_class(logits, matched, num_boxes, boxes)
        losses = self._named(torch.cat([class_loss[:, None], self.loss_boxes(boxes, matched, num_boxes)], dim=1))
        if outputs.get("denoising") is not None:
            losses.update(self.denoising_losses(outputs["denoising"], num_boxes))
        return losses

    def denoising_losses(self, dn: Dict, num_boxes: float) -> Dict[str, Tensor]:
        """The losses of denoising queries (see :mod:`smca_d2.modeling.denoising`): each query's
        class and box against the target it was made from, with the weights of the matched
        queries' losses, divided by ``num_boxes`` times the number of groups (so that each group
        weighs as much as the object queries).

        Args:
            dn: the ``"denoising"`` outputs of :meth:`SMCADETR.forward_outputs`: ``pred_logits``
                [L, B, D, C], ``pred_boxes`` [L, B, D, 4], the targets ``labels`` [B, D],
                ``boxes`` [B, D, 4], ``valid`` [B, D] and ``num_groups``.

        Returns:
            dict[str, Tensor]: ``loss_class_dn``, ``loss_bbox_dn``, ``loss_giou_dn`` of the last
            layer, and with the suffix ``_i`` those of the earlier layer ``i``.
        """
        # The valid queries of all images as one image of N queries, each matched to its own
        # target in every layer: then the matched queries' losses apply as they are.
        image, query = dn["valid"].nonzero(as_tuple=True)
        logits = dn["pred_logits"][:, image, query][:, None]  # [L, 1, N, C]
        boxes = dn["pred_boxes"][:, image, query][:, None]  # [L, 1, N, 4]
        num_layers, n = logits.shape[0], len(image)
        device = logits.device
        matched = _Matched(
            per_layer=[n] * num_layers,
            layer=torch.arange(num_layers, device=device).repeat_interleave(n),
            image=torch.zeros(num_layers * n, dtype=torch.int64, device=device),
            query=torch.arange(n, device=device).repeat(num_layers),
            labels=dn["labels"][image, query].repeat(num_layers),
            boxes=dn["boxes"][image, query].repeat(num_layers, 1),
        )
        normalizer = num_boxes * dn["num_groups"]
        class_loss = self.loss_class(logits, matched, normalizer, boxes)
        return self._named(torch.cat([class_loss[:, None], self.loss_boxes(boxes, matched, normalizer)], dim=1), "_dn")

    def _named(self, losses: Tensor, tag: str = "") -> Dict[str, Tensor]:
        """[L, 3] losses of L decoder layers (class, L1, GIoU), before their weights, as the weighted losses
        named ``loss_class{tag}`` ... for the last layer, then ``loss_class{tag}_{i}`` ... for the
        earlier layers in order (as DETR logs them)."""
        weighted = losses * losses.new_tensor([self.weight_dict[name] for name in _LOSS_NAMES])
        rows = weighted.unbind(0)
        suffixes = [tag] + [f"{tag}_{i}" for i in range(len(rows) - 1)]
        named = {}
        for suffix, row in zip(suffixes, rows[-1:] + rows[:-1]):
            named.update({name + suffix: value for name, value in zip(_LOSS_NAMES, row.unbind(0))})
        return named


class _Matched(NamedTuple):
    """The matched queries of all decoder layers, one entry per match, in layer order: the query
    ``(layer, image, query)`` is matched to a target with class ``labels`` and box ``boxes``;
    ``per_layer`` counts the matches of each layer."""

    per_layer: List[int]
    layer: Tensor
    image: Tensor
    query: Tensor
    labels: Tensor
    boxes: Tensor

    @classmethod
    def gather(cls, matches: List[List[Tuple[Tensor, Tensor]]], targets: List[Dict[str, Tensor]], device):
        """From the matcher's per-layer, per-image ``(pred_idx, tgt_idx)`` pairs, with index
        arrays built on the host and the targets gathered by one indexing of the batch's."""
        sizes = [len(t["labels"]) for t in targets]
        offsets = np.cumsum([0] + sizes[:-1])
        pairs = [
            (layer, image, src, tgt)
            for layer, per_image in enumerate(matches)
            for image, (src, tgt) in enumerate(per_image)
        ]
        counts = [len(src) for _, _, src, _ in pairs]
        layer_idx = np.repeat([p[0] for p in pairs], counts)
        image_idx = np.repeat([p[1] for p in pairs], counts)
        query_idx = np.concatenate([src.cpu().numpy() for _, _, src, _ in pairs])
        target_idx = np.concatenate([tgt.cpu().numpy() + offsets[image] for _, image, _, tgt in pairs])
        index = torch.from_numpy(np.stack([layer_idx, image_idx, query_idx, target_idx]).astype(np.int64)).to(device)
        labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.int64)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device)
        per_layer = [sum(len(src) for src, _ in per_image) for per_image in matches]
        return cls(per_layer, index[0], index[1], index[2], labels[index[3]], boxes[index[3]])
