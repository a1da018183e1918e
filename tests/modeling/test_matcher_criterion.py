import itertools
import math

import pytest
import torch
from torchvision.ops import box_convert

from smca_d2.modeling import box_ops
from smca_d2.modeling import criterion as criterion_module
from smca_d2.modeling.box_ops import (
    box_area,
    box_iou,
    elementwise_box_iou,
    elementwise_generalized_box_iou,
    generalized_box_iou,
)
from smca_d2.modeling.criterion import SetCriterion, sigmoid_focal_loss, varifocal_loss
from smca_d2.modeling.matcher import HungarianMatcher

ALPHA, GAMMA = 0.25, 2.0


def box_cxcywh_to_xyxy(boxes):
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes):
    return box_convert(boxes, "xyxy", "cxcywh")


def _target(labels, boxes):
    return {
        "labels": torch.as_tensor(labels, dtype=torch.int64),
        "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
    }


def _random_outputs(generator, batch, queries, classes, requires_grad=False):
    logits = torch.randn(batch, queries, classes, generator=generator)
    boxes = torch.cat(
        [
            torch.rand(batch, queries, 2, generator=generator) * 0.6 + 0.2,
            torch.rand(batch, queries, 2, generator=generator) * 0.3 + 0.05,
        ],
        dim=-1,
    )
    return {
        "pred_logits": logits.requires_grad_(requires_grad),
        "pred_boxes": boxes.requires_grad_(requires_grad),
    }


def _random_target(generator, num, classes):
    labels = torch.randint(0, classes, (num,), generator=generator)
    centers = torch.rand(num, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(num, 2, generator=generator) * 0.3 + 0.05
    return {"labels": labels, "boxes": torch.cat([centers, sizes], dim=1)}


def _reference_cost(logits, boxes, target, w_class=2.0, w_bbox=5.0, w_giou=2.0):
    """[Q, N] matching cost written out element by element, independently of the matcher."""
    num_queries, num_targets = logits.shape[0], len(target["labels"])
    cost = torch.zeros(num_queries, num_targets, dtype=torch.float64)
    for q in range(num_queries):
        for t in range(num_targets):
            label = int(target["labels"][t])
            p = torch.sigmoid(logits[q, label].double()).item()
            neg = (1 - ALPHA) * p**GAMMA * -math.log(1 - p + 1e-8)
            pos = ALPHA * (1 - p) ** GAMMA * -math.log(p + 1e-8)
            l1 = (boxes[q] - target["boxes"][t]).abs().sum().item()
            giou = generalized_box_iou(
                box_cxcywh_to_xyxy(boxes[q : q + 1].double()),
                box_cxcywh_to_xyxy(target["boxes"][t : t + 1].double()),
            ).item()
            cost[q, t] = w_bbox * l1 + w_class * (pos - neg) - w_giou * giou
    return cost


# ---------------------------------------------------------------------------------------------
# box_ops
# ---------------------------------------------------------------------------------------------
def test_box_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    cxcywh = torch.rand(20, 4, generator=g)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(cxcywh)), cxcywh)
    xyxy = torch.tensor([[0.0, 0.0, 1.0, 2.0], [0.2, 0.4, 0.6, 0.5]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy)
    torch.testing.assert_close(
        box_cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])), torch.tensor([0.4, 0.3, 0.6, 0.7])
    )


def test_box_area_and_iou():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0]])
    torch.testing.assert_close(box_area(b), torch.tensor([4.0, 4.0]))
    iou, union = box_iou(a, b)
    assert iou.shape == union.shape == (1, 2)
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 1.0]]))
    torch.testing.assert_close(union, torch.tensor([[7.0, 4.0]]))


def test_generalized_box_iou_known_values():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],  # identical: 1
            [2.0, 0.0, 3.0, 1.0],  # disjoint, side by side: 0 - (3 - 2) / 3
            [2.0, 2.0, 3.0, 3.0],  # disjoint, diagonal: 0 - (9 - 2) / 9
            [0.5, 0.5, 1.5, 1.5],  # overlap: 0.25 / 1.75 - (2.25 - 1.75) / 2.25
        ]
    )
    expected = torch.tensor([[1.0, -1 / 3, -7 / 9, 1 / 7 - 0.5 / 2.25]])
    torch.testing.assert_close(generalized_box_iou(a, b), expected)
    torch.testing.assert_close(elementwise_generalized_box_iou(a.expand(4, 4), b), expected[0])


