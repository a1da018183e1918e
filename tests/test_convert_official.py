"""Conversion of official SMCA-DETR checkpoints (smca_d2.checkpoint, tools/convert_official_smca.py).

The official code is not available here, so an "official-layout" state dict is made from our own
model with an inverse key mapping written independently below, then converted back.
"""

import argparse
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from smca_d2.checkpoint import (
    SafeCheckpointer,
    UnsafeCheckpointError,
    check_complete,
    convert_official_state_dict,
    load_official_checkpoint,
)

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO_ROOT, "configs", "smca_single_scale_r50_50ep.py")
CONVERT_TOOL = os.path.join(REPO_ROOT, "tools", "convert_official_smca.py")

# COCO category ids that are not used by any of the 80 classes (ids 0..90).
UNUSED_COCO_IDS = {0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO_IDS = [i for i in range(1, 91) if i not in UNUSED_COCO_IDS]


# The real single-scale R50 model with fewer transformer layers (fast); 3 decoder layers keep
# the first (center-predicting) layer and two later ones.
ENCODER_LAYERS, DECODER_LAYERS = 2, 3
SMALL_CONFIG = f"""
from detectron2.config import LazyConfig

model = LazyConfig.load({CONFIG!r}).model
model.transformer.encoder.num_layers = {ENCODER_LAYERS}
model.transformer.decoder.num_layers = {DECODER_LAYERS}
"""


def build_model(num_classes, seed=0):
    cfg = LazyConfig.load(CONFIG)
    cfg.model.transformer.encoder.num_layers = ENCODER_LAYERS
    cfg.model.transformer.decoder.num_layers = DECODER_LAYERS
    cfg.model.num_classes = num_classes
    torch.manual_seed(seed)
    return instantiate(cfg.model).eval()


@torch.no_grad()
def randomize(model, seed):
    """Distinct random values in every parameter and buffer (frozen-BN statistics included), so
    that any two tensors swapped by a mapping would be noticed."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
        elif re.search(r"norm\d?\.weight$", name):  # frozen BN and LayerNorm scales
            t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + 0.75)
        else:
            t.add_(torch.randn(t.shape, generator=gen) * 0.02)
    return model


# --- the official layout, written independently of smca_d2.checkpoint -------------------------
def to_official_key(key):
    """smca_d2 key -> the key the official (DETR-style, torchvision ResNet) model uses."""
    bn = r"(weight|bias|running_mean|running_var)"
    rules = [
        (r"backbone\.stem\.conv1\.weight", "backbone.0.body.conv1.weight"),
        (rf"backbone\.stem\.conv1\.norm\.{bn}", r"backbone.0.body.bn1.\1"),
        (r"backbone\.res(\d)\.(\d+)\.shortcut\.weight", None),
        (rf"backbone\.res(\d)\.(\d+)\.shortcut\.norm\.{bn}", None),
        (r"backbone\.res(\d)\.(\d+)\.conv(\d)\.weight", None),
        (rf"backbone\.res(\d)\.(\d+)\.conv(\d)\.norm\.{bn}", None),
        (r"input_proj\.0\.(weight|bias)", r"input_proj.\1"),
    ]
    for pattern, repl in rules:
        m = re.fullmatch(pattern, key)
        if not m:
            continue
        if repl is not None:
            return m.expand(repl)
        layer = f"backbone.0.body.layer{int(m.group(1)) - 1}.{m.group(2)}"
        if ".shortcut." in key:
            return (
                f"{layer}.downsample.0.weight"
                if key.endswith("shortcut.weight")
                else f"{layer}.downsample.1.{m.group(3)}"
            )
        if ".norm." in key:
            return f"{layer}.bn{m.group(3)}.{m.group(4)}"
        return f"{layer}.conv{m.group(3)}.weight"
    assert key.startswith(("transformer.", "class_embed.", "bbox_embed.", "query_embed.")), key
    official_names = {
        "cross_attn": "multihead_attn",
        "modulation_norm": "norm4",
        "center_head": "point1",
        "offset_head": "point2",
        "scale_head": "point3",
    }
    m = re.fullmatch(r"(transformer\.decoder\.layers\.\d+)\.(\w+)\.(.*)", key)
    if m and m.group(2) in official_names:
        return f"{m.group(1)}.{official_names[m.group(2)]}.{m.group(3)}"
    return key


def to_official(state_dict):
    return {to_official_key(k): v.clone() for k, v in state_dict.items()}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: on a small, busy CPU, OpenMP threads waiting on each other make these
    small forward passes many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model92():
    return randomize(build_model(92, seed=1), seed=2)


@pytest.fixture(scope="module")
def model80():
    """An 80-class model to load converted checkpoints into (its own weights are overwritten)."""
    return build_model(80, seed=7)


@pytest.fixture(scope="module")
def official_sd(model92):
    return to_official(model92.state_dict())


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(3)
    return [
        {"image": torch.rand((3, 64, 96), generator=gen) * 255, "height": 64, "width": 96},
        {"image": torch.rand((3, 80, 64), generator=gen) * 255, "height": 80, "width": 64},
    ]


@pytest.fixture(scope="module")
def reference(model92, images):
    """Raw outputs (every decoder layer) of the 92-class model on the two images, batched."""
    return raw_outputs(model92, images)


def raw_outputs(model, inputs):
    with torch.no_grad():
        out = model.forward_outputs(model.preprocess_image(inputs))
    return [out] + out["aux_outputs"]


# --- tests ---------------------------------------------------------------------------------------
def test_official_layout_looks_official(official_sd):
    for key in (
        "backbone.0.body.conv1.weight",
        "backbone.0.body.bn1.running_var",
        "backbone.0.body.layer1.0.downsample.0.weight",
        "backbone.0.body.layer1.0.downsample.1.running_mean",
        "backbone.0.body.layer4.2.bn3.bias",
        "backbone.0.body.layer3.5.conv2.weight",
        "transformer.decoder.layers.0.point1.layers.2.weight",
        "transformer.decoder.layers.2.point3.bias",
        "transformer.decoder.norm.weight",
        "input_proj.weight",
        "query_embed.weight",
    ):
        assert key in official_sd, key
    assert len(official_sd) == 500 - 12 * 4 - 24 * 3  # 4 encoder and 3 decoder layers fewer
    assert official_sd["class_embed.weight"].shape == (92, 256)


def test_round_trip_gives_identical_model(model92, official_sd, images, reference):
    converted = convert_official_state_dict(official_sd, num_classes=92)
    expected = model92.state_dict()
    assert list(converted) and set(converted) == set(expected)
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key
    assert check_complete(converted, model92).ok

    fresh = build_model(92, seed=5)
    fresh.load_state_dict(converted, strict=True)
    for ref, out in zip(reference, raw_outputs(fresh, images)):
        assert torch.equal(ref["pred_logits"], out["pred_logits"])
        assert torch.equal(ref["pred_boxes"], out["pred_boxes"])


def test_80_classes_pick_rows_by_coco_id(official_sd):
    sd = dict(official_sd)
    # Row r of the official head is recognisable: weight filled with r, bias r.
    sd["class_embed.weight"] = torch.arange(92, dtype=torch.float32)[:, None].repeat(1, 256)
    sd["class_embed.bias"] = torch.arange(92, dtype=torch.float32)
    out = convert_official_state_dict(sd, num_classes=80)
    assert out["class_embed.weight"].shape == (80, 256)
    rows = out["class_embed.bias"].long().tolist()
    assert rows == COCO_IDS
    assert rows[0] == 1  # person
    assert rows[11] == 13  # stop sign (id 12 is unused)
    assert rows[79] == 90  # toothbrush
    assert torch.equal(out["class_embed.weight"][:, 0], out["class_embed.bias"])

    out91 = convert_official_state_dict(sd, num_classes=91)
    assert out91["class_embed.bias"].long().tolist() == list(range(91))  # no-object row dropped
    out92 = convert_official_state_dict(sd, num_classes=92)
    assert torch.equal(out92["class_embed.weight"], sd["class_embed.weight"])

    with pytest.raises(ValueError, match="num_classes=81"):
        convert_official_state_dict(sd, num_classes=81)


def test_80_class_model_matches_selected_columns(model80, official_sd, images, reference):
    model80.load_state_dict(convert_official_state_dict(official_sd, num_classes=80), strict=True)
    for ref, out in zip(reference, raw_outputs(model80, images)):
        torch.testing.assert_close(out["pred_logits"], ref["pred_logits"][..., COCO_IDS], rtol=0, atol=1e-6)
        torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"], rtol=0, atol=1e-6)


def test_unknown_keys_are_listed(official_sd):
    sd = dict(official_sd)
    sd["transformer.encoder.norm.weight"] = torch.ones(256)  # a pre-norm model's
    sd["backbone.0.body.fc.weight"] = torch.ones(1000, 2048)  # torchvision's classifier
    with pytest.raises(ValueError) as info:
        convert_official_state_dict(sd, num_classes=92)
    message = str(info.value)
    assert "transformer.encoder.norm.weight" in message and "backbone.0.body.fc.weight" in message
    assert "2 key(s)" in message


def test_shape_mismatch_and_missing_keys_are_errors(model92, official_sd):
    sd = dict(official_sd)
    sd["transformer.decoder.layers.1.point3.weight"] = torch.zeros(8, 256)  # "type2" scales
    del sd["transformer.decoder.layers.2.linear1.bias"]
    with pytest.raises(ValueError) as info:
        convert_official_state_dict(sd, num_classes=92, model=model92)
    message = str(info.value)
    assert "transformer.decoder.layers.1.scale_head.weight checkpoint [8, 256] vs model [16, 256]" in message
    assert "missing (1): transformer.decoder.layers.2.linear1.bias" in message

    report = check_complete(convert_official_state_dict(sd, num_classes=92), model92)
    assert not report.ok
    assert report.missing == ["transformer.decoder.layers.2.linear1.bias"]
    assert [k for k, _, _ in report.shape_mismatches] == ["transformer.decoder.layers.1.scale_head.weight"]

    bad_head = dict(official_sd)
    bad_head["class_embed.bias"] = torch.zeros(91)
    with pytest.raises(ValueError, match="malformed class head"):
        convert_official_state_dict(bad_head, num_classes=80)


def test_official_main_checkpoint_with_namespace_loads(official_sd, tmp_path):
    path = tmp_path / "checkpoint.pth"
    args = argparse.Namespace(dynamic_scale="type3", smooth=8.0, num_queries=300, lr_drop=40, output_dir="out")
    torch.save(
        {
            "model": official_sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            "lr_scheduler": {"step_size": 40, "last_epoch": 50},
            "epoch": 49,
            "args": args,
        },
        path,
    )
    sd = load_official_checkpoint(str(path))
    assert set(sd) == set(official_sd)
    assert all(torch.equal(sd[k], official_sd[k]) for k in ("input_proj.weight", "class_embed.bias"))

    bare = tmp_path / "bare.pth"
    torch.save({"input_proj.bias": official_sd["input_proj.bias"]}, bare)
    assert list(load_official_checkpoint(str(bare))) == ["input_proj.bias"]


class _RunsCode:
    """Unpickling this would call os.system (a harmless `touch` here)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_executing_pickle_is_refused(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"input_proj.bias": torch.zeros(2)}, "args": _RunsCode(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*system"):
        load_official_checkpoint(str(path))
    assert not marker.exists()


def test_cli_writes_a_detectron2_checkpoint(model80, official_sd, images, reference, tmp_path):
    config = tmp_path / "small_config.py"
    config.write_text(SMALL_CONFIG)
    src = tmp_path / "official.pth"
    torch.save({"model": official_sd, "epoch": 0, "args": argparse.Namespace(dynamic_scale="type3")}, src)
    dst = tmp_path / "out" / "smca_d2.pth"
    proc = subprocess.run(
        [
            sys.executable,
            CONVERT_TOOL,
            "--input",
            str(src),
            "--output",
            str(dst),
            "--num-classes",
            "80",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"converted {len(official_sd)} keys" in proc.stdout and "shapes match" in proc.stdout
    assert "92 official rows -> 80 classes" in proc.stdout

    saved = torch.load(dst, map_location="cpu", weights_only=True)
    assert saved["__author__"] == "smca_d2 convert_official_smca"

    with torch.no_grad():  # forget any earlier weights
        for t in model80.state_dict().values():
            t.zero_()
    # strict: any missing, unexpected or mis-shaped tensor is an error
    SafeCheckpointer(model80, strict=True).load(str(dst))
    DetectionCheckpointer(model80).load(str(dst))  # plain detectron2 reads it too
    for ref, out in zip(reference, raw_outputs(model80, images)):
        torch.testing.assert_close(out["pred_logits"], ref["pred_logits"][..., COCO_IDS], rtol=0, atol=1e-6)


def test_cli_refuses_code_executing_pickle(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convert_official_smca", CONVERT_TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": _RunsCode(tmp_path / "executed")}, evil)
    assert tool.main(["--input", str(evil), "--output", str(tmp_path / "x.pth"), "--no-check"]) == 1
    assert "refusing to load" in capsys.readouterr().err
    assert not (tmp_path / "executed").exists() and not (tmp_path / "x.pth").exists()


def test_checkpoint_with_the_official_decoder_names_loads_renamed(model92, tmp_path):
    """smca_d2 0.1 wrote the decoder modules under the official names (point1, norm4, ...)."""
    old_names = {
        k.replace(".center_head.", ".point1.")
        .replace(".offset_head.", ".point2.")
        .replace(".scale_head.", ".point3.")
        .replace(".modulation_norm.", ".norm4.")
        .replace(".cross_attn.", ".multihead_attn."): v
        for k, v in model92.state_dict().items()
    }
    assert "transformer.decoder.layers.0.point1.layers.0.weight" in old_names
    path = tmp_path / "model_0.1.pth"
    torch.save({"model": old_names, "model_ema": old_names}, path)
    fresh = build_model(92, seed=7)
    SafeCheckpointer(fresh, strict=True).load(str(path))
    for key, value in model92.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
