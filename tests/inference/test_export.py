"""Export: one ONNX file / torch.export program for any image size reproduces the eager detections
of every model type; tools/export_model.py; the ONNX Runtime example of docs/DEPLOYMENT.md."""

import os
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import REPO, load_script
from tiny_smca import TINY_DECODER, random_image, tiny_config, write_checkpoint

from smca_d2.engine import load_config
from smca_d2.inference.export import (
    ExportUnavailable,
    SMCAExportWrapper,
    export_onnx,
    export_program,
    onnx_unavailable_reason,
)

from detectron2.config import instantiate

ort = pytest.importorskip("onnxruntime", reason="the [export] extra (onnxruntime) is not installed")

MULTI_SCALE = os.path.join(REPO, "configs", "convergence", "synthetic_smca_multi_scale.py")
# Sizes that need padding to size_divisibility and sizes that do not, portrait and landscape.
SIZES = [(96, 128), (77, 201), (150, 100)]


@pytest.fixture(scope="module")
def export_tool():
    return load_script("tools/export_model.py")


def _images(sizes):
    """Real images (random_image: shapes on noise) as the model takes them: float CHW, BGR."""
    return [
        torch.as_tensor(random_image(h, w, seed=i).astype("float32").transpose(2, 0, 1))
        for i, (h, w) in enumerate(sizes)
    ]


def _eager(model, image):
    with torch.no_grad():
        instances = model([{"image": image}])[0]["instances"]
    return instances.pred_boxes.tensor.numpy(), instances.scores.numpy(), instances.pred_classes.numpy()


