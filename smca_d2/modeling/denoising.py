"""Denoising queries for training SMCA's decoder (DN-DETR, https://arxiv.org/abs/2203.01305).

In training, groups of extra decoder queries are made from the ground truth: each is a target's
box with noise and its label, flipped to another class with some probability. They go through
the same decoder layers and heads as the object queries, and the losses compare each with the
target it was made from, without matching. Early in training the Hungarian matching of the object
queries changes from step to step; the denoising queries give the decoder and the backbone a
target that does not.

In SMCA a denoising query's Gaussian center is its noised box center (an object query's is
predicted by the first decoder layer's center head); its content (the decoder's initial ``tgt``,
zero for object queries) is the embedding of its noised label, its position embedding an MLP of
the sine embedding of its noised box. The object queries never attend to denoising queries and the
groups do not attend to each other, so the object queries are trained as they run at inference,
where there are no denoising queries and the model is the plain SMCA-DETR.
"""

import math
from typing import Dict, List, NamedTuple

import torch
from torch import Tensor, nn

from .decoder import MLP

__all__ = ["DenoisingQueries", "DenoisingBatch", "box_sine_embedding"]


def box_sine_embedding(boxes: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sines and cosines of each coordinate of normalized boxes at ``num_feats // 2``
    frequencies (DETR's sine position encoding, one coordinate at a time).

    Args:
        boxes: [..., 4] normalized boxes.
        num_feats: features per coordinate (even).

    Returns:
        Tensor: [..., 4 * num_feats].
    """
    half = num_feats // 2
    freqs = temperature ** (torch.arange(half, dtype=torch.float32, device=boxes.device) / half)
    angles = boxes.float()[..., None] * (2 * math.pi) / freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class DenoisingBatch(NamedTuple):
    """The denoising queries of one batch, ``D = num_groups * M`` per image (``M``: the most
    targets of an image in the batch; the images with fewer have padding queries).

    Attributes:
        content: [B, D, C] initial decoder content of the queries.
        pos: [B, D, C] their position embeddings.
        ref_logit: [B, D, 2] their Gaussian centers (noised box centers), as logits.
        self_attn_mask: bool [B, Q + D, Q + D], True where a query may not attend to a key; the
            ``Q`` object queries come first.
        labels: [B, D] the targets' classes (without noise).
        boxes: [B, D, 4] the targets' normalized cxcywh boxes (without noise).
        valid: bool [B, D], False for padding queries (no target, no loss, attended by none).
        num_groups: the number of groups.
    """

    content: Tensor
    pos: Tensor
    ref_logit: Tensor
    self_attn_mask: Tensor
    labels: Tensor
    boxes: Tensor
    valid: Tensor
    num_groups: int


class DenoisingQueries(nn.Module):
    """Makes the denoising queries of a training batch (see the module's docstring).

    Args:
        num_classes: the model's number of classes.
        d_model: the decoder's width (a multiple of 8).
        num_groups: groups of noised copies of the targets per batch.
        box_noise: the noise scale: a box's center moves by up to ``box_noise / 2`` of its width
            and height, which are scaled by a factor in ``[1 - box_noise, 1 + box_noise]``.
        label_noise: probability of a query's label being replaced by a random class.
    """

    def __init__(self, *, num_classes: int, d_model: int, num_groups: int = 2, box_noise=0.4, label_noise=0.2):
        super().__init__()
        if num_groups < 1:
            raise ValueError(f"num_groups must be at least 1, got {num_groups}")
        if d_model % 8:
            raise ValueError(f"d_model must be a multiple of 8 for the box sine embedding, got {d_model}")
        if not 0 <= box_noise < 1 or not 0 <= label_noise <= 1:
            raise ValueError(f"box_noise must be in [0, 1) and label_noise in [0, 1], got {box_noise}, {label_noise}")
        self.num_classes = num_classes
        self.d_model = d_model
        self.num_groups = num_groups
        self.box_noise = float(box_noise)
        self.label_noise = float(label_noise)
        self.label_embed = nn.Embedding(num_classes, d_model)
        self.box_embed = MLP(d_model, d_model, d_model, 2)

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, box_noise={self.box_noise}, label_noise={self.label_noise}"

    def _padded_targets(self, targets: List[Dict[str, Tensor]], per_image: int, device):
        b = len(targets)
        labels = torch.zeros(b, per_image, dtype=torch.int64, device=device)
        boxes = torch.full((b, per_image, 4), 0.5, device=device)
        valid = torch.zeros(b, per_image, dtype=torch.bool, device=device)
        for i, t in enumerate(targets):
            n = len(t["labels"])
            labels[i, :n] = t["labels"]
            boxes[i, :n] = t["boxes"].float()
            valid[i, :n] = True
        return labels, boxes, valid

    def _noised(self, labels: Tensor, boxes: Tensor):
        flip = torch.rand(labels.shape, device=labels.device) < self.label_noise
        noised_labels = torch.where(flip, torch.randint_like(labels, self.num_classes), labels)
        noise = torch.rand(boxes.shape, device=boxes.device) * 2 - 1
        centers = boxes[..., :2] + noise[..., :2] * boxes[..., 2:] * (self.box_noise / 2)
        sizes = boxes[..., 2:] * (1 + noise[..., 2:] * self.box_noise)
        noised_boxes = torch.cat([centers.clamp(0.0, 1.0), sizes.clamp(1e-3, 1.0)], dim=-1)
        return noised_labels, noised_boxes

    def _attention_mask(self, num_queries: int, per_image: int, valid: Tensor) -> Tensor:
        g, q = self.num_groups, num_queries
        total = q + g * per_image
        mask = torch.zeros(total, total, dtype=torch.bool, device=valid.device)
        mask[:q, q:] = True  # the object queries see no denoising query
        for group in range(g):
            rows = slice(q + group * per_image, q + (group + 1) * per_image)
            mask[rows, q:] = True  # nor do the groups see each other ...
            mask[rows, rows] = False  # ... only their own group (and the object queries)
        mask = mask.expand(len(valid), -1, -1).clone()
        mask[:, :, q:] |= ~valid[:, None, :]  # padding queries are attended by none ...
        own = torch.arange(q, total, device=valid.device)
        mask[:, own, own] = False  # ... but themselves, so that no row is all masked
        return mask

    def forward(self, targets: List[Dict[str, Tensor]], num_queries: int) -> DenoisingBatch:
        """
        Args:
            targets: per image ``"labels"`` [N_i] and normalized cxcywh ``"boxes"`` [N_i, 4].
            num_queries: the model's number of object queries.

        Returns:
            DenoisingBatch; with ``D = 0`` when no image has a target, so that the embeddings
            still take part in the backward pass (as DDP needs of every parameter).
        """
        per_image = max((len(t["labels"]) for t in targets), default=0)
        device = self.label_embed.weight.device
        labels, boxes, valid = self._padded_targets(targets, per_image, device)
        labels = labels.repeat(1, self.num_groups)
        boxes = boxes.repeat(1, self.num_groups, 1)
        valid = valid.repeat(1, self.num_groups)
        noised_labels, noised_boxes = self._noised(labels, boxes)
        content = self.label_embed(noised_labels)
        pos = self.box_embed(box_sine_embedding(noised_boxes, self.d_model // 4))
        centers = noised_boxes[..., :2].clamp(1e-4, 1 - 1e-4)
        ref_logit = torch.log(centers / (1 - centers))
        mask = self._attention_mask(num_queries, per_image, valid)
        return DenoisingBatch(content, pos, ref_logit, mask, labels, boxes, valid, self.num_groups)
