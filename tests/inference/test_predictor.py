"""LazyPredictor: detections in original image coordinates, DefaultPredictor's output form, channel
order, checkpoints (and the warning for checkpoints without weights for the whole model), metadata."""

import contextlib
import logging

import numpy as np
import pytest
import torch
from conftest import write_tiny_coco
from tiny_smca import random_image, tiny_config, write_checkpoint

from smca_d2.checkpoint import SafeCheckpointer
from smca_d2.inference import LazyPredictor, build_test_augmentations, untrained_keys, warn_if_untrained
from smca_d2.inference.predictor import missing_weight_parts

from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import Instances


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pth")
    return write_checkpoint(tiny_config(), path, seed=1)


def test_detections_in_original_image_size(checkpoint):
    path, _ = checkpoint
    cfg = tiny_config()
    cfg.dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=64, max_size=100)]
    predictor = LazyPredictor(cfg, path, device="cpu")
    assert predictor.model.training is False
    image = random_image(90, 120)
    inputs = predictor.preprocess(image)
    assert tuple(inputs["image"].shape) == (3, 64, 85)  # resized: shorter side 64
    instances = predictor.instances(image)
    assert instances.image_size == (90, 120)
    assert 0 < len(instances) <= predictor.model.test_topk
    boxes = instances.pred_boxes.tensor
    assert torch.isfinite(boxes).all()
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 120).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= 90).all()
    scores = instances.scores
    assert ((scores >= 0) & (scores <= 1)).all() and (scores[:-1] >= scores[1:]).all()
    assert ((instances.pred_classes >= 0) & (instances.pred_classes < 5)).all()


def test_call_returns_what_default_predictor_returns(checkpoint):
    path, _ = checkpoint
    cfg = tiny_config()
    cfg.dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=64, max_size=100)]
    predictor = LazyPredictor(cfg, path, device="cpu")
    image = random_image(90, 120, seed=5)
    outputs = predictor(image)
    # detectron2.engine.DefaultPredictor: {"instances": Instances of the original image size}
    assert isinstance(outputs, dict) and set(outputs) == {"instances"}
    instances = outputs["instances"]
    assert isinstance(instances, Instances)
    assert instances.image_size == (90, 120)
    assert instances.has("pred_boxes") and instances.has("scores") and instances.has("pred_classes")
    # The bare Instances are the same detections.
    bare = predictor.instances(image)
    assert isinstance(bare, Instances) and bare.image_size == (90, 120)
    assert torch.equal(bare.pred_boxes.tensor, instances.pred_boxes.tensor)
    assert torch.equal(bare.scores, instances.scores) and torch.equal(bare.pred_classes, instances.pred_classes)


def test_channel_order_is_converted(checkpoint):
    path, _ = checkpoint
    cfg = tiny_config()
    bgr = LazyPredictor(cfg, path, device="cpu")
    rgb = LazyPredictor(cfg, path, device="cpu", input_format="RGB")
    assert bgr.model_format == "RGB"  # the model's input_format
    image = random_image(64, 80, seed=3)
    a, b = bgr.instances(image), rgb.instances(np.ascontiguousarray(image[:, :, ::-1]))
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)
    # The same as calling the model on the RGB tensor directly.
    direct = rgb.model([{"image": torch.as_tensor(image[:, :, ::-1].astype("float32").transpose(2, 0, 1))}])
    assert torch.allclose(direct[0]["instances"].scores, a.scores)
    # A BGR image given as RGB gives different detections.
    assert not torch.equal(rgb.instances(image).scores, a.scores)


def test_checkpoint_is_loaded(checkpoint):
    path, written = checkpoint
    cfg = tiny_config()
    predictor = LazyPredictor(cfg, path, device="cpu", optimize=False)
    for key, value in written.state_dict().items():
        assert torch.equal(predictor.model.state_dict()[key], value), key
    # By default batch norms are folded into the convolutions: other tensors, same detections.
    optimized = LazyPredictor(cfg, path, device="cpu")
    assert not any("norm" in k for k in optimized.model.backbone.state_dict())
    image = np.random.default_rng(0).integers(0, 255, size=(64, 80, 3), dtype=np.uint8)
    a, b = predictor.instances(image), optimized.instances(image)
    assert torch.allclose(a.scores, b.scores, atol=1e-4)
    assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-2)
    # checkpoint=None reads train.init_checkpoint, like DefaultPredictor reads MODEL.WEIGHTS.
    cfg.train.init_checkpoint = path
    from_cfg = LazyPredictor(cfg, device="cpu")
    assert from_cfg.checkpoint == path
    assert torch.equal(from_cfg.model.class_embed.weight, written.class_embed.weight)
    # "" loads nothing: another random initialisation.
    torch.manual_seed(123)
    assert not torch.equal(LazyPredictor(cfg, "", device="cpu").model.class_embed.weight, written.class_embed.weight)


