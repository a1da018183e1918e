"""The SMCA-DETR meta-architecture, registered in Detectron2's ``META_ARCH_REGISTRY``."""

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torchvision.ops import box_convert

from detectron2.modeling import META_ARCH_REGISTRY, Backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances

from .decoder import MLP
from .position_encoding import PositionEmbeddingSine


def _known_equal(a, b) -> bool:
    """``a == b`` for sizes: Python ints, symbolic sizes (True only when equal for every input),
    or the tensors ``torch.jit.trace`` turns sizes into (their value in this trace)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return bool(a == b)
    return statically_known_true(a == b)


@META_ARCH_REGISTRY.register()
class SMCADETR(nn.Module):
    """SMCA-DETR: DETR whose decoder co-attention is modulated by per-query Gaussian maps.

    Takes Detectron2's batched inputs (a list of dicts with ``"image"``, CHW, and in training
    ``"instances"``) and returns a dict of losses in training, a list of
    ``{"instances": Instances}`` (``pred_boxes``, ``scores``, ``pred_classes``) in inference.

    Feature levels are the backbone outputs named by ``in_features`` (1x1 conv to ``d_model``),
    followed by ``num_extra_levels`` 3x3 stride-2 convs, the first on the last backbone level.
    One level gives the single-scale model; res4, res5 and one extra level the multi-scale one.

    The padding mask comes from ``ImageList.image_sizes`` in training and inference alike; the
    Gaussian centers are scaled by each image's own unpadded size, so no annotation is needed at
    inference and an image's detections do not depend on the batch it is in. A batch without
    padding (one image, or images of one size, and no ``size_divisibility`` padding) gives the
    transformer no mask at all: the same results, without masking the attention logits.

    The model is written for reading; :mod:`smca_d2.speedups` makes a built one faster
    (train_net.py applies ``train.speedups``).
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        in_features: Sequence[str],
        transformer: nn.Module,
        criterion: nn.Module,
        num_classes: int,
        num_queries: int = 300,
        num_extra_levels: int = 0,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "RGB",
        size_divisibility: int = 0,
        test_topk: int = 100,
        aux_loss: bool = True,
        denoising: Optional[nn.Module] = None,
    ):
        """
        Args:
            backbone: any Detectron2 backbone producing ``in_features``.
            in_features: backbone outputs used as levels, finest first.
            transformer: :class:`SMCATransformer` (its decoder's ``num_levels`` must equal the
                number of levels).
            criterion: the set criterion (matcher + losses).
            num_classes: number of foreground classes (sigmoid outputs; no "no-object" column).
            num_queries: number of object queries.
            num_extra_levels: stride-2 3x3 convs stacked on the last backbone level.
            pixel_mean, pixel_std: per-channel normalization, in ``input_format`` channel order.
            input_format: "RGB" or "BGR", the channel order of the input images.
            size_divisibility: pad the batch to a multiple of this (0: no extra padding).
            test_topk: detections kept per image: top-k over all query x class scores.
            aux_loss: supervise every decoder layer's output (DETR's auxiliary losses); False
                heads and supervises only the last layer's (the official ``--no_aux_loss``).
            denoising: a training aid, not in the paper: makes denoising queries from each
                training batch's targets (:class:`~smca_d2.modeling.denoising.DenoisingQueries`),
                which the criterion supervises without matching. None (the paper's model) or a
                module; inference is the same either way.
        """
        super().__init__()
        self.backbone = backbone
        self.in_features = list(in_features)
        self.transformer = transformer
        self.criterion = criterion
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.input_format = input_format
        self.size_divisibility = size_divisibility
        self.test_topk = test_topk
        self.aux_loss = aux_loss
        self.denoising = denoising
        d_model = transformer.d_model

        shapes = backbone.output_shape()
        missing = [f for f in self.in_features if f not in shapes]
        if missing:
            raise ValueError(f"backbone has no output {missing}; it has {sorted(shapes)}")
        channels = [shapes[f].channels for f in self.in_features]
        strides = [shapes[f].stride for f in self.in_features]
        self.input_proj = nn.ModuleList(nn.Conv2d(c, d_model, kernel_size=1) for c in channels)
        for i in range(num_extra_levels):
            in_channels = channels[-1] if i == 0 else d_model
            self.input_proj.append(nn.Conv2d(in_channels, d_model, kernel_size=3, stride=2, padding=1))
            strides.append(strides[-1] * 2)
        self.level_strides = strides
        num_levels = len(strides)
        decoder_levels = getattr(transformer.decoder, "num_levels", num_levels)
        if decoder_levels != num_levels:
            raise ValueError(f"the decoder is built for {decoder_levels} levels, the model has {num_levels}")
        self.level_embed = nn.Parameter(torch.randn(num_levels, d_model)) if num_levels > 1 else None

        self.position_embedding = PositionEmbeddingSine(d_model // 2, normalize=True)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.class_embed = nn.Linear(d_model, num_classes)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        prior_prob = 0.01
        nn.init.constant_(self.class_embed.bias, -torch.log(torch.tensor((1 - prior_prob) / prior_prob)).item())

        if len(pixel_mean) != len(pixel_std):
            raise ValueError(f"pixel_mean {pixel_mean} and pixel_std {pixel_std} differ in length")
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    @staticmethod
    def padding_mask(images: ImageList) -> torch.Tensor:
        """bool [B, H, W], True on the pixels added by batching."""
        # Comparisons rather than slice assignment: with symbolic sizes (torch.export with
        # dynamic image sizes) slicing would specialise the graph to the example's padding.
        h, w = images.tensor.shape[-2:]
        device = images.tensor.device
        rows = torch.arange(h, device=device)
        cols = torch.arange(w, device=device)
        masks = [(rows >= image_h)[:, None] | (cols >= image_w)[None, :] for image_h, image_w in images.image_sizes]
        return torch.stack(masks)

    @staticmethod
    def has_padding(images: ImageList) -> bool:
        """Whether batching padded any image (decided from the sizes, without reading a tensor).

        Under ``torch.export`` with dynamic image sizes the answer depends on the size: it is
        True unless the sizes are known to be equal for every input, so the exported graph
        always carries the padding mask."""
        padded_h, padded_w = images.tensor.shape[-2:]
        return not all(_known_equal(h, padded_h) and _known_equal(w, padded_w) for h, w in images.image_sizes)

    def _levels(self, images: ImageList):
        """Projected feature levels with their padding masks and position encodings."""
        features = self.backbone(images.tensor)
        pixel_mask = self.padding_mask(images)[None].float()
        maps = [proj(features[f]) for proj, f in zip(self.input_proj, self.in_features)]
        extra_input = features[self.in_features[-1]]
        for proj in self.input_proj[len(self.in_features) :]:
            extra_input = proj(extra_input)
            maps.append(extra_input)
        levels = []
        for i, feature in enumerate(maps):
            mask = F.interpolate(pixel_mask, size=feature.shape[-2:]).to(torch.bool)[0]
            pos = self.position_embedding(mask).to(feature.dtype)
            if self.level_embed is not None:
                pos = pos + self.level_embed[i].view(1, -1, 1, 1)
            levels.append((feature, mask, pos))
        return levels

    def forward_outputs(self, images: ImageList, denoising=None) -> Dict[str, torch.Tensor]:
        """Raw outputs: ``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4] (normalized cxcywh
        relative to each image's unpadded size), ``aux_outputs`` (earlier decoder layers) and
        ``ref_points`` [B, Q, 2] (the queries' normalized Gaussian centers). Without ``aux_loss``
        the earlier layers get no heads and ``aux_outputs`` is empty.

        With ``denoising`` (a :class:`~smca_d2.modeling.denoising.DenoisingBatch`, in training)
        the decoder also refines its D queries, whose outputs are under ``"denoising"``: the
        batch's targets (``labels``, ``boxes``, ``valid``, ``num_groups``) and the predictions of
        every headed layer, ``pred_logits`` [L, B, D, C] and ``pred_boxes`` [L, B, D, 4]."""
        levels = self._levels(images)
        src = torch.cat([f.flatten(2).transpose(1, 2) for f, _, _ in levels], dim=1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) for _, _, p in levels], dim=1)
        mask = None
        if self.has_padding(images):
            mask = torch.cat([m.flatten(1) for _, m, _ in levels], dim=1)
        shapes = [tuple(f.shape[-2:]) for f, _, _ in levels]
        image_wh = torch.tensor([[w, h] for h, w in images.image_sizes], dtype=torch.float32, device=src.device)
        extra = {} if denoising is None else {"denoising": denoising}
        hs, ref_logit = self.transformer(
            src, pos, mask, self.query_embed.weight, shapes, self.level_strides, image_wh, **extra
        )
        if not self.aux_loss:
            hs = hs[-1:]
        # The heads run in float32 under autocast too: in bfloat16 the box head's output, the
        # reference logit it is added to and the sigmoid would round the boxes to a few pixels
        # of a full-size image, before the loss and in the detections.
        with torch.autocast(device_type=hs.device.type, enabled=False):
            hs, ref_logit = hs.float(), ref_logit.float()
            logits = self.class_embed(hs)
            deltas = self.bbox_embed(hs)
            # Box centers are predicted relative to the query's Gaussian center (in logit space).
            boxes = torch.cat([deltas[..., :2] + ref_logit, deltas[..., 2:]], dim=-1).sigmoid()
        dn_outputs = None
        if denoising is not None:
            q = self.num_queries
            dn_outputs = {
                "pred_logits": logits[:, :, q:],
                "pred_boxes": boxes[:, :, q:],
                "labels": denoising.labels,
                "boxes": denoising.boxes,
                "valid": denoising.valid,
                "num_groups": denoising.num_groups,
            }
            logits, boxes, ref_logit = logits[:, :, :q], boxes[:, :, :q], ref_logit[:, :q]
        outputs = {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])],
            "ref_points": ref_logit.sigmoid(),
        }
        if dn_outputs is not None:
            outputs["denoising"] = dn_outputs
        return outputs

    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess_image(batched_inputs)
        if self.training:
            if not all("instances" in x for x in batched_inputs):
                raise ValueError("SMCADETR needs 'instances' in every input in training mode")
            targets = self.prepare_targets([x["instances"] for x in batched_inputs])
            denoising = None if self.denoising is None else self.denoising(targets, self.num_queries)
            outputs = self.forward_outputs(images, denoising)
            return self.criterion(outputs, targets)
        outputs = self.forward_outputs(images)
        results = self.inference(outputs["pred_logits"], outputs["pred_boxes"], images.image_sizes)
        processed = []
        for result, inputs, image_size in zip(results, batched_inputs, images.image_sizes):
            height = inputs.get("height", image_size[0])
            width = inputs.get("width", image_size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed

    def prepare_targets(self, instances: List[Instances]) -> List[Dict[str, torch.Tensor]]:
        """Ground truth as normalized cxcywh boxes and contiguous class ids."""
        targets = []
        for inst in instances:
            inst = inst.to(self.device)
            h, w = inst.image_size
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_convert(inst.gt_boxes.tensor.float() / scale, "xyxy", "cxcywh")
            targets.append({"labels": inst.gt_classes, "boxes": boxes})
        return targets

    def inference(self, logits, boxes, image_sizes) -> List[Instances]:
        """Top-k over all query x class sigmoid scores (no NMS), boxes in input-image pixels.

        Args:
            logits: [B, Q, C]; boxes: [B, Q, 4] normalized cxcywh.
            image_sizes: (h, w) of each image before padding.
        """
        b, q, c = logits.shape
        k = min(self.test_topk, q * c)
        scores, index = logits.sigmoid().flatten(1).topk(k, dim=1)
        query_index = torch.div(index, c, rounding_mode="floor")
        labels = index % c
        boxes_xyxy = box_convert(boxes.float(), "cxcywh", "xyxy")
        results = []
        for i, (h, w) in enumerate(image_sizes):
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=boxes.device)
            result = Instances((h, w))
            result.pred_boxes = Boxes(boxes_xyxy[i, query_index[i]] * scale)
            result.scores = scores[i].float()
            result.pred_classes = labels[i]
            results.append(result)
        return results
