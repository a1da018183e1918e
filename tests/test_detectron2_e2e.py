"""Foundation: a detectron2 model-zoo LazyConfig model trains and evaluates here, in launch()."""

import json
import os

import pytest
import torch

from smca_d2.engine import launch

from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate
from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import SimpleTrainer
from detectron2.evaluation import COCOEvaluator, inference_on_dataset


def _retinanet_job(json_path, image_dir, out_dir):
    name = "foundation_tiny_coco"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, json_path, image_dir)
    torch.manual_seed(0)
    model_cfg = model_zoo.get_config("common/models/retinanet.py").model
    model_cfg.num_classes = 2
    model_cfg.test_score_thresh = 0.0  # an untrained model must still output boxes
    model_cfg.backbone.bottom_up.freeze_at = 0
    model_cfg.backbone.bottom_up.stem.norm = "BN"  # no pretrained weights: trainable norm
    model_cfg.backbone.bottom_up.stages.norm = "BN"
    model = instantiate(model_cfg)
    model.train()

    from detectron2.data import DatasetMapper
    from detectron2.data import transforms as T

    mapper = DatasetMapper(is_train=True, augmentations=[T.ResizeShortestEdge(64, 96)], image_format="BGR")
    loader = build_detection_train_loader(
        dataset=get_detection_dataset_dicts(name), mapper=mapper, total_batch_size=2, num_workers=0
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    trainer = SimpleTrainer(model, loader, optimizer)
    trainer.train(0, 3)
    DetectionCheckpointer(model, save_dir=out_dir).save("model_final")

    test_mapper = DatasetMapper(is_train=False, augmentations=[T.ResizeShortestEdge(64, 96)], image_format="BGR")
    test_loader = build_detection_test_loader(
        dataset=get_detection_dataset_dicts(name), mapper=test_mapper, num_workers=0
    )
    evaluator = COCOEvaluator(name, output_dir=out_dir)
    results = inference_on_dataset(model, test_loader, evaluator)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f)


@pytest.mark.slow
def test_model_zoo_retinanet_trains_and_evaluates_in_launch(tiny_coco, tmp_path):
    json_path, image_dir = tiny_coco
    out_dir = str(tmp_path / "out")
    os.makedirs(out_dir)
    launch(_retinanet_job, 1, args=(json_path, image_dir, out_dir))
    assert os.path.isfile(os.path.join(out_dir, "model_final.pth"))
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75"}
    for key in ("AP", "AP50", "AP75"):  # APs/APm/APl may be NaN: no objects of that size
        assert 0.0 <= results["bbox"][key] <= 100.0
    assert MetadataCatalog.get("foundation_tiny_coco").thing_classes == ["class1", "class2"]
