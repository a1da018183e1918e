"""Export: torch.export reproduces the eager detections; ONNX when its packages are installed."""

import pytest
import torch
from tiny_smca import tiny_config

from smca_d2.inference.export import (
    ExportUnavailable,
    SMCAExportWrapper,
    export_onnx,
    export_program,
    onnx_unavailable_reason,
)

from detectron2.config import instantiate

SIZE = (96, 128)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return instantiate(tiny_config().model).eval()


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, *SIZE, generator=torch.Generator().manual_seed(1)) * 255


def test_torch_export_gives_the_eager_detections(model, image, tmp_path):
    program = export_program(model, SIZE)
    with torch.no_grad():
        boxes, scores, classes = program.module()(image)
        ref_boxes, ref_scores, ref_classes = SMCAExportWrapper(model)(image)
        eager = model([{"image": image}])[0]["instances"]
    assert boxes.shape == (min(model.test_topk, model.num_queries * model.num_classes), 4)
    torch.testing.assert_close(boxes, ref_boxes, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(classes, ref_classes)
    # The eager model drops boxes that are empty after clipping; the wrapper keeps all of them.
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    torch.testing.assert_close(boxes[nonempty], eager.pred_boxes.tensor, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(scores[nonempty], eager.scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(classes[nonempty], eager.pred_classes)

    # A saved program loads and runs without the Python model.
    path = str(tmp_path / "smca.pt2")
    torch.export.save(program, path)
    with torch.no_grad():
        loaded = torch.export.load(path).module()(image)
    torch.testing.assert_close(loaded[1], scores)


def test_export_program_checks_the_example_shape(model):
    with pytest.raises(ValueError, match="expected"):
        export_program(model, SIZE, example=torch.zeros(3, 10, 10))


def test_onnx_export(model, tmp_path):
    reason = onnx_unavailable_reason(dynamo=False)
    if reason is not None:
        with pytest.raises(ExportUnavailable, match="onnx"):
            export_onnx(model, SIZE, str(tmp_path / "smca.onnx"))
        pytest.skip(reason)
    path = export_onnx(model, SIZE, str(tmp_path / "smca.onnx"))
    import onnx

    graph = onnx.load(path).graph
    assert [o.name for o in graph.output] == ["boxes", "scores", "classes"]
