"""The SMCA model: every config builds and runs, gradients, Gaussian bias, batching, baseline."""

import glob
import os

import pytest
import torch
from torch import nn

from smca_d2.modeling import SpatiallyModulatedCoAttention, gaussian_log_weights
from smca_d2.modeling.attention import padding_bias

from detectron2.config import LazyConfig, instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from detectron2.structures import Boxes, ImageList, Instances

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def load_model_cfg(name):
    return LazyConfig.load(os.path.join(REPO, "configs", name)).model


def shrink(model_cfg, layers=2, queries=12, d_model=64):
    dec = model_cfg.transformer.decoder
    dec.num_layers, dec.d_model, dec.dim_feedforward, dec.nhead = layers, d_model, 128, 4
    if "num_layers" in model_cfg.transformer.encoder:
        model_cfg.transformer.encoder.num_layers = layers
    model_cfg.num_queries = queries
    return model_cfg


def make_inputs(sizes, num_classes=80, seed=0, with_instances=True):
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for i, (h, w) in enumerate(sizes):
        x = {"image": torch.randint(0, 256, (3, h, w), generator=g).float(), "height": h, "width": w}
        if with_instances:
            inst = Instances((h, w))
            n = i + 1
            xy = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
            wh = (torch.rand(n, 2, generator=g) * 0.4 + 0.1) * torch.tensor([w, h])
            inst.gt_boxes = Boxes(torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], 1))
            inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
            x["instances"] = inst
        inputs.append(x)
    return inputs


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_config_trains_and_infers(path):
    cfg = LazyConfig.load(path)
    assert {"dataloader", "model", "optimizer", "lr_multiplier", "train"} <= set(cfg.keys())
    torch.manual_seed(0)
    model = instantiate(shrink(cfg.model))
    inputs = make_inputs([(96, 128), (128, 64)], num_classes=cfg.model.num_classes)
    model.train()
    losses = model(inputs)
    assert {"loss_class", "loss_bbox", "loss_giou", "loss_class_0"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        results = model(inputs)
    for x, r in zip(inputs, results):
        inst = r["instances"]
        assert inst.image_size == (x["height"], x["width"])
        assert len(inst) == min(model.test_topk, model.num_queries * model.num_classes)
        assert torch.isfinite(inst.pred_boxes.tensor).all()
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
        assert (inst.pred_classes < model.num_classes).all()


def test_encoder_free_model_trains():
    """encoder.num_layers=0 (the CPU demo): the decoder attends to the projected backbone features."""
    from smca_d2.modeling import SingleScaleEncoder

    encoder = SingleScaleEncoder(num_layers=0, d_model=8, nhead=2, dim_feedforward=16)
    src = torch.randn(2, 5, 8)
    assert encoder(src, torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool), [(1, 5)]) is src
    with pytest.raises(ValueError, match="num_layers"):
        SingleScaleEncoder(num_layers=-1)

    model_cfg = shrink(load_model_cfg("smca_single_scale_r50_50ep.py"))
    model_cfg.transformer.encoder.num_layers = 0
    torch.manual_seed(0)
    model = instantiate(model_cfg)
    model.train()
    losses = model(make_inputs([(96, 128), (64, 96)]))
    sum(losses.values()).backward()
    assert model.input_proj[0].weight.grad.abs().sum() > 0  # the decoder's gradient reaches the features


def test_official_parameter_count():
    """With the official 92 class columns, single-scale R50 has the official 41,538,082 params."""
    cfg = load_model_cfg("smca_single_scale_r50_50ep.py")
    cfg.num_classes = 92
    model = instantiate(cfg)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 41_538_082


@pytest.mark.parametrize(
    "name", ["smca_single_scale_r50_50ep.py", "smca_multi_scale_r50_50ep.py", "detr_baseline_r50_50ep.py"]
)
@pytest.mark.parametrize("scale_type", ["fixed", "single", "independent"])
def test_gradients_reach_every_trainable_parameter(name, scale_type):
    cfg = shrink(load_model_cfg(name))
    cfg.transformer.decoder.scale_type = scale_type
    cfg.transformer.decoder.dropout = 0.0
    torch.manual_seed(0)
    model = instantiate(cfg).train()
    sum(model(make_inputs([(96, 128), (64, 96)])).values()).backward()
    # The first decoder layer's self-attention runs on tgt = 0 (as in the official model): its
    # input projection never gets a gradient, and at initialisation (zero biases) neither do its
    # output projection weight and the LayerNorm after it.
    dead_by_design = {
        "transformer.decoder.layers.0.self_attn.in_proj_weight",
        "transformer.decoder.layers.0.self_attn.out_proj.weight",
        "transformer.decoder.layers.0.norm1.weight",
    }
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and n not in dead_by_design and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not missing, missing
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("backbone.stem", "backbone.res2")) for n in frozen)