def test_averaged_weights_are_used_when_the_config_trained_with_them(checkpoint, tmp_path):
    path, written = checkpoint
    torch.manual_seed(7)
    averaged = {k: v + 0.5 if v.is_floating_point() else v for k, v in written.state_dict().items()}
    data = torch.load(path, weights_only=True)
    data["model_ema"] = averaged
    ema_path = str(tmp_path / "with_ema.pth")
    torch.save(data, ema_path)
    cfg = tiny_config()
    cfg.train.ema.enabled = True
    predictor = LazyPredictor(cfg, ema_path, device="cpu", optimize=False)
    assert all(torch.equal(predictor.model.state_dict()[k], v) for k, v in averaged.items())
    cfg.train.ema.enabled = False  # the trained weights
    predictor = LazyPredictor(cfg, ema_path, device="cpu", optimize=False)
    assert all(torch.equal(predictor.model.state_dict()[k], v) for k, v in written.state_dict().items())


def test_test_augmentations():
    cfg = tiny_config()
    assert build_test_augmentations(cfg) == []  # the R18 config uses the images as they are
    del cfg.dataloader.test.mapper["augmentations"]
    (fallback,) = build_test_augmentations(cfg)
    assert isinstance(fallback, T.ResizeShortestEdge)
    assert fallback.short_edge_length == (800, 800) and fallback.max_size == 1333


def test_metadata_class_names(tmp_path):
    json_path, image_dir = write_tiny_coco(str(tmp_path), num_images=1, num_classes=2)
    if "smca_d2_test_predictor_meta" not in DatasetCatalog.list():
        register_coco_instances("smca_d2_test_predictor_meta", {}, json_path, image_dir)
    cfg = tiny_config()
    cfg.model.num_classes = 2
    cfg.dataloader.test.dataset.names = "smca_d2_test_predictor_meta"
    predictor = LazyPredictor(cfg, "", device="cpu")
    assert predictor.metadata.name == "smca_d2_test_predictor_meta"
    assert predictor.class_names == ["class1", "class2"]
    # No dataset: class indices.
    del cfg.dataloader.test.dataset["names"]
    assert LazyPredictor(cfg, "", device="cpu").class_names == ["0", "1"]


def test_rejects_bad_images():
    predictor = LazyPredictor(tiny_config(), "", device="cpu")
    with pytest.raises(ValueError, match="HxWx3"):
        predictor(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="input_format"):
        LazyPredictor(tiny_config(), "", device="cpu", input_format="YUV")