def test_generalized_box_iou_degenerate_boxes_are_finite():
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    line = torch.tensor([[0.2, 0.5, 0.8, 0.5]])
    boxes = torch.cat([point, line, torch.tensor([[0.0, 0.0, 1.0, 1.0]])]).requires_grad_()
    giou = generalized_box_iou(boxes, boxes)
    assert torch.isfinite(giou).all()
    assert giou.min() >= -1 and giou.max() <= 1
    pairwise = elementwise_generalized_box_iou(boxes, boxes.flip(0))
    assert torch.isfinite(pairwise).all()
    (giou.sum() + pairwise.sum()).backward()
    assert torch.isfinite(boxes.grad).all()


def test_elementwise_matches_diagonal():
    g = torch.Generator().manual_seed(1)
    b1 = box_cxcywh_to_xyxy(torch.rand(16, 4, generator=g))
    b2 = box_cxcywh_to_xyxy(torch.rand(16, 4, generator=g))
    torch.testing.assert_close(elementwise_generalized_box_iou(b1, b2), generalized_box_iou(b1, b2).diag())
    torch.testing.assert_close(elementwise_box_iou(b1, b2), box_iou(b1, b2)[0].diag())
    for function in (elementwise_generalized_box_iou, elementwise_box_iou):
        with pytest.raises(ValueError, match="equal shape"):
            function(b1, b2[:3])


# ---------------------------------------------------------------------------------------------
# HungarianMatcher
# ---------------------------------------------------------------------------------------------
def _permuted_case():
    """3 queries, 2 targets: query 2 predicts target 0, query 0 predicts target 1."""
    target = _target([1, 0], [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])
    boxes = torch.tensor([[[0.7, 0.6, 0.3, 0.4], [0.5, 0.5, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]]])
    logits = torch.full((1, 3, 3), -8.0)
    logits[0, 2, 1] = 8.0
    logits[0, 0, 0] = 8.0
    return {"pred_logits": logits, "pred_boxes": boxes}, target


def test_matcher_known_assignment():
    outputs, target = _permuted_case()
    ((pred_idx, tgt_idx),) = HungarianMatcher()(outputs, [target])
    assert pred_idx.dtype == tgt_idx.dtype == torch.int64
    assert dict(zip(pred_idx.tolist(), tgt_idx.tolist())) == {0: 1, 2: 0}


def test_matcher_half_inputs_match_like_float():
    outputs, target = _permuted_case()
    half = {k: v.half() for k, v in outputs.items()}
    ((pred_idx, tgt_idx),) = HungarianMatcher()(half, [target])
    assert dict(zip(pred_idx.tolist(), tgt_idx.tolist())) == {0: 1, 2: 0}


def test_matcher_zero_targets():
    g = torch.Generator().manual_seed(0)
    outputs = _random_outputs(g, 2, 5, 3)
    empty = _target([], [])
    indices = HungarianMatcher()(outputs, [empty, empty])
    assert len(indices) == 2
    for pred_idx, tgt_idx in indices:
        assert pred_idx.numel() == tgt_idx.numel() == 0
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64


def test_matcher_batch_with_one_empty_image():
    outputs, target = _permuted_case()
    outputs = {k: torch.cat([v, v]) for k, v in outputs.items()}
    (p0, t0), (p1, t1) = HungarianMatcher()(outputs, [_target([], []), target])
    assert p0.numel() == t0.numel() == 0
    assert dict(zip(p1.tolist(), t1.tolist())) == {0: 1, 2: 0}


def test_matcher_batch_equals_one_image_at_a_time():
    """The batch's cost matrix holds each image's costs exactly: same matches as image by image."""
    g = torch.Generator().manual_seed(3)
    outputs = _random_outputs(g, 4, 12, 5)
    targets = [_random_target(g, n, 5) for n in (3, 0, 7, 1)]
    batched = HungarianMatcher()(outputs, targets)
    for i, target in enumerate(targets):
        alone = HungarianMatcher()({k: v[i : i + 1] for k, v in outputs.items()}, [target])[0]
        assert torch.equal(batched[i][0], alone[0]) and torch.equal(batched[i][1], alone[1])
        assert len(batched[i][0]) == len(target["labels"])


