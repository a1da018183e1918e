"""tools/analyze_model.py on every config; tools/convert_torchvision_resnet.py on a torchvision R50."""

import contextlib
import glob
import io
import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import load_script
from torch import nn

from smca_d2.checkpoint import convert_torchvision_resnet
from smca_d2.speedups.memory import glibc_malloc

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
R50_CONFIG = os.path.join(REPO, "configs", "smca_single_scale_r50_50ep.py")

# Trainable parameters (80 classes), as in README.md. R101 adds 17 res4 bottleneck blocks:
# 1024*256 + 256*256*9 + 256*1024 = 1,114,112 weights each (FrozenBN has no parameters).
R101_EXTRA = 17 * 1_114_112
TRAINABLE = {
    "smca_single_scale_r50_50ep.py": 41_534_998,
    "smca_single_scale_r50_108ep.py": 41_534_998,
    "smca_single_scale_r101_50ep.py": 41_534_998 + R101_EXTRA,
    "smca_multi_scale_r50_50ep.py": 39_526_824,
    "smca_multi_scale_r50_108ep.py": 39_526_824,
    "smca_multi_scale_r101_50ep.py": 39_526_824 + R101_EXTRA,
    # The official code's 40,763,514 and 60,010,618 (its training logs) less 12 class rows of 257.
    "smca_conv_multi_scale_r50_50ep.py": 40_760_430,
    # R101 also has 4 more exchange convs per encoder layer (one per pair of levels).
    "smca_conv_multi_scale_r101_50ep.py": 40_760_430 + R101_EXTRA + 6 * 4 * (256 * 49 + 256),
    "detr_baseline_r50_50ep.py": 41_483_094,
}


def _load_tool(name):
    return load_script(f"tools/{name}.py")


@pytest.fixture(scope="module")
def analyze_model():
    return _load_tool("analyze_model")


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_analyze_model_every_config(analyze_model, path, tmp_path):
    assert os.path.basename(path) in TRAINABLE, "add the new config's parameter count here"
    output = str(tmp_path / "analysis.json")
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        results = analyze_model.main(
            ["--config-file", path, "--tasks", "flop", "parameter", "--size", "64", "64", "--output", output]
        )
    printed = stdout.getvalue()
    flops = results["flops"]
    assert flops["total"] > 1e9  # R50 at 64x64: ~3.6 GFLOPs
    assert flops["by_operator"]["conv"] > 0 and flops["by_operator"]["linear"] > 0
    assert flops["by_operator"]["scaled_dot_product_attention"] > 0  # counted by our handle
    assert flops["not_counted"]["no flop formula"] == {}
    assert "not counted, elementwise" in printed and "FLOPs at 64x64" in printed
    assert results["parameters"]["trainable"] == TRAINABLE[os.path.basename(path)]
    assert results["parameters"]["total"] > results["parameters"]["trainable"]  # frozen stem + res2
    with open(output) as f:
        assert json.load(f)["flops"]["total"] == flops["total"]