@contextlib.contextmanager
def predictor_warnings():
    """The warnings logged by smca_d2.inference.predictor (caplog misses them once detectron2's
    setup_logger has stopped the "smca_d2" logger from propagating)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    log = logging.getLogger("smca_d2.inference.predictor")
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)


def _meaningless(messages):
    return [m for m in messages if "meaningless" in m]


def test_backbone_only_checkpoint_warns(checkpoint, tmp_path):
    path, written = checkpoint
    backbone = {k: v for k, v in written.state_dict().items() if k.startswith("backbone.")}
    others = [k for k in written.state_dict() if not k.startswith("backbone.")]
    assert backbone and others
    backbone_path = str(tmp_path / "backbone_only.pth")
    torch.save({"model": backbone}, backbone_path)
    with predictor_warnings() as messages:
        predictor = LazyPredictor(tiny_config(), backbone_path, device="cpu", optimize=False)
    (message,) = _meaningless(messages)
    assert backbone_path in message
    for part in ["transformer", "input_proj", "query_embed", "class_embed", "bbox_embed"]:
        assert f"{part} (" in message, part
    assert "backbone (" not in message  # it was loaded
    assert "no weights for transformer" in message and "trained SMCA-DETR checkpoint" in message
    assert sorted(predictor.missing_weights) == sorted(others)
    state = predictor.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in backbone.items())


def test_full_checkpoint_does_not_warn(checkpoint):
    path, _ = checkpoint
    with predictor_warnings() as messages:
        predictor = LazyPredictor(tiny_config(), path, device="cpu")
    assert _meaningless(messages) == []
    assert predictor.missing_weights == []


def test_no_checkpoint_warns():
    with predictor_warnings() as messages:
        predictor = LazyPredictor(tiny_config(), "", device="cpu", optimize=False)
    assert len(_meaningless(messages)) == 1
    assert sorted(predictor.missing_weights) == sorted(predictor.model.state_dict())


def test_partly_missing_weights_are_named(checkpoint, tmp_path):
    path, written = checkpoint
    # Another number of classes: class_embed has the wrong shape and is not loaded.
    cfg = tiny_config()
    cfg.model.num_classes = 3
    with predictor_warnings() as messages:
        predictor = LazyPredictor(cfg, path, device="cpu")
    (message,) = _meaningless(messages)
    assert "no weights for class_embed (2 tensors)" in message and "transformer" not in message
    assert sorted(predictor.missing_weights) == ["class_embed.bias", "class_embed.weight"]
    # Two tensors of the transformer missing: that part is named with the count.
    state = dict(written.state_dict().items())
    dropped = [k for k in state if k.startswith("transformer.")][:2]
    for k in dropped:
        del state[k]
    partial_path = str(tmp_path / "partial.pth")
    torch.save({"model": state}, partial_path)
    with predictor_warnings() as messages:
        LazyPredictor(tiny_config(), partial_path, device="cpu")
    (message,) = _meaningless(messages)
    total = sum(1 for k in written.state_dict() if k.startswith("transformer."))
    assert f"weights missing for part of transformer (2 of {total} tensors)" in message
    assert "no weights for" not in message


def test_missing_weight_helpers_for_other_loaders(checkpoint):
    """untrained_keys + warn_if_untrained, as train_net.py --eval-only uses them."""
    path, written = checkpoint
    torch.manual_seed(0)
    model = instantiate(tiny_config().model)
    checkpointer = SafeCheckpointer(model)
    assert untrained_keys(checkpointer) is None  # nothing loaded yet
    checkpointer.load(path)
    assert untrained_keys(checkpointer) == []
    assert warn_if_untrained(model, untrained_keys(checkpointer), path) is None
    # None: nothing was loaded.
    with predictor_warnings() as messages:
        message = warn_if_untrained(model, None)
    assert messages == [message] and "no weights for backbone" in message
    parts = missing_weight_parts(model, [k for k in model.state_dict() if not k.startswith("backbone.")])
    assert "backbone" not in parts and parts["transformer"][0] == parts["transformer"][1] > 0
    assert missing_weight_parts(model, []) == {}


def test_bfloat16_precision_gives_the_float32_detections_to_rounding(checkpoint):
    path, _ = checkpoint
    image = random_image(120, 160, seed=3)
    full = LazyPredictor(tiny_config(), path, device="cpu").instances(image)
    half = LazyPredictor(tiny_config(), path, device="cpu", precision="bfloat16")
    if half.autocast_dtype is None:
        pytest.skip("this CPU has no bfloat16 instructions: LazyPredictor computes in float32")
    assert half.autocast_dtype == torch.bfloat16
    low = half.instances(image)
    assert low.pred_boxes.tensor.dtype == low.scores.dtype == torch.float32
    # The ten best detections: the same scores to the bfloat16 rounding of the features.
    torch.testing.assert_close(low.scores[:10], full.scores[:10], rtol=0, atol=2e-2)
    assert not torch.equal(low.scores, full.scores)  # it did run in bfloat16


def test_bad_precisions_are_refused(checkpoint, monkeypatch, caplog):
    path, _ = checkpoint
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        LazyPredictor(tiny_config(), path, device="cpu", precision="int8")
    with pytest.raises(ValueError, match="CUDA"):
        LazyPredictor(tiny_config(), path, device="cpu", precision="float16")
    # A CPU without bfloat16 instructions computes in float32, saying so.
    monkeypatch.setattr("smca_d2.engine.amp._cpu_has_fast_bfloat16", lambda: False)
    with caplog.at_level(logging.WARNING):
        predictor = LazyPredictor(tiny_config(), path, device="cpu", precision="bfloat16")
    assert predictor.autocast_dtype is None
    assert "no bfloat16 instructions" in caplog.text
