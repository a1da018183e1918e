"""Property-based tests of the box conversions, the Hungarian matcher and the set criterion over
random boxes, including empty sets and degenerate (zero or negative size) boxes."""

import itertools
import os
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from torchvision.ops import box_convert

from smca_d2.modeling.box_ops import box_area, box_iou, elementwise_generalized_box_iou, generalized_box_iou
from smca_d2.modeling.criterion import SetCriterion
from smca_d2.modeling.matcher import HungarianMatcher


def box_cxcywh_to_xyxy(boxes):
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes):
    return box_convert(boxes, "xyxy", "cxcywh")


# No example database, and hypothesis's caches go to the temp folder, not .hypothesis/ in the work tree.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "smca_d2_hypothesis"))
SETTINGS = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

coordinate = st.floats(min_value=-2.0, max_value=2.0, allow_nan=False, width=32)
# sizes: often exactly zero, sometimes negative (degenerate boxes)
size = st.one_of(st.just(0.0), st.floats(min_value=-0.5, max_value=2.0, allow_nan=False, width=32))


@st.composite
def xyxy_boxes(draw, min_size=0, max_size=6):
    n = draw(st.integers(min_size, max_size))
    rows = [
        (x, y, x + w, y + h) for x, y, w, h in (draw(st.tuples(coordinate, coordinate, size, size)) for _ in range(n))
    ]
    return torch.tensor(rows, dtype=torch.float32).reshape(n, 4)


@st.composite
def normalized_cxcywh(draw, min_size=0, max_size=6):
    """Targets as the model sees them: centers in [0, 1], sizes in [0, 1] (zero included)."""
    n = draw(st.integers(min_size, max_size))
    unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False, width=32)
    rows = [draw(st.tuples(unit, unit, st.one_of(st.just(0.0), unit), st.one_of(st.just(0.0), unit))) for _ in range(n)]
    return torch.tensor(rows, dtype=torch.float32).reshape(n, 4)


# --------------------------------------------------------------------------------------------
# Box conversions and IoU
# --------------------------------------------------------------------------------------------
@SETTINGS
@given(xyxy_boxes())
def test_conversions_round_trip(boxes):
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(boxes)), boxes, atol=1e-5, rtol=0)
    cxcywh = box_xyxy_to_cxcywh(boxes)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(cxcywh)), cxcywh, atol=1e-5, rtol=0)
    assert box_cxcywh_to_xyxy(cxcywh).shape == boxes.shape


@SETTINGS
@given(xyxy_boxes(), xyxy_boxes())
def test_iou_and_giou_are_bounded_and_finite(a, b):
    areas = box_area(a)
    assert (areas >= 0).all() and areas.shape == (len(a),)
    iou, union = box_iou(a, b)
    giou = generalized_box_iou(a, b)
    assert iou.shape == giou.shape == (len(a), len(b))
    assert torch.isfinite(iou).all() and torch.isfinite(giou).all()
    assert (iou >= 0).all() and (iou <= 1 + 1e-6).all()
    assert (giou >= -1 - 1e-6).all() and (giou <= iou + 1e-6).all()
    torch.testing.assert_close(box_iou(b, a)[0], iou.T)  # symmetric
    torch.testing.assert_close(generalized_box_iou(b, a), giou.T)


@SETTINGS
@given(xyxy_boxes(min_size=1))
def test_giou_of_a_box_with_itself(boxes):
    giou = generalized_box_iou(boxes, boxes).diag()
    positive = box_area(boxes) > 1e-3
    torch.testing.assert_close(giou[positive], torch.ones(int(positive.sum())), atol=1e-5, rtol=0)
    torch.testing.assert_close(elementwise_generalized_box_iou(boxes, boxes), giou, atol=1e-6, rtol=0)


@SETTINGS
@given(xyxy_boxes(), st.randoms())
def test_elementwise_giou_is_the_diagonal(boxes, rnd):
    other = boxes[torch.tensor(rnd.sample(range(len(boxes)), len(boxes)), dtype=torch.long)] if len(boxes) else boxes
    expected = generalized_box_iou(boxes, other).diag()
    torch.testing.assert_close(elementwise_generalized_box_iou(boxes, other), expected, atol=1e-6, rtol=0)


@SETTINGS
@given(xyxy_boxes(min_size=1), xyxy_boxes(min_size=1))
def test_giou_gradients_are_finite_for_degenerate_boxes(a, b):
    a = a.clone().requires_grad_(True)
    generalized_box_iou(a, b).sum().backward()
    assert torch.isfinite(a.grad).all()