def reference_log_gaussian(centers, scales, scale_type, h, w, beta):
    """Direct computation over an explicit (x, y) grid: -(sum_k s_k^2 d_k^2) / beta."""
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    grid = torch.stack([xs.flatten(), ys.flatten()], -1)  # [HW, 2], row-major
    d2 = (centers[..., None, :] - grid) ** 2  # [B, heads, Q, HW, 2]
    if scale_type == "fixed":
        dist = d2.sum(-1)
    elif scale_type == "single":
        dist = d2.sum(-1) * scales[..., None, 0]
    else:
        dist = (d2 * scales[..., None, :]).sum(-1)
    return -dist / beta


@pytest.mark.parametrize("scale_type,channels", [("fixed", 0), ("single", 1), ("independent", 2)])
def test_gaussian_bias_matches_direct_computation(scale_type, channels):
    torch.manual_seed(0)
    b, heads, q, h, w, beta = 2, 3, 5, 4, 7, 8.0
    centers = torch.rand(b, heads, q, 2) * torch.tensor([w, h])
    scales = torch.rand(b, heads, q, channels) * 2 if channels else None
    mask = torch.zeros(b, h * w, dtype=torch.bool)
    mask[1, -5:] = True
    bias = gaussian_log_weights(centers, scales, (h, w), beta, mask)
    ref = reference_log_gaussian(centers, scales, scale_type, h, w, beta)
    assert bias.shape == (b, heads, q, h * w) and bias.dtype == torch.float32
    torch.testing.assert_close(bias[0], ref[0])
    torch.testing.assert_close(bias[1, ..., :-5], ref[1, ..., :-5])
    assert torch.isinf(bias[1, ..., -5:]).all() and (bias[1, ..., -5:] < 0).all()
    # At the center the weight is 1 (log 0) and sigma = sqrt(beta / 2) cells at scale 1.
    centered = gaussian_log_weights(torch.tensor([[[[2.0, 1.0]]]]), None, (3, 5), beta)
    assert centered[0, 0, 0, 1 * 5 + 2] == 0
    assert torch.isclose(centered[0, 0, 0, 1 * 5 + 4], torch.tensor(-4.0 / beta))


