"""The official code's multi-scale model (``Multi_scale_SMCA.zip`` of gaopengcuhk/SMCA-DETR): our
``ConvMultiScaleEncoder`` model, the conversion of its checkpoints, and (opt-in) equivalence with
the zip's code.

Without the official code, an "official-layout" state dict is made from our model with an
inverse key mapping written independently below, then converted back. With
``SMCA_OFFICIAL_MS_REPO`` naming the zip's code unzipped (the folder holding ``models/detr.py``;
never committed), the official model is built with seeded random weights, converted into ours,
and every decoder layer's outputs are compared on one image and on a padded batch.
"""

import argparse
import os
import re
import subprocess
import sys
import types

import pytest
import torch
from test_convert_official import COCO_IDS, randomize, raw_outputs, single_thread, to_official_key  # noqa: F401 (fixture)

from smca_d2.checkpoint import check_complete, convert_official_state_dict, is_official_multi_scale

from detectron2.config import LazyConfig, instantiate

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO_ROOT, "configs")
CONVERT_TOOL = os.path.join(REPO_ROOT, "tools", "convert_official_smca.py")
OFFICIAL_MS_REPO = os.environ.get("SMCA_OFFICIAL_MS_REPO")
TOL = 1e-4


def build_model(config="smca_conv_multi_scale_r50_50ep.py", num_classes=92, seed=0, small=True, **encoder):
    cfg = LazyConfig.load(os.path.join(CONFIGS, config))
    cfg.model.num_classes = num_classes
    if small:  # two encoder and three decoder layers: fast, and every kind of layer is there
        cfg.model.transformer.encoder.num_layers = 2
        cfg.model.transformer.decoder.num_layers = 3
    for key, value in encoder.items():
        setattr(cfg.model.transformer.encoder, key, value)
    torch.manual_seed(seed)
    return instantiate(cfg.model).eval()


# --- the zip's layout, written independently of smca_d2.checkpoint ------------------------------
STRIDES = (8, 16, 32, 64)
PROJECTIONS = ("input_proj_512", "input_proj_1024", "input_proj_2048", "input_proj_2048_3")


def to_official_ms_key(key, shared=True):
    """smca_d2 key -> the key of the zip's multi-scale model (``shared``: one pair of exchange
    convs for all levels, else one per pair of adjacent levels, numbered from 1)."""
    m = re.fullmatch(r"input_proj\.(\d)\.(weight|bias)", key)
    if m:
        return f"{PROJECTIONS[int(m.group(1))]}.{m.group(2)}"
    if key == "level_embed":
        return "transformer.level_embed"
    if key.startswith("transformer.encoder.fold_conv."):
        return "transformer.conv." + key.rsplit(".", 1)[1]
    m = re.fullmatch(r"transformer\.encoder\.layers\.(\d+)\.(\w+?)(?:\.(\d))?\.(weight|bias)", key)
    if m:
        layer, module, index, param = m.groups()
        prefix = f"transformer.encoder.layers.{layer}."
        if module == "level_convs":
            return f"{prefix}self_attn_{STRIDES[int(index)]}.{param}"
        if module in ("down_convs", "up_convs"):
            name = "high_to_low" if module == "down_convs" else "low_to_high"
            return f"{prefix}{name}.{param}" if shared else f"{prefix}{name}_{int(index) + 1}.{param}"
        return prefix + {"input_conv": "conv_1", "output_conv": "conv_2"}.get(module, module) + "." + param
    m = re.fullmatch(r"(transformer\.decoder\.layers\.\d+)\.scale_selection\.(weight|bias)", key)
    if m:
        return f"{m.group(1)}.point4.{m.group(2)}"
    return to_official_key(key)


def to_official_ms(state_dict, shared=True):
    return {to_official_ms_key(k, shared): v.clone() for k, v in state_dict.items()}


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(3)
    return [
        {"image": torch.rand((3, 128, 160), generator=gen) * 255, "height": 128, "width": 160},
        {"image": torch.rand((3, 96, 128), generator=gen) * 255, "height": 96, "width": 128},
    ]