def test_matcher_match_layers_equals_one_layer_at_a_time():
    """All layers' costs in one matrix: each layer gets the matches it would get alone."""
    g = torch.Generator().manual_seed(4)
    layers = [_random_outputs(g, 3, 9, 4) for _ in range(3)]
    targets = [_random_target(g, n, 4) for n in (2, 0, 5)]
    logits = torch.stack([o["pred_logits"] for o in layers])
    boxes = torch.stack([o["pred_boxes"] for o in layers])
    matches = HungarianMatcher().match_layers(logits, boxes, targets)
    assert len(matches) == 3
    for layer, outputs in zip(matches, layers):
        alone = HungarianMatcher()(outputs, targets)
        for (p, t), (p_alone, t_alone) in zip(layer, alone):
            assert torch.equal(p, p_alone) and torch.equal(t, t_alone)


def test_matcher_non_finite_cost_in_one_layer_names_the_image():
    outputs, target = _permuted_case()
    logits = torch.stack([outputs["pred_logits"]] * 2)
    logits[1, 0, 1, 0] = float("nan")
    boxes = torch.stack([outputs["pred_boxes"]] * 2)
    with pytest.raises(ValueError, match="image 0.*NaN or inf.*pred_logits"):
        HungarianMatcher().match_layers(logits, boxes, [target])


def _brute_force_minimum(cost):
    num_queries, num_targets = cost.shape
    if num_targets <= num_queries:
        return min(
            sum(cost[q, t] for t, q in enumerate(perm)).item()
            for perm in itertools.permutations(range(num_queries), num_targets)
        )
    return min(
        sum(cost[q, t] for q, t in enumerate(perm)).item()
        for perm in itertools.permutations(range(num_targets), num_queries)
    )


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("num_queries,num_targets", [(4, 3), (4, 4), (3, 5)])
def test_matcher_is_optimal(seed, num_queries, num_targets):
    g = torch.Generator().manual_seed(seed)
    outputs = _random_outputs(g, 1, num_queries, 4)
    target = _random_target(g, num_targets, 4)
    ((pred_idx, tgt_idx),) = HungarianMatcher()(outputs, [target])

    assert len(pred_idx) == len(tgt_idx) == min(num_queries, num_targets)
    assert len(set(pred_idx.tolist())) == len(pred_idx)
    assert len(set(tgt_idx.tolist())) == len(tgt_idx)
    cost = _reference_cost(outputs["pred_logits"][0], outputs["pred_boxes"][0], target)
    assert cost[pred_idx, tgt_idx].sum().item() == pytest.approx(_brute_force_minimum(cost), abs=1e-5)


def test_matcher_more_targets_than_queries():
    outputs, _ = _permuted_case()
    target = _target(
        [0, 1, 2, 0],
        [[0.1, 0.1, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1], [0.7, 0.6, 0.3, 0.4]],
    )
    ((pred_idx, tgt_idx),) = HungarianMatcher()(outputs, [target])
    assert sorted(pred_idx.tolist()) == [0, 1, 2]
    assert len(set(tgt_idx.tolist())) == 3
    matched = dict(zip(pred_idx.tolist(), tgt_idx.tolist()))
    assert matched[0] == 3 and matched[2] == 1


@pytest.mark.parametrize("key,value", [("pred_logits", float("nan")), ("pred_boxes", float("nan"))])
def test_matcher_non_finite_costs_raise(key, value):
    outputs, target = _permuted_case()
    outputs[key] = outputs[key].clone()
    outputs[key][0, 1, 0] = value
    with pytest.raises(ValueError, match=f"NaN or inf.*{key}"):
        HungarianMatcher()(outputs, [target])


