"""The paper's ablation options and their configs: head-shared modulation, scale selection off,
per-level intra-scale attention, per-level Gaussian bandwidths, no auxiliary losses.

Each option is checked against an equivalent model built without it (same outputs once the
weights are made to agree), so a test fails if the option changes anything but what it says."""

import glob
import os

import pytest
import torch
from test_smca_model import REPO, load_model_cfg, make_inputs, shrink

from smca_d2.inference.gaussian_maps import wrapped_gaussian_log_weights
from smca_d2.modeling import MultiScaleEncoder, SMCADecoder

from detectron2.config import LazyConfig, instantiate

ABLATIONS = sorted(glob.glob(os.path.join(REPO, "configs", "ablations", "*.py")))


def _decoder_inputs(levels=((4, 6), (2, 3)), batch=2, queries=5, d_model=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in levels)
    memory = torch.randn(batch, tokens, d_model, generator=g)
    pos = torch.randn(batch, tokens, d_model, generator=g)
    query_pos = torch.randn(batch, queries, d_model, generator=g)
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    mask[1, :3] = True  # some padded keys in the second image
    strides = [16 * 2**i for i in range(len(levels))]
    image_wh = torch.tensor([[96.0, 64.0], [80.0, 48.0]])[:batch]
    return memory, pos, query_pos, mask, list(levels), strides, image_wh


def _decoder(seed=0, **kwargs):
    torch.manual_seed(seed)
    args = dict(num_layers=2, d_model=16, nhead=4, dim_feedforward=32, dropout=0.0, num_levels=2)
    args.update(kwargs)
    decoder = SMCADecoder(**args).eval()
    with torch.no_grad():  # non-trivial scales (the init gives 1 everywhere)
        for layer in decoder.layers:
            if layer.scale_head is not None:
                layer.scale_head.weight.normal_(0, 0.2)
    return decoder


@pytest.mark.parametrize("scale_type", ["fixed", "single", "independent"])
def test_head_shared_modulation_is_one_gaussian_for_all_heads(scale_type):
    shared = _decoder(head_shared=True, scale_type=scale_type)
    specific = _decoder(head_shared=False, scale_type=scale_type)
    layer = shared.layers[0]
    assert layer.offset_head.out_features == 2 * 2  # levels x (x, y), no head dimension
    if scale_type != "fixed":
        assert layer.scale_head.out_features == 2 * ("fixed", "single", "independent").index(scale_type)
    # A head-specific decoder whose heads all get the shared offset and scales is the same model.
    state = shared.state_dict()
    for key, value in list(state.items()):
        if ".offset_head." in key or ".scale_head." in key:
            per_level = value.view(2, 1, -1, *value.shape[1:])  # [levels, 1 head, channels, ...]
            state[key] = per_level.expand(2, 4, *per_level.shape[2:]).reshape(-1, *value.shape[1:])
    specific.load_state_dict(state)
    inputs = _decoder_inputs()
    with torch.no_grad():
        hs_shared, ref_shared = shared(*inputs)
        hs_specific, ref_specific = specific(*inputs)
    torch.testing.assert_close(hs_shared, hs_specific, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_shared, ref_specific)

    calls = []
    wrap = lambda original: lambda *a, **k: calls.append(original(*a, **k)) or calls[-1]
    with torch.no_grad(), wrapped_gaussian_log_weights(wrap):
        shared(*inputs)
    assert calls and all(bias.shape[1] == 1 for bias in calls)  # one map, broadcast to the heads


def test_without_scale_selection_the_levels_are_averaged():
    selected = _decoder(scale_selection=True)
    averaged = _decoder(scale_selection=False)
    assert all(layer.scale_selection is None for layer in averaged.layers)
    with torch.no_grad():  # scale selection with constant logits gives every level 1/2
        for layer in selected.layers:
            layer.scale_selection.weight.zero_()
            layer.scale_selection.bias.fill_(0.3)
    missing, unexpected = averaged.load_state_dict(selected.state_dict(), strict=False)
    assert not missing and unexpected and all(".scale_selection." in k for k in unexpected)
    inputs = _decoder_inputs()
    with torch.no_grad():
        torch.testing.assert_close(averaged(*inputs)[0], selected(*inputs)[0], rtol=1e-5, atol=1e-5)
        selected.layers[1].scale_selection.bias[0] = 2.0  # now the levels are weighed differently
        assert not torch.allclose(averaged(*inputs)[0], selected(*inputs)[0], atol=1e-3)