def assert_same_detections(exported, eager):
    """The exported outputs (all K detections, empty boxes kept) equal the eager model's (empty
    boxes dropped): scores and boxes within 1e-4 relative, classes equal."""
    boxes, scores, classes = (np.asarray(a) for a in exported)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    ref_boxes, ref_scores, ref_classes = eager
    assert nonempty.sum() == len(ref_scores)
    np.testing.assert_allclose(boxes[nonempty], ref_boxes, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(scores[nonempty], ref_scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(classes[nonempty], ref_classes)


@pytest.fixture(scope="module")
def single_scale_onnx(export_tool, tmp_path_factory):
    """tools/export_model.py's ONNX file (dynamic size) of a tiny single-scale model, from a
    checkpoint, with the model the checkpoint holds."""
    folder = tmp_path_factory.mktemp("onnx")
    checkpoint, model = write_checkpoint(tiny_config(), str(folder / "model.pth"))
    path = str(folder / "smca.onnx")
    rows = export_tool.main(
        ["--no-optimize", "--check-sizes", "96x128", "60x90"]
        + ["--config-file", os.path.join(REPO, "configs", "common", "r18_synthetic.py"), "--output", path]
        + ["model.transformer.encoder.num_layers=1", *TINY_DECODER, f"train.init_checkpoint={checkpoint}"]
    )
    return path, model.eval(), rows, checkpoint


def test_export_tool_writes_a_dynamic_onnx_file_that_it_checked(single_scale_onnx):
    path, _, rows, _ = single_scale_onnx
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert session.get_inputs()[0].shape == [3, "height", "width"]
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores", "classes"]
    # The tool compared the file with the eager model on the sizes asked for.
    assert [r["size"] for r in rows] == [[96, 128], [60, 90]]
    assert all(r["classes_equal"] and r["max_box_diff_rel"] <= 1e-4 for r in rows)


def test_onnx_runtime_gives_the_eager_detections_at_every_size(single_scale_onnx):
    path, model, _, _ = single_scale_onnx
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for image in _images(SIZES):
        assert_same_detections(session.run(None, {"image": image.numpy()}), _eager(model, image))


# The multi-scale model goes through the same exporter with more encoder levels: its run, the
# slowest export, is in `make test-long`.
@pytest.mark.parametrize("kind", [pytest.param("multi_scale", marks=pytest.mark.long), "detr_baseline"])
def test_onnx_export_of_the_other_model_types(kind, tmp_path):
    if kind == "multi_scale":  # two levels (res3 and a stride-2 level on it) instead of three
        levels = ["model.backbone.out_features=[res3]", "model.in_features=[res3]"]
        cfg = load_config(MULTI_SCALE, [*TINY_DECODER, *levels, "model.transformer.decoder.num_levels=2"])
    else:
        cfg = tiny_config()
        cfg.model.transformer.decoder.modulate = False
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    # Without the exporter's graph optimizer, as the tool's export above (the optimizer runs in
    # the long deployment benchmark test).
    path = export_onnx(model, str(tmp_path / f"{kind}.onnx"), optimize=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for image in _images(SIZES[:2]):
        assert_same_detections(session.run(None, {"image": image.numpy()}), _eager(model, image))


@pytest.mark.long  # every ONNX export above traces the same dynamic torch.export program first
def test_torch_export_program_for_any_size(export_tool, single_scale_onnx, tmp_path):
    _, model, _, checkpoint = single_scale_onnx
    path = str(tmp_path / "smca.pt2")
    export_tool.main(
        ["--format", "torch_export", "--check-sizes", "64x64"]
        + ["--config-file", os.path.join(REPO, "configs", "common", "r18_synthetic.py"), "--output", path]
        + ["model.transformer.encoder.num_layers=1", *TINY_DECODER, f"train.init_checkpoint={checkpoint}"]
    )
    program = torch.export.load(path).module()
    for image in _images(SIZES):
        with torch.no_grad():
            exported = [t.numpy() for t in program(image)]
        assert_same_detections(exported, _eager(model, image))


def test_a_fixed_size_program_takes_that_size_only():
    torch.manual_seed(0)
    model = instantiate(tiny_config().model).eval()
    program = export_program(model, (96, 128))
    image = _images([(96, 128)])[0]
    with torch.no_grad():
        boxes, scores, classes = program.module()(image)
        ref = SMCAExportWrapper(model)(image)
    torch.testing.assert_close(boxes, ref[0], rtol=1e-5, atol=1e-4)
    assert torch.equal(classes, ref[2])
    with pytest.raises(Exception, match="96|128|shape|size"):
        program.module()(_images([(64, 64)])[0])
    with pytest.raises(ValueError, match="expected"):
        export_program(model, (96, 128), example=torch.zeros(3, 10, 10))


def test_the_deployment_guide_example_runs(single_scale_onnx, tmp_path, monkeypatch):
    """The ONNX Runtime example of docs/DEPLOYMENT.md, as written, on the exported file."""
    import cv2

    with open(os.path.join(REPO, "docs", "DEPLOYMENT.md")) as f:
        text = f.read()
    match = re.search(r"<!-- tested: ONNX Runtime example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/DEPLOYMENT.md lost its tested ONNX Runtime example"
    code = match.group(1)
    assert len(code.strip().splitlines()) <= 15
    path, model, _, _ = single_scale_onnx
    shutil.copy(path, tmp_path / "smca.onnx")
    assert os.listdir(os.path.dirname(path)).count("smca.onnx.data") == 0  # one self-contained file
    cv2.imwrite(str(tmp_path / "input.jpg"), random_image(120, 160))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "DEPLOYMENT.md", "exec"), namespace)
    # The example's detections are the eager model's on the image resized as the configs do.
    assert namespace["boxes"].shape[1] == 4 and len(namespace["scores"]) == len(namespace["classes"])
    assert (np.diff(namespace["scores"]) <= 0).all()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--height", "480"], "go together"),
        (["--height", "480", "--width", "640", "--dynamic"], "--dynamic"),
        (["--height", "8", "--width", "640"], "must be in"),
        (["--height", "480", "--width", "640", "--check-sizes", "100x100"], "fixed-size"),
        (["--check-sizes", "12by40"], "HxW"),
        (["--format", "tflite"], "invalid choice"),
    ],
)
def test_export_tool_refuses_bad_arguments(export_tool, argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_tool.main(
            ["--config-file", "configs/demo/smca_r18_synthetic.py", "--output", str(tmp_path / "x")] + argv
        )
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_tool_refuses_an_output_in_a_missing_folder(export_tool, tmp_path, capsys):
    with pytest.raises(SystemExit):
        export_tool.main(
            ["--config-file", "configs/demo/smca_r18_synthetic.py", "--output", str(tmp_path / "no" / "x.onnx")]
        )
    assert "does not exist" in capsys.readouterr().err


def test_onnx_export_without_the_packages_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    assert "onnxscript" in onnx_unavailable_reason()
    with pytest.raises(ExportUnavailable, match=r"smca-d2\[export\]"):
        export_onnx(torch.nn.Module(), str(tmp_path / "x.onnx"))
    assert not (tmp_path / "x.onnx").exists()