def test_matcher_runs_without_grad():
    g = torch.Generator().manual_seed(0)
    outputs = _random_outputs(g, 1, 4, 3, requires_grad=True)
    # Would fail with "requires grad" if the matcher tried .numpy() on a graph tensor.
    indices = HungarianMatcher()(outputs, [_random_target(g, 2, 3)])
    assert len(indices[0][0]) == 2


# ---------------------------------------------------------------------------------------------
# SetCriterion
# ---------------------------------------------------------------------------------------------
def _criterion(weight_dict=None, num_classes=3, **kwargs):
    return SetCriterion(num_classes=num_classes, matcher=HungarianMatcher(), weight_dict=weight_dict, **kwargs)


def _focal_term(logit, target):
    p = 1 / (1 + math.exp(-logit))
    if target:
        return ALPHA * (1 - p) ** GAMMA * -math.log(p)
    return (1 - ALPHA) * p**GAMMA * -math.log(1 - p)


def test_sigmoid_focal_loss_hand_computed():
    logits = torch.tensor([[[0.5, -1.0]]])  # 1 image, 1 query, 2 classes
    targets = torch.tensor([[[0.0, 1.0]]])
    expected = _focal_term(0.5, 0) + _focal_term(-1.0, 1)
    loss = sigmoid_focal_loss(logits, targets, num_boxes=1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Summed over queries and classes, divided by num_boxes (no averaging over queries).
    loss = sigmoid_focal_loss(logits.expand(1, 4, 2), targets.expand(1, 4, 2), num_boxes=2)
    assert loss.item() == pytest.approx(4 * expected / 2, rel=1e-6)


def test_criterion_class_loss_hand_computed():
    outputs = {
        "pred_logits": torch.tensor([[[0.5, -1.0]]]),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]),
    }
    losses = _criterion(num_classes=2)(outputs, [_target([1], [[0.5, 0.5, 0.2, 0.2]])])
    expected = 2.0 * (_focal_term(0.5, 0) + _focal_term(-1.0, 1))
    assert losses["loss_class"].item() == pytest.approx(expected, rel=1e-6)


def _varifocal_term(logit, quality, positive):
    """One entry of the varifocal loss, written out: BCE against the quality, weighted by it
    (positives) or by (1 - alpha) p^gamma (negatives)."""
    p = 1 / (1 + math.exp(-logit))
    bce = -(quality * math.log(p) + (1 - quality) * math.log(1 - p))
    return (quality if positive else (1 - ALPHA) * p**GAMMA) * bce


def test_varifocal_loss_hand_computed():
    logits = torch.tensor([[[0.5, -1.0, 2.0]]])
    quality = torch.tensor([[[0.0, 0.6, 0.0]]])
    positive = torch.tensor([[[False, True, True]]])  # a positive of quality 0 weighs nothing
    expected = _varifocal_term(0.5, 0.0, False) + _varifocal_term(-1.0, 0.6, True)
    loss = varifocal_loss(logits, quality, positive, num_boxes=2)
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)
    # The negatives' weight is the focal loss's: with no positive, the two losses are equal.
    none = torch.zeros_like(positive)
    torch.testing.assert_close(
        varifocal_loss(logits, torch.zeros_like(quality), none, 1),
        sigmoid_focal_loss(logits, torch.zeros_like(quality), 1),
    )


def test_criterion_varifocal_targets_are_the_matched_ious():
    outputs = {
        "pred_logits": torch.tensor([[[0.5, -1.0], [0.3, 0.2]]], requires_grad=True),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]], requires_grad=True),
    }
    target = _target([1], [[0.6, 0.5, 0.2, 0.2]])  # query 0, shifted by half a width: IoU 1/3
    focal = _criterion(num_classes=2)(outputs, [target])
    varifocal = _criterion(num_classes=2, class_loss="varifocal")(outputs, [target])
    expected = 2.0 * (
        _varifocal_term(0.5, 0.0, False)
        + _varifocal_term(-1.0, 1 / 3, True)
        + _varifocal_term(0.3, 0.0, False)
        + _varifocal_term(0.2, 0.0, False)
    )
    assert varifocal["loss_class"].item() == pytest.approx(expected, rel=1e-5)
    for name in ("loss_bbox", "loss_giou"):  # the same match, the same box losses
        assert varifocal[name].item() == focal[name].item()
    # The class loss trains the logits, not the boxes its targets are computed from.
    logits_grad, boxes_grad = torch.autograd.grad(
        varifocal["loss_class"], [outputs["pred_logits"], outputs["pred_boxes"]], allow_unused=True
    )
    assert logits_grad.abs().sum() > 0
    assert boxes_grad is None or boxes_grad.abs().sum() == 0