def test_per_level_gaussian_bandwidths():
    inputs = _decoder_inputs()
    seen = []

    def recording(original):
        def record(centers, scales, feature_shape, beta, key_padding_mask=None):
            seen.append((tuple(feature_shape), beta))
            return original(centers, scales, feature_shape, beta, key_padding_mask)

        return record

    with torch.no_grad(), wrapped_gaussian_log_weights(recording):
        per_level = _decoder(beta=[4.0, 16.0])(*inputs)[0]
    assert seen == [((4, 6), 4.0), ((2, 3), 16.0)] * 2  # two layers, each level its own beta
    with torch.no_grad():
        same = _decoder(beta=[8.0, 8.0])(*inputs)[0]
        one = _decoder(beta=8.0)(*inputs)[0]
    torch.testing.assert_close(same, one, rtol=0, atol=0)
    assert not torch.allclose(per_level, one, atol=1e-3)
    for bad in (0.0, -1.0, [8.0], [8.0, 0.0], [8.0, 8.0, 8.0]):
        with pytest.raises(ValueError, match="beta"):
            _decoder(beta=bad)


def _encoder_inputs(levels=((3, 4), (2, 3), (1, 2)), batch=2, d_model=16):
    g = torch.Generator().manual_seed(1)
    tokens = sum(h * w for h, w in levels)
    src = torch.randn(batch, tokens, d_model, generator=g)
    pos = torch.randn(batch, tokens, d_model, generator=g)
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    mask[1, 10:12] = True
    return src, pos, mask, list(levels)


def test_per_level_intra_scale_attention():
    blocks = ["intra", "multi", "intra"]
    kwargs = dict(block_types=blocks, d_model=16, nhead=4, dim_feedforward=32, dropout=0.0)
    shared = MultiScaleEncoder(**kwargs).eval()
    per_level = MultiScaleEncoder(intra_attention="per_level", num_levels=3, **kwargs).eval()
    assert [len(b) if isinstance(b, torch.nn.ModuleList) else 1 for b in per_level.layers] == [3, 1, 3]
    params = lambda m: sum(p.numel() for p in m.parameters())
    assert params(per_level) == params(shared) // 3 * 7  # 3 + 1 + 3 layers instead of 3
    # With each level's layer a copy of the shared one, it is the shared encoder.
    state = {}
    for key, value in shared.state_dict().items():
        block, rest = key.split(".", 2)[1:]
        if blocks[int(block)] == "intra":
            state.update({f"layers.{block}.{level}.{rest}": value for level in range(3)})
        else:
            state[key] = value
    per_level.load_state_dict(state)
    inputs = _encoder_inputs()
    with torch.no_grad():
        torch.testing.assert_close(per_level(*inputs), shared(*inputs), rtol=1e-5, atol=1e-5)
        # The levels' layers are separate: changing the coarsest level's leaves the finest alone.
        before = per_level(*inputs)
        per_level.layers[2][2].linear2.weight.mul_(2.0)
        after = per_level(*inputs)
    assert torch.equal(after[:, :12], before[:, :12]) and not torch.allclose(after[:, 18:], before[:, 18:])
    with pytest.raises(ValueError, match="3 levels, got 2"):
        per_level(inputs[0][:, :18], inputs[1][:, :18], inputs[2][:, :18], [(3, 4), (2, 3)])
    with pytest.raises(ValueError, match="num_levels"):
        MultiScaleEncoder(intra_attention="per_level", **kwargs)
    with pytest.raises(ValueError, match="intra_attention"):
        MultiScaleEncoder(intra_attention="separate", num_levels=3, **kwargs)