# --------------------------------------------------------------------------------------------
# Matcher
# --------------------------------------------------------------------------------------------
@st.composite
def matching_problem(draw, max_queries=5, max_targets=5, num_classes=3):
    q = draw(st.integers(1, max_queries))
    targets = draw(normalized_cxcywh(0, max_targets))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, q, num_classes, generator=g) * 3
    boxes = torch.rand(1, q, 4, generator=g)
    labels = torch.randint(0, num_classes, (len(targets),), generator=g)
    return {"pred_logits": logits, "pred_boxes": boxes}, [{"labels": labels, "boxes": targets}]


@SETTINGS
@given(matching_problem())
def test_matching_is_a_valid_optimal_one_to_one_assignment(problem):
    outputs, targets = problem
    matcher = HungarianMatcher()
    ((rows, cols),) = matcher(outputs, targets)
    q, n = outputs["pred_logits"].shape[1], len(targets[0]["labels"])
    assert len(rows) == len(cols) == min(q, n)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    assert all(0 <= r < q for r in rows.tolist()) and all(0 <= c < n for c in cols.tolist())
    if n == 0:
        return
    cost = matcher._cost_matrix(
        outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"], targets[0]["boxes"]
    )
    assert torch.isfinite(cost).all()
    found = cost[rows, cols].sum().item()
    # brute force over every one-to-one assignment of min(q, n) pairs
    if q >= n:
        best = min(sum(cost[p[j], j].item() for j in range(n)) for p in itertools.permutations(range(q), n))
    else:
        best = min(sum(cost[i, p[i]].item() for i in range(q)) for p in itertools.permutations(range(n), q))
    assert found <= best + 1e-4


@SETTINGS
@given(matching_problem(), st.randoms())
def test_matching_cost_does_not_depend_on_the_order_of_targets(problem, rnd):
    outputs, targets = problem
    n = len(targets[0]["labels"])
    perm = torch.tensor(rnd.sample(range(n), n), dtype=torch.long)
    shuffled = [{"labels": targets[0]["labels"][perm], "boxes": targets[0]["boxes"][perm]}]
    matcher = HungarianMatcher()

    def total(t):
        ((rows, cols),) = matcher(outputs, t)
        if n == 0:
            return 0.0
        cost = matcher._cost_matrix(outputs["pred_logits"][0], outputs["pred_boxes"][0], t[0]["labels"], t[0]["boxes"])
        return cost[rows, cols].sum().item()

    assert abs(total(targets) - total(shuffled)) <= 1e-4


# --------------------------------------------------------------------------------------------
# Criterion
# --------------------------------------------------------------------------------------------
@st.composite
def batch(draw, num_classes=3):
    b = draw(st.integers(1, 3))
    q = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(b):
        boxes = draw(normalized_cxcywh(0, 4))
        targets.append({"labels": torch.randint(0, num_classes, (len(boxes),), generator=g), "boxes": boxes})
    logits = (torch.randn(b, q, num_classes, generator=g) * 3).requires_grad_(True)
    boxes = torch.rand(b, q, 4, generator=g).requires_grad_(True)
    aux = [{"pred_logits": logits * 0.5, "pred_boxes": boxes.flip(-1)}]
    return {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": aux}, targets


@SETTINGS
@given(batch())
def test_losses_are_finite_non_negative_and_differentiable(data):
    outputs, targets = data
    criterion = SetCriterion(num_classes=3, matcher=HungarianMatcher())
    losses = criterion(outputs, targets)
    assert set(losses) == {f"{k}{s}" for k in ("loss_class", "loss_bbox", "loss_giou") for s in ("", "_0")}
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
        assert value.item() >= -1e-6, name
    num_boxes = max(1.0, float(sum(len(t["labels"]) for t in targets)))
    matched = sum(min(outputs["pred_logits"].shape[1], len(t["labels"])) for t in targets)
    assert losses["loss_giou"].item() <= 2.0 * 2 * matched / num_boxes + 1e-4  # weight 2, 1 - GIoU <= 2
    sum(losses.values()).backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all() and torch.isfinite(outputs["pred_boxes"].grad).all()
    if matched == 0:  # no target anywhere: box losses are zero but still part of the graph
        assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
        assert outputs["pred_boxes"].grad is not None


@SETTINGS
@given(normalized_cxcywh(1, 4))
def test_perfect_predictions_have_zero_box_losses(boxes):
    n = len(boxes)
    labels = torch.arange(n) % 3
    logits = torch.full((1, n, 3), -20.0)
    logits[0, torch.arange(n), labels] = 20.0
    outputs = {"pred_logits": logits, "pred_boxes": boxes[None].clone()}
    losses = SetCriterion(num_classes=3, matcher=HungarianMatcher())(outputs, [{"labels": labels, "boxes": boxes}])
    assert losses["loss_bbox"].item() <= 1e-5
    positive = (boxes[:, 2] > 1e-3) & (boxes[:, 3] > 1e-3)
    if positive.all():
        assert losses["loss_giou"].item() <= 1e-4