def test_sdpa_flops(analyze_model):
    from fvcore.nn import FlopCountAnalysis

    class Attention(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.rand(2, 4, 10, 8), torch.rand(2, 4, 30, 8), torch.rand(2, 4, 30, 16)
    analysis = FlopCountAnalysis(Attention(), (q, k, v)).set_op_handle(**analyze_model.EXTRA_HANDLES)
    assert analysis.total() == 2 * 4 * 10 * 30 * (8 + 16)
    assert not analysis.unsupported_ops()


def test_structure_task(analyze_model):
    demo = os.path.join(REPO, "configs", "demo", "smca_r18_synthetic.py")
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        results = analyze_model.main(["--config-file", demo, "--tasks", "structure"])
    assert "SMCADETR(" in stdout.getvalue() and "flops" not in results


@pytest.fixture(scope="module")
def torchvision_r50(tmp_path_factory):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    # Non-trivial BN statistics and affine parameters, so that a wrong mapping shows.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    path = str(tmp_path_factory.mktemp("tv") / "resnet50.pth")
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_convert_torchvision_resnet(torchvision_r50, tmp_path):
    tv_model, tv_path = torchvision_r50
    tool = _load_tool("convert_torchvision_resnet")
    out = str(tmp_path / "r50_d2.pth")
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert tool.main(["--input", tv_path, "--output", out, "--depth", "50", "--config", R50_CONFIG]) == 0
    assert "all keys and shapes match" in stdout.getvalue()

    checkpoint = torch.load(out, weights_only=True)
    converted = checkpoint["model"]
    assert "__author__" in checkpoint
    tv_state = tv_model.state_dict()
    kept = [k for k in tv_state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    assert len(converted) == len(kept) and all(k.startswith("backbone.") for k in converted)
    assert torch.equal(converted["backbone.stem.conv1.weight"], tv_state["conv1.weight"])
    assert torch.equal(converted["backbone.res2.0.conv1.norm.weight"], tv_state["layer1.0.bn1.weight"])
    shortcut_var = converted["backbone.res5.0.shortcut.norm.running_var"]
    assert torch.equal(shortcut_var, tv_state["layer4.0.downsample.1.running_var"])

    cfg = LazyConfig.load(R50_CONFIG)
    cfg.model.backbone.out_features = ["res2", "res3", "res4", "res5"]
    cfg.model.in_features = ["res5"]
    model = instantiate(cfg.model).eval()
    incompatible = model.load_state_dict(converted, strict=False)
    assert not incompatible.unexpected_keys
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.")]
    DetectionCheckpointer(model).load(out)  # by exact names, no matching heuristics
    for key, value in converted.items():
        assert torch.equal(model.state_dict()[key], value), key

    # Same features as torchvision's model in eval mode (FrozenBN == BN with running statistics).
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = tv_model.maxpool(tv_model.relu(tv_model.bn1(tv_model.conv1(x))))
        tv_features = {}
        for i, layer in enumerate([tv_model.layer1, tv_model.layer2, tv_model.layer3, tv_model.layer4]):
            y = layer(y)
            tv_features[f"res{i + 2}"] = y
        ours = model.backbone(x)
    for name, expected in tv_features.items():
        # (our convolutions apply the frozen batch norms to their weights: float rounding differs)
        scale = float(expected.abs().max())
        torch.testing.assert_close(ours[name], expected, rtol=1e-4, atol=1e-4 * scale)


def test_convert_torchvision_resnet_errors(torchvision_r50, tmp_path):
    tv_model, tv_path = torchvision_r50
    tool = _load_tool("convert_torchvision_resnet")
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        assert tool.main(["--input", tv_path, "--output", str(tmp_path / "x.pth"), "--depth", "101"]) == 1
    assert "expected a ResNet-101" in stderr.getvalue()
    state = dict(tv_model.state_dict(), **{"layer1.0.se.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="not a key of a torchvision ResNet"):
        convert_torchvision_resnet(state)
    # A file that would run code when unpickled is refused.
    bad = str(tmp_path / "bad.pth")
    torch.save({"model": {"conv1.weight": torch.zeros(1)}, "obj": nn.ReLU()}, bad)
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        assert tool.main(["--input", bad, "--output", str(tmp_path / "y.pth")]) == 1
    assert "error" in stderr.getvalue()


@pytest.mark.slow
def test_benchmark_tool_writes_a_table_and_json(tmp_path):
    import json
    import subprocess
    import sys

    from smca_d2.data.synthetic import make_synthetic_coco

    make_synthetic_coco(str(tmp_path / "data" / "synthetic"), num_train=6, num_val=3, seed=2)
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "benchmark.py"),
        "--config-file",
        os.path.join(REPO, "configs", "demo", "smca_r18_synthetic.py"),
        "--iters",
        "2",
        "--warmup",
        "1",
        "--output",
        str(out),
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "model.transformer.decoder.num_layers=2",
    ]
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "data"))
    run = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| inference images/s |" in run.stdout and "| training iterations/s" in run.stdout
    record = json.loads(out.read_text())
    for value in [*record["results"]["inference"].values(), *record["results"]["train"].values()]:
        assert value > 0
    if record["device"] == "cpu" and glibc_malloc():
        assert record["keep_freed_cpu_memory"] is True  # measured as train_net.py trains
