"""LazyPredictor: detections in original image coordinates, channel order, checkpoints, metadata."""
import numpy as np
import pytest
import torch

from detectron2.config import LazyCall as L
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.data.datasets import register_coco_instances

from conftest import write_tiny_coco
from smca_d2.inference import LazyPredictor, build_test_augmentations
from tiny_smca import random_image, tiny_config, write_checkpoint


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
    instances = predictor(image)
    assert instances.image_size == (90, 120)
    assert 0 < len(instances) <= predictor.model.test_topk
    boxes = instances.pred_boxes.tensor
    assert torch.isfinite(boxes).all()
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 120).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= 90).all()
    scores = instances.scores
    assert ((scores >= 0) & (scores <= 1)).all() and (scores[:-1] >= scores[1:]).all()
    assert ((instances.pred_classes >= 0) & (instances.pred_classes < 5)).all()


def test_channel_order_is_converted(checkpoint):
    path, _ = checkpoint
    cfg = tiny_config()
    bgr = LazyPredictor(cfg, path, device="cpu")
    rgb = LazyPredictor(cfg, path, device="cpu", input_format="RGB")
    assert bgr.model_format == "RGB"  # the model's input_format
    image = random_image(64, 80, seed=3)
    a, b = bgr(image), rgb(np.ascontiguousarray(image[:, :, ::-1]))
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)
    # The same as calling the model on the RGB tensor directly.
    direct = rgb.model([{"image": torch.as_tensor(image[:, :, ::-1].astype("float32").transpose(2, 0, 1))}])
    assert torch.allclose(direct[0]["instances"].scores, a.scores)
    # A BGR image given as RGB gives different detections.
    assert not torch.equal(rgb(image).scores, a.scores)


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
    a, b = predictor(image), optimized(image)
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
