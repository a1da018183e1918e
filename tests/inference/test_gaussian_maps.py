"""Gaussian weight maps and co-attention maps: capture, peaks at the predicted centers, pictures."""

import importlib.util
import os

import cv2
import numpy as np
import pytest
import torch
from tiny_smca import MULTI_SCALE_CONFIG, R18_CONFIG, REPO, TINY_OVERRIDES, random_image, tiny_config, write_checkpoint
from torch import nn

from smca_d2.inference import LazyPredictor
from smca_d2.inference.gaussian_maps import capture_decoder_layer, cells_to_image, compute_smca_maps, save_smca_maps
from smca_d2.modeling import attention, decoder

CONFIGS = {"single_scale": R18_CONFIG, "multi_scale": MULTI_SCALE_CONFIG}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def predictor(request):
    cfg = tiny_config(CONFIGS[request.param])
    cfg.dataloader.test.mapper.augmentations = []
    torch.manual_seed(0)
    predictor = LazyPredictor(cfg, "", device="cpu")
    # No per-head offsets in the last layer: every head's Gaussian is centered on the query's center.
    last = predictor.model.transformer.decoder.layers[-1]
    nn.init.zeros_(last.offset_head.weight)
    nn.init.zeros_(last.offset_head.bias)
    return predictor


def _expected_center_cells(predictor, image, stride):
    """The cell nearest to each query's center (x / stride, from the model's own ref_points)."""
    model = predictor.model
    with torch.no_grad():
        images = model.preprocess_image([predictor.preprocess(image)])
        ref = model.forward_outputs(images)["ref_points"][0]
    h, w = images.image_sizes[0]
    cells = ref * torch.tensor([w, h]) / stride
    return torch.floor(cells + 0.5).long().numpy(), ref.numpy()


def test_gaussian_peaks_at_the_predicted_center(predictor):
    image = random_image(96, 128)
    maps = compute_smca_maps(predictor, image, queries=range(predictor.model.num_queries))
    assert maps.num_levels == (3 if len(predictor.model.in_features) > 1 else 1)
    h, w = image.shape[:2]
    checked = 0
    for level, (stride, shape) in enumerate(zip(maps.level_strides, maps.level_shapes)):
        expected, ref = _expected_center_cells(predictor, image, stride)
        np.testing.assert_allclose(maps.centers, ref * [w, h], rtol=1e-5)
        gauss = maps.gaussian_cells[level]
        assert gauss.shape == (len(maps.queries), *shape) and gauss.max() <= 1.0 + 1e-6
        for i in range(len(maps.queries)):
            cx, cy = expected[i]
            if not (0 <= cx < shape[1] and 0 <= cy < shape[0]):
                continue  # the center is outside the feature map
            row, col = np.unravel_index(gauss[i].argmax(), shape)
            assert (row, col) == (cy, cx), (level, i)
            assert np.isclose(gauss[i, cy, cx], gauss[i].max())
            checked += 1
        # All heads share the center, in pixels: cell * stride.
        heads = maps.head_centers[level].shape[1]
        np.testing.assert_allclose(maps.head_centers[level], np.repeat(maps.centers[:, None], heads, 1), atol=1e-3)
    assert checked >= len(maps.queries) * maps.num_levels // 2


def test_maps_are_consistent_and_pictures_are_written(predictor, tmp_path):
    image = random_image(90, 120, seed=1)
    maps = compute_smca_maps(predictor, image, topk=3)
    assert len(maps.queries) == 3 and (np.diff(maps.scores) <= 0).all()
    for level in range(maps.num_levels):
        attn = maps.attention_cells[level]
        np.testing.assert_allclose(attn.sum((-1, -2)), 1.0, rtol=1e-4)  # a softmax per level
        assert maps.attention_image(level).shape == (3, 90, 120)
        assert maps.gaussian_image(level).shape == (3, 90, 120)
    if maps.num_levels > 1:
        np.testing.assert_allclose(maps.level_weights.sum(-1), 1.0, rtol=1e-5)
    paths = save_smca_maps(maps, str(tmp_path / "maps"))
    assert [os.path.basename(p) for p in paths] == [f"query{int(q):03d}.png" for q in maps.queries]
    assert all(os.path.getsize(p) > 1000 for p in paths)


def test_attention_matches_the_model(predictor):
    """Recomputed probabilities reproduce the layer's output when applied to the values."""
    model = predictor.model
    layer = model.transformer.decoder.layers[-1]
    captured = {}
    handle = layer.cross_attn.register_forward_hook(lambda m, args, out: captured.update(args=args, out=out))
    try:
        with torch.no_grad(), capture_decoder_layer(model) as capture:
            model.forward_outputs(model.preprocess_image([predictor.preprocess(random_image(64, 96))]))
    finally:
        handle.remove()
    attn = layer.cross_attn
    query, key, value, biases, level_sizes, level_weights = captured["args"]
    c = attn.embed_dim
    v = attn._heads(nn.functional.linear(value, attn.in_proj_weight[2 * c :], attn.in_proj_bias[2 * c :]))
    outs = [p @ v_l for p, v_l in zip(capture.attention, v.split(level_sizes, dim=2))]
    if len(outs) == 1:
        out = outs[0]
    else:
        out = sum(o * level_weights[:, None, :, i, None] for i, o in enumerate(outs))
    out = attn.out_proj(out.transpose(1, 2).flatten(2))
    torch.testing.assert_close(out, captured["out"], rtol=1e-4, atol=1e-5)
    # The model is left as it was.
    assert decoder.gaussian_log_weights is attention.gaussian_log_weights
    assert not layer._forward_hooks and not layer._forward_pre_hooks and not layer.cross_attn._forward_hooks


def test_cells_to_image_follows_the_model_convention():
    cells = np.arange(6, dtype=np.float32).reshape(2, 3)  # a 2x3 level of stride 16 on a 32x48 image
    full = cells_to_image(cells, 16, (32, 48), (32, 48))
    # pixel x is nearest to cell round(x / 16): cell 0 covers x < 8, cell 1 8..23, cell 2 24..47
    assert (full[0, :8] == 0).all() and (full[0, 8:24] == 1).all() and (full[0, 24:] == 2).all()
    assert (full[:8, 0] == 0).all() and (full[8:, 0] == 3).all()
    doubled = cells_to_image(cells, 16, (32, 48), (64, 96))  # original image twice the size
    assert (doubled[:, ::2][::2] == full).all()


def test_visualize_tool(tmp_path):
    path = os.path.join(REPO, "tools", "visualize_gaussian_maps.py")
    spec = importlib.util.spec_from_file_location("smca_d2_tool_visualize_gaussian_maps", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    ckpt, _ = write_checkpoint(tiny_config(), str(tmp_path / "tiny.pth"))
    cv2.imwrite(str(tmp_path / "photo.jpg"), random_image(72, 96))
    args = ["--config-file", R18_CONFIG, "--input", str(tmp_path / "photo.jpg"), "--output", str(tmp_path / "out")]
    args += ["--queries", "0", "5", "--device", "cpu", "--opts", *TINY_OVERRIDES, f"train.init_checkpoint={ckpt}"]
    assert tool.main(args) == 0
    assert sorted(os.listdir(tmp_path / "out" / "photo")) == ["query000.png", "query005.png"]