def test_criterion_rejects_an_unknown_class_loss():
    with pytest.raises(ValueError, match="class_loss must be one of"):
        _criterion(class_loss="softmax")


def test_criterion_perfect_boxes():
    outputs, target = _permuted_case()
    losses = _criterion()(outputs, [target])
    assert set(losses) == {"loss_class", "loss_bbox", "loss_giou"}
    assert losses["loss_bbox"].item() == 0.0
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_class"].item() < 1e-3  # confident and correct


def test_criterion_box_losses_hand_computed():
    outputs = {
        "pred_logits": torch.zeros(1, 1, 3),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]),
    }
    target = _target([0], [[0.6, 0.5, 0.2, 0.2]])  # shifted by half a width
    losses = _criterion()(outputs, [target])
    assert losses["loss_bbox"].item() == pytest.approx(5.0 * 0.1, rel=1e-5)
    # inter 0.1 x 0.2, union 0.06, enclosing 0.3 x 0.2: GIoU = 1/3 - 0
    assert losses["loss_giou"].item() == pytest.approx(2.0 * (1 - 1 / 3), rel=1e-5)


def test_criterion_aux_losses():
    g = torch.Generator().manual_seed(0)
    outputs = _random_outputs(g, 2, 5, 3)
    targets = [_random_target(g, 2, 3), _random_target(g, 3, 3)]
    main = dict(outputs.items())
    outputs["aux_outputs"] = [dict(main), dict(main)]
    losses = _criterion()(outputs, targets)
    names = ("loss_class", "loss_bbox", "loss_giou")
    assert set(losses) == {f"{n}{s}" for n in names for s in ("", "_0", "_1")}
    for name in names:
        for suffix in ("_0", "_1"):
            torch.testing.assert_close(losses[name + suffix], losses[name])


def test_criterion_aux_outputs_are_matched_separately():
    outputs, target = _permuted_case()
    # The aux layer predicts the same boxes in a different query order: its own matching
    # still finds a perfect assignment.
    aux = {k: v[:, [2, 1, 0]] for k, v in outputs.items()}
    losses = _criterion()(dict(outputs, aux_outputs=[aux]), [target])
    assert losses["loss_bbox_0"].item() == 0.0
    torch.testing.assert_close(losses["loss_class_0"], losses["loss_class"])


def test_criterion_layers_scored_together_equal_each_layer_alone():
    """The layers are matched and scored in one pass: each layer's losses and gradients are, to
    the bit, those the criterion gives that layer as the only output (so training computes what
    it computed when the layers were scored one by one)."""
    g = torch.Generator().manual_seed(5)
    layers = [_random_outputs(g, 8, 30, 5) for _ in range(3)]
    targets = [_random_target(g, n, 5) for n in (2, 0, 4, 7, 1, 3, 5, 6)]

    def leaves():
        return [{k: v.clone().requires_grad_() for k, v in layer.items()} for layer in layers]

    together = leaves()
    aux0, aux1, final = together
    losses = _criterion(num_classes=5)(dict(final, aux_outputs=[aux0, aux1]), targets)
    assert list(losses)[:3] == ["loss_class", "loss_bbox", "loss_giou"]  # the last layer's first
    sum(losses.values()).backward()
    for suffix, outputs, scored in zip(("_0", "_1", ""), leaves(), together):
        alone = _criterion(num_classes=5)(outputs, targets)
        sum(alone.values()).backward()
        for name, value in alone.items():
            assert torch.equal(losses[name + suffix], value), name + suffix
        for key in ("pred_logits", "pred_boxes"):
            assert torch.equal(scored[key].grad, outputs[key].grad), key + suffix