@pytest.mark.parametrize("shared", [True, False], ids=["shared exchange (R50)", "one per pair (R101)"])
def test_round_trip_of_the_official_multi_scale_layout(shared, images):
    model = randomize(build_model(shared_exchange=shared, seed=1), seed=2)
    official = to_official_ms(model.state_dict(), shared=shared)
    assert is_official_multi_scale(official) and not is_official_multi_scale(
        {k: v for k, v in official.items() if not k.startswith("input_proj_2048_3.")}
    )
    names = "".join(official)
    assert "transformer.conv.weight" in official and "transformer.decoder.layers.0.point4.weight" in official
    assert ("high_to_low_2" in names) != shared and "self_attn_64" in names and "conv_1" in names
    converted = convert_official_state_dict(official, num_classes=92)
    other = build_model(shared_exchange=shared, seed=5)
    assert check_complete(converted, other).ok
    other.load_state_dict(converted, strict=True)
    for ref, out in zip(raw_outputs(model, images), raw_outputs(other, images)):
        torch.testing.assert_close(out["pred_logits"], ref["pred_logits"], rtol=0, atol=0)
        torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"], rtol=0, atol=0)
    # 80 classes: the rows of the COCO ids.
    converted80 = convert_official_state_dict(official, num_classes=80)
    torch.testing.assert_close(converted80["class_embed.weight"], official["class_embed.weight"][COCO_IDS])