def test_without_aux_loss_only_the_last_layer_is_supervised():
    cfg = shrink(load_model_cfg("smca_single_scale_r50_50ep.py"), layers=3)
    cfg.transformer.decoder.dropout = 0.0
    torch.manual_seed(0)
    with_aux = instantiate(cfg)
    cfg.aux_loss = False
    without = instantiate(cfg)
    without.load_state_dict(with_aux.state_dict())
    inputs = make_inputs([(96, 128), (64, 96)])
    losses_with, losses_without = with_aux.train()(inputs), without.train()(inputs)
    assert set(losses_without) == {"loss_class", "loss_bbox", "loss_giou"}
    assert {"loss_class_0", "loss_class_1"} <= set(losses_with)
    for key in losses_without:  # the last layer's losses are the same
        torch.testing.assert_close(losses_without[key], losses_with[key])
    with torch.no_grad():
        out_with = with_aux.eval()(inputs)
        out_without = without.eval()(inputs)
    for a, b in zip(out_with, out_without):
        torch.testing.assert_close(a["instances"].scores, b["instances"].scores)
        torch.testing.assert_close(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)


# Each ablation config: the config it is derived from and what differs, as built modules.
def _head_shared(model):
    layer = model.transformer.decoder.layers[0]
    return layer.offset_head.out_features == 2 * model.transformer.decoder.num_levels


def _scale_channels(model):
    head = model.transformer.decoder.layers[0].scale_head
    return 0 if head is None else head.out_features // (1 if _head_shared(model) else 8)


EXPECTED = {
    "smca_single_scale_r50_50ep_head_shared_fixed.py": lambda m: _head_shared(m) and _scale_channels(m) == 0,
    "smca_single_scale_r50_50ep_head_shared_single.py": lambda m: _head_shared(m) and _scale_channels(m) == 1,
    "smca_single_scale_r50_50ep_head_shared_indep.py": lambda m: _head_shared(m) and _scale_channels(m) == 2,
    "smca_single_scale_r50_50ep_head_specific_fixed.py": lambda m: not _head_shared(m) and _scale_channels(m) == 0,
    "smca_single_scale_r50_50ep_head_specific_single.py": lambda m: not _head_shared(m) and _scale_channels(m) == 1,
    "smca_single_scale_r50_50ep_no_aux_loss.py": lambda m: not m.aux_loss,
    "smca_multi_scale_r50_50ep_no_scale_selection.py": lambda m: (
        m.transformer.decoder.layers[0].scale_selection is None
    ),
    "smca_multi_scale_r50_50ep_encoder_all_intra.py": lambda m: m.transformer.encoder.block_types == ["intra"] * 5,
    "smca_multi_scale_r50_50ep_encoder_all_multi.py": lambda m: m.transformer.encoder.block_types == ["multi"] * 5,
    "smca_multi_scale_r50_50ep_intra_per_level.py": lambda m: len(m.transformer.encoder.layers[0]) == 3,
}


def test_every_ablation_config_is_checked():
    assert sorted(os.path.basename(p) for p in ABLATIONS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", ABLATIONS, ids=[os.path.basename(p) for p in ABLATIONS])
def test_ablation_config_builds_the_variant_and_trains(path):
    cfg = LazyConfig.load(path)
    model_cfg = cfg.model
    model_cfg.num_queries = 12
    model_cfg.transformer.decoder.num_layers = 2
    model_cfg.transformer.decoder.dim_feedforward = 64
    if "num_layers" in model_cfg.transformer.encoder:
        model_cfg.transformer.encoder.num_layers = 1
    torch.manual_seed(0)
    model = instantiate(model_cfg).train()
    assert EXPECTED[os.path.basename(path)](model)
    losses = model(make_inputs([(96, 128), (64, 96)], num_classes=model.num_classes))
    assert all(torch.isfinite(v) for v in losses.values())


def test_readme_overrides_for_the_block_order_and_per_level_bandwidths():
    """The overrides README shows for other encoder block orders and per-level bandwidths."""
    from smca_d2.engine import load_config

    overrides = [
        "model.transformer.encoder.block_types=[intra,multi,multi,intra,intra]",
        "model.transformer.decoder.beta=[8,8,8]",
    ]
    cfg = load_config(os.path.join(REPO, "configs", "smca_multi_scale_r50_50ep.py"), overrides)
    transformer = instantiate(cfg.model.transformer)
    assert transformer.encoder.block_types == ["intra", "multi", "multi", "intra", "intra"]
    assert transformer.decoder.betas == [8.0, 8.0, 8.0]