def _autograd_nodes(grad_fn):
    seen, stack = set(), [grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


@pytest.mark.parametrize("scale_type,channels", [("fixed", 0), ("single", 1), ("independent", 2)])
def test_gaussian_bias_gradients(scale_type, channels):
    # the centers and scales are learned through the bias; padded keys (-inf) pass no gradient
    g = torch.Generator().manual_seed(0)
    b, heads, q, h, w, beta = 2, 3, 5, 4, 7, 8.0
    centers = (torch.rand(b, heads, q, 2, generator=g) * torch.tensor([w, h])).requires_grad_()
    scales = (torch.rand(b, heads, q, channels, generator=g) * 2).requires_grad_()
    inputs = (centers, scales) if channels else (centers,)
    mask = torch.zeros(b, h * w, dtype=torch.bool)
    mask[1, -5:] = True
    bias = gaussian_log_weights(centers, scales if channels else None, (h, w), beta, mask)
    # built without in-place writes into a view: no CopySlices node re-copying the whole bias
    assert "CopySlices" not in _autograd_nodes(bias.grad_fn)
    upstream = torch.randn(bias.shape, generator=g)
    ref = reference_log_gaussian(centers, scales if channels else None, scale_type, h, w, beta)
    expected = torch.autograd.grad(ref.masked_fill(mask[:, None, None], float("-inf")), inputs, upstream)
    for ours, theirs in zip(torch.autograd.grad(bias, inputs, upstream), expected):
        torch.testing.assert_close(ours, theirs)


def test_unmodulated_coattention_equals_plain_multihead_attention():
    torch.manual_seed(0)
    b, q, s, c, heads = 2, 6, 10, 32, 4
    ours = SpatiallyModulatedCoAttention(c, heads).eval()
    plain = nn.MultiheadAttention(c, heads, batch_first=True).eval()
    plain.load_state_dict(ours.state_dict())
    query, key, value = torch.randn(b, q, c), torch.randn(b, s, c), torch.randn(b, s, c)
    mask = torch.zeros(b, s, dtype=torch.bool)
    mask[0, 7:] = True
    out = ours(query, key, value, [padding_bias(mask, q)], [s])
    expected = plain(query, key, value, key_padding_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_coattention_keeps_float32_logits_under_autocast():
    torch.manual_seed(0)
    attn = SpatiallyModulatedCoAttention(32, 4).eval()
    query, key = torch.randn(1, 5, 32), torch.randn(1, 9, 32)
    bias = [torch.full((1, 4, 5, 9), -1e4).index_fill_(-1, torch.tensor([3]), 0.0)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(query, key, key, bias, [9])
    # A -1e4 bias everywhere but one key: all attention goes to key 3 (bf16 logits would still
    # be fine here; the point is that the float32 path runs under autocast and is exact).
    v = nn.functional.linear(key, attn.in_proj_weight[64:], attn.in_proj_bias[64:])
    expected = attn.out_proj(v[:, 3:4].expand(1, 5, 32))
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


class PatchBackbone(Backbone):
    """Non-overlapping patch convolutions without bias: a padded (zero) pixel block gives a zero
    feature, so batching with padding is exactly equivalent to running images one by one."""

    def __init__(self):
        super().__init__()
        self.res4 = nn.Conv2d(3, 16, kernel_size=16, stride=16, bias=False)
        self.res5 = nn.Conv2d(16, 32, kernel_size=2, stride=2, bias=False)

    def forward(self, x):
        r4 = self.res4(x)
        return {"res4": r4, "res5": self.res5(r4)}

    def output_shape(self):
        return {"res4": ShapeSpec(channels=16, stride=16), "res5": ShapeSpec(channels=32, stride=32)}


@pytest.mark.parametrize("name", ["smca_single_scale_r50_50ep.py", "smca_multi_scale_r50_50ep.py"])
def test_batched_inference_equals_one_image_at_a_time(name):
    cfg = shrink(load_model_cfg(name))
    cfg.backbone = PatchBackbone()
    torch.manual_seed(0)
    model = instantiate(cfg).eval()
    # Different sizes (multiples of the coarsest stride, 64), so each is padded differently.
    inputs = make_inputs([(64, 192), (192, 128), (128, 128)], with_instances=False)
    with torch.no_grad():
        batched = model(inputs)
        single = [model([x])[0] for x in inputs]
        raw_batched = model.forward_outputs(model.preprocess_image(inputs))
    assert model.preprocess_image(inputs).tensor.shape[-2:] == (192, 192)
    for b, s in zip(batched, single):
        torch.testing.assert_close(b["instances"].scores, s["instances"].scores, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            b["instances"].pred_boxes.tensor, s["instances"].pred_boxes.tensor, atol=1e-3, rtol=1e-5
        )
        assert torch.equal(b["instances"].pred_classes, s["instances"].pred_classes)
    if name.startswith("smca_multi"):
        # The scale-selection weights differ between images of the batch (they are per image).
        layer = model.transformer.decoder.layers[0]
        assert layer.scale_selection is not None
    assert raw_batched["ref_points"].shape == (3, model.num_queries, 2)


def test_training_does_not_depend_on_padding():
    """Losses of an image are the same alone and padded in a batch (same mask in train and test)."""
    cfg = shrink(load_model_cfg("smca_single_scale_r50_50ep.py"))
    cfg.backbone = PatchBackbone()
    cfg.in_features = ["res5"]
    cfg.transformer.decoder.dropout = 0.0
    torch.manual_seed(0)
    model = instantiate(cfg).train()
    inputs = make_inputs([(64, 128)])
    padded = [dict(inputs[0]), make_inputs([(128, 192)], with_instances=False)[0]]
    padded[1]["instances"] = Instances(
        (128, 192), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0, dtype=torch.long)
    )
    alone = model(inputs)
    outputs_alone = model.forward_outputs(model.preprocess_image(inputs))
    outputs_padded = model.forward_outputs(model.preprocess_image(padded))
    torch.testing.assert_close(outputs_alone["pred_boxes"][0], outputs_padded["pred_boxes"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs_alone["pred_logits"][0], outputs_padded["pred_logits"][0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(sum(alone.values()))


MASK_CONFIGS = ["smca_single_scale_r50_50ep.py", "smca_multi_scale_r50_50ep.py", "detr_baseline_r50_50ep.py"]


@pytest.mark.parametrize("name", MASK_CONFIGS)
def test_a_batch_without_padding_skips_the_mask_with_the_same_results(name, monkeypatch):
    """Images of one size: the transformer gets no mask, and the outputs (every decoder layer,
    training mode with dropout included) equal those with the explicit all-False mask."""
    cfg = shrink(load_model_cfg(name))
    cfg.backbone = PatchBackbone()
    torch.manual_seed(0)
    model = instantiate(cfg).train()
    masks, force = [], []
    forward, has_padding = model.transformer.forward, model.has_padding
    monkeypatch.setattr(
        model.transformer, "forward", lambda src, pos, mask, *a: masks.append(mask) or forward(src, pos, mask, *a)
    )
    monkeypatch.setattr(model, "has_padding", lambda images: bool(force) or has_padding(images))

    def outputs(inputs, force_mask=False):
        force[:] = [True] if force_mask else []
        torch.manual_seed(1)  # the same dropout masks
        return model.forward_outputs(model.preprocess_image(inputs))

    same_size = make_inputs([(128, 192), (128, 192)], with_instances=False)
    skipped = outputs(same_size)
    assert masks[-1] is None
    masked = outputs(same_size, force_mask=True)
    assert masks[-1] is not None and not masks[-1].any()
    for key in ("pred_logits", "pred_boxes", "ref_points"):
        assert torch.equal(skipped[key], masked[key]), key
    for a, b in zip(skipped["aux_outputs"], masked["aux_outputs"]):
        assert torch.equal(a["pred_boxes"], b["pred_boxes"]) and torch.equal(a["pred_logits"], b["pred_logits"])
    outputs(make_inputs([(128, 192), (128, 128)], with_instances=False))
    assert masks[-1] is not None and masks[-1].any()  # padded batches keep their mask


def test_inference_needs_no_annotations_and_uses_image_size():
    cfg = shrink(load_model_cfg("smca_single_scale_r50_50ep.py"))
    model = instantiate(cfg).eval()
    inputs = make_inputs([(96, 160)], with_instances=False)
    inputs[0]["height"], inputs[0]["width"] = 192, 320  # the original image was 2x larger
    with torch.no_grad():
        inst = model(inputs)[0]["instances"]
    assert inst.image_size == (192, 320)
    boxes = inst.pred_boxes.tensor
    assert (boxes[:, 2] <= 320).all() and (boxes[:, 3] <= 192).all()


def test_wrong_levels_and_bad_config_fail_clearly():
    cfg = shrink(load_model_cfg("smca_multi_scale_r50_50ep.py"))
    cfg.transformer.decoder.num_levels = 2
    with pytest.raises(ValueError, match="levels"):
        instantiate(cfg)
    cfg = shrink(load_model_cfg("smca_single_scale_r50_50ep.py"))
    cfg.transformer.decoder.scale_type = "type3"
    with pytest.raises(ValueError, match="scale_type"):
        instantiate(cfg)
    cfg = shrink(load_model_cfg("smca_single_scale_r50_50ep.py"))
    cfg.in_features = ["res4"]
    with pytest.raises(ValueError, match="res4"):
        instantiate(cfg)


def test_heads_run_in_float32_under_bf16_autocast():
    """Under CPU bfloat16 autocast the class and box heads and the reference addition are
    computed in float32: the boxes equal the float32 computation from the same decoder output."""
    torch.manual_seed(0)
    model = instantiate(shrink(load_model_cfg("smca_single_scale_r50_50ep.py"), layers=1)).eval()
    captured = {}
    model.transformer.register_forward_hook(lambda module, args, out: captured.update(hs=out[0], ref_logit=out[1]))
    images = ImageList.from_tensors([(torch.rand(3, 96, 128) * 255 - model.pixel_mean) / model.pixel_std], 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_outputs(images)
    assert out["pred_boxes"].dtype == out["pred_logits"].dtype == torch.float32
    with torch.no_grad():
        hs, ref_logit = captured["hs"][-1].float(), captured["ref_logit"].float()
        deltas = model.bbox_embed(hs)
        boxes = torch.cat([deltas[..., :2] + ref_logit, deltas[..., 2:]], dim=-1).sigmoid()
        logits = model.class_embed(hs)
    torch.testing.assert_close(out["pred_boxes"], boxes, rtol=0, atol=0)
    torch.testing.assert_close(out["pred_logits"], logits, rtol=0, atol=0)
    # Left to autocast, the box head would round its output to bfloat16.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = model.bbox_embed(hs)
    assert rounded.dtype == torch.bfloat16 and not torch.equal(rounded.float(), deltas)
    # The Gaussian centers (the reference logits) are float32 too.
    assert captured["ref_logit"].dtype == torch.float32