def test_unknown_multi_scale_keys_are_listed():
    official = to_official_ms(build_model(seed=1).state_dict())
    official["transformer.encoder.layers.0.self_attn_128.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"(?s)multi-scale \(Multi_scale_SMCA.zip\).*self_attn_128"):
        convert_official_state_dict(official)


def test_cli_picks_the_conv_multi_scale_config(tmp_path):
    """The tool recognises the zip's model and checks the result against the R50 config's model."""
    official = to_official_ms(build_model(small=False, seed=1).state_dict())
    src, dst = tmp_path / "official.pth", tmp_path / "converted.pth"
    torch.save({"model": official, "epoch": 49, "args": argparse.Namespace(dim_feedforward=1024)}, src)
    proc = subprocess.run(
        [sys.executable, CONVERT_TOOL, "--input", str(src), "--output", str(dst)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the multi-scale SMCA of Multi_scale_SMCA.zip" in proc.stdout
    assert "checked against smca_conv_multi_scale_r50_50ep.py" in proc.stdout and "shapes match" in proc.stdout
    assert "40,760,430 trainable" in proc.stdout  # the official 40,763,514 less 12 class rows
    assert dst.stat().st_size > 0


def test_the_configs_have_the_official_models_size():
    """Trainable parameters with the official 92 class columns: the counts in the zip's training
    logs of the R50 (44.4 AP) and R101 (45.7 AP) runs."""
    for config, expected in [
        ("smca_conv_multi_scale_r50_50ep.py", 40_763_514),
        ("smca_conv_multi_scale_r101_50ep.py", 60_010_618),
    ]:
        model = build_model(config, small=False)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected, config


def test_the_folded_level_needs_halved_sizes():
    from smca_d2.modeling import ConvMultiScaleEncoder

    encoder = ConvMultiScaleEncoder(num_layers=1, num_levels=2, d_model=8, dim_feedforward=16, kernel_size=3)
    src = torch.randn(1, 4 * 6 + 3 * 3, 8)
    with pytest.raises(ValueError, match="half the size"):
        encoder(src, torch.zeros_like(src), None, [(4, 6), (3, 3)])
    with pytest.raises(ValueError, match="2 levels, got 1"):
        encoder(src[:, :24], src[:, :24], None, [(4, 6)])
    with pytest.raises(ValueError, match="odd"):
        ConvMultiScaleEncoder(kernel_size=4)


# --- the zip's own code (opt-in) --------------------------------------------------------------
needs_official = pytest.mark.skipif(
    not OFFICIAL_MS_REPO, reason="set SMCA_OFFICIAL_MS_REPO to the unzipped Multi_scale_SMCA.zip code"
)
# The zip's scale selection weighs every image's levels with batch element 0's weights. Replaced,
# in a copy of the module made at run time, by each image's own weights (query-major rows, as the
# attention weights are laid out [batch * heads, queries, keys]).
BATCH_ZERO = "scale_attention[:, 0, {k}].unsqueeze(0).unsqueeze(-1)"
PER_IMAGE = "scale_attention[:, :, {k}].t().repeat_interleave(num_heads, 0).unsqueeze(-1)"


def _official_module(name, fix_batch_bug):
    """The zip's ``models/<name>.py`` as a module: as it is, or with the batch-0 weights fixed."""
    import importlib

    module = importlib.import_module(f"models.{name}")
    if not fix_batch_bug:
        return module
    with open(module.__file__) as f:
        source = f.read()
    for k in range(4):
        assert BATCH_ZERO.format(k=k) in source, "the zip's code is not the expected version"
        source = source.replace(BATCH_ZERO.format(k=k), PER_IMAGE.format(k=k))
    fixed = types.ModuleType(f"models.{name}_per_image")
    fixed.__package__ = "models"
    exec(compile(source, module.__file__, "exec"), fixed.__dict__)
    return fixed


def build_official(fix_batch_bug, seed=0, transformer="transformer_44_dot_4"):
    """The zip's 44.4 AP R50 model (models/transformer_44_dot_4.py, 6 encoder layers, FFN 1024,
    300 queries), with seeded random weights; its code imported from SMCA_OFFICIAL_MS_REPO.
    ``transformer="transformer"``: the zip's later encoder (one exchange conv per pair of levels,
    kernel 5), which its detr.py imports."""
    import pdb

    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    from official_harness import import_official, official_args, randomize_official

    official_backbone, official_detr, official_misc = import_official(OFFICIAL_MS_REPO)
    official_backbone.is_main_process = lambda: False  # no ImageNet download
    pdb.set_trace = lambda *args, **kwargs: None  # models/backbone.py stops in its forward
    official_detr.build_transformer = _official_module(transformer, fix_batch_bug).build_transformer
    args = official_args("cpu", dim_feedforward=1024, enc_layers=6)
    args.head_mixture = args.query_mixture = False
    torch.manual_seed(seed)
    model, _, _ = official_detr.build(args)
    randomize_official(model, seed)
    return model.eval(), official_misc


def _compare(ours, official, tol=TOL):
    """Max |difference| of logits and boxes over every decoder layer, per image."""
    from check_official_equivalence import _layers

    diffs = []
    for a, b in zip(_layers(ours), _layers(official)):
        diffs.append(
            torch.stack(
                [
                    (a["pred_logits"] - b["pred_logits"]).abs().flatten(1).max(1).values,
                    (a["pred_boxes"] - b["pred_boxes"]).abs().flatten(1).max(1).values,
                ]
            )
        )
    return torch.stack(diffs).amax(dim=(0, 1))  # per image


@needs_official
def test_equivalence_with_the_official_multi_scale_code(capsys):
    from official_harness import run_official, synthetic_image

    official, misc = build_official(fix_batch_bug=False)
    official_fixed, _ = build_official(fix_batch_bug=True)
    converted = convert_official_state_dict(official.state_dict(), num_classes=92)
    ours = build_model(small=False, seed=9)
    assert check_complete(converted, ours).ok
    ours.load_state_dict(converted, strict=True)

    def run_ours(images):
        inputs = [{"image": img, "height": img.shape[-2], "width": img.shape[-1]} for img in images]
        with torch.no_grad():
            return ours.forward_outputs(ours.preprocess_image(inputs))

    one = [synthetic_image(320, 480, seed=1)]
    # A padded batch of two sizes (at these sizes the stride-64 padding masks of both models
    # agree: the official code derives that level's mask from stride 32's, ours from the pixels).
    batch = [synthetic_image(320, 480, seed=2), synthetic_image(288, 416, seed=3)]
    with torch.no_grad():
        single = _compare(run_ours(one), run_official(official, misc, one, "cpu"))
        ours_batch = run_ours(batch)
        padded = _compare(ours_batch, run_official(official_fixed, misc, batch, "cpu"))
        as_released = _compare(ours_batch, run_official(official, misc, batch, "cpu"))
    with capsys.disabled():
        print(
            f"\nmax |ours - official| over every decoder layer's logits and boxes: one image {float(single[0]):.2e}; "
            f"padded batch (official with per-image level weights) {float(padded.max()):.2e}; "
            f"padded batch (official as released) image 0 {float(as_released[0]):.2e}, image 1 {float(as_released[1]):.2e}"
        )
    assert float(single.max()) <= TOL
    assert float(padded.max()) <= TOL
    # The released code's only difference: its second image gets the first image's level weights.
    assert float(as_released[0]) <= TOL and float(as_released[1]) > 100 * TOL


@needs_official
def test_equivalence_with_the_official_per_pair_exchange_convs():
    """The layout of the authors' R101 run (one down and one up conv per pair of levels), as the
    zip's models/transformer.py has it (kernel 5), on one image."""
    from official_harness import run_official, synthetic_image

    official, misc = build_official(fix_batch_bug=False, transformer="transformer")
    converted = convert_official_state_dict(official.state_dict(), num_classes=92)
    ours = build_model(small=False, seed=9, kernel_size=5, shared_exchange=False)
    ours.load_state_dict(converted, strict=True)
    image = synthetic_image(256, 320, seed=4)
    with torch.no_grad():
        out = ours.forward_outputs(ours.preprocess_image([{"image": image}]))
        diff = _compare(out, run_official(official, misc, [image], "cpu"))
    assert float(diff.max()) <= TOL