def test_criterion_with_a_matcher_without_match_layers():
    """A matcher with only the documented ``forward(outputs, targets)`` is called once per layer."""

    class ForwardOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = HungarianMatcher()
            self.calls = 0

        def forward(self, outputs, targets):
            self.calls += 1
            return self.inner(outputs, targets)

    g = torch.Generator().manual_seed(6)
    outputs = dict(_random_outputs(g, 2, 5, 3), aux_outputs=[_random_outputs(g, 2, 5, 3)])
    targets = [_random_target(g, 2, 3), _random_target(g, 3, 3)]
    matcher = ForwardOnly()
    losses = SetCriterion(num_classes=3, matcher=matcher)(outputs, targets)
    assert matcher.calls == 2
    expected = _criterion()(outputs, targets)
    assert set(losses) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value)


def test_criterion_gradients_flow():
    g = torch.Generator().manual_seed(0)
    outputs = _random_outputs(g, 2, 5, 3, requires_grad=True)
    targets = [_random_target(g, 2, 3), _target([], [])]
    losses = _criterion()(outputs, targets)
    sum(losses.values()).backward()
    logits_grad, boxes_grad = outputs["pred_logits"].grad, outputs["pred_boxes"].grad
    assert logits_grad is not None and boxes_grad is not None
    assert logits_grad.abs().sum() > 0 and boxes_grad.abs().sum() > 0
    assert logits_grad[1].abs().sum() > 0  # the empty image's queries are pushed to background
    assert boxes_grad[1].abs().sum() == 0


def test_criterion_zero_target_batch():
    g = torch.Generator().manual_seed(0)
    outputs = _random_outputs(g, 2, 5, 3, requires_grad=True)
    outputs["aux_outputs"] = [
        {k: v * 1.0 for k, v in outputs.items()},
    ]
    losses = _criterion()(outputs, [_target([], []), _target([], [])])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    assert losses["loss_class"].item() > 0
    sum(losses.values()).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0
    # Box losses stay in the graph (zero gradient, not None) so DDP sees the parameters used.
    assert losses["loss_bbox"].requires_grad and losses["loss_giou"].requires_grad
    assert outputs["pred_boxes"].grad is not None
    assert torch.count_nonzero(outputs["pred_boxes"].grad) == 0


def test_criterion_weights_applied():
    g = torch.Generator().manual_seed(0)
    outputs = _random_outputs(g, 2, 5, 3)
    outputs["aux_outputs"] = [_random_outputs(g, 2, 5, 3)]
    targets = [_random_target(g, 2, 3), _random_target(g, 1, 3)]
    weights = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    base = _criterion(weights)(outputs, targets)
    doubled = _criterion({k: 2 * v for k, v in weights.items()})(outputs, targets)
    assert set(base) == set(doubled)
    for name in base:
        torch.testing.assert_close(doubled[name], 2 * base[name])
    only_class = _criterion({"loss_class": 1.0, "loss_bbox": 0.0, "loss_giou": 0.0})(outputs, targets)
    torch.testing.assert_close(only_class["loss_class_0"], base["loss_class_0"] / 2)
    assert only_class["loss_bbox_0"].item() == 0.0


def test_criterion_rejects_bad_weight_dict():
    with pytest.raises(ValueError, match="weight_dict"):
        _criterion({"loss_ce": 1.0})


def test_criterion_num_boxes_is_averaged_over_processes(monkeypatch):
    outputs = {
        "pred_logits": torch.zeros(1, 1, 3),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]),
    }
    targets = [_target([0], [[0.6, 0.5, 0.2, 0.2]])]
    single = _criterion()(outputs, targets)

    class FakeDist:
        """Two processes; the other one holds 5 boxes, so the average is (1 + 5) / 2 = 3."""

        @staticmethod
        def is_available():
            return True

        @staticmethod
        def is_initialized():
            return True

        @staticmethod
        def all_reduce(tensor):
            tensor.add_(5)

        @staticmethod
        def get_world_size():
            return 2

    monkeypatch.setattr(criterion_module, "dist", FakeDist)
    averaged = _criterion()(outputs, targets)
    for name in single:
        torch.testing.assert_close(averaged[name], single[name] / 3)


def test_box_ops_public_api():
    for name in box_ops.__all__:
        assert callable(getattr(box_ops, name))
