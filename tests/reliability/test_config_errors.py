"""Config errors are reported clearly before any work."""

import logging
import os

import pytest
import torch
from reliability_helpers import register, simple_image, write_coco
from torch import nn

from smca_d2.checkpoint import CheckpointMismatchError, SafeCheckpointer
from smca_d2.data import DatasetNotFoundError
from smca_d2.engine import (
    UnknownConfigKeyError,
    check_config_datasets,
    check_num_classes,
    load_config,
)

from detectron2.config import LazyConfig, instantiate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, "configs", "demo", "smca_r18_synthetic.py")
R18_BASE = os.path.join(REPO, "configs", "common", "r18_synthetic.py")


# --------------------------------------------------------------------------------------------
# Unknown keys in overrides
# --------------------------------------------------------------------------------------------
def test_misspelled_override_is_refused_with_close_matches():
    with pytest.raises(UnknownConfigKeyError) as e:
        load_config(DEMO, ["train.max_iters=5", "model.num_querys=3", "train.seed=1"])
    message = str(e.value)
    assert "2 override(s)" in message
    assert "train.max_iters  (did you mean: train.max_iter" in message
    assert "model.num_querys  (did you mean: model.num_queries" in message
    assert "train.seed" not in message.split("\n", 1)[1].split("Overriding")[0]


def test_override_of_a_missing_prefix_suggests_the_full_path():
    with pytest.raises(UnknownConfigKeyError, match="did you mean: .*model.num_queries"):
        load_config(DEMO, ["num_queries=3"])


def test_valid_overrides_pass():
    cfg = load_config(
        DEMO,
        [
            "train.max_iter=5",
            "model.transformer.decoder.num_layers=2",
            "dataloader.train.aspect_ratio_grouping=False",  # a LazyCall parameter left at its default
            "dataloader.train.dataset.verify_images=True",  # an option of the validating replacement
            "dataloader.train.mapper.augmentations=[]",
            "+train.my_new_key=3",  # added on purpose
        ],
    )
    assert cfg.train.max_iter == 5 and cfg.train.my_new_key == 3
    assert cfg.dataloader.train.aspect_ratio_grouping is False
    assert cfg.dataloader.train.dataset.verify_images is True


def test_unknown_parameter_of_a_lazy_call_is_refused():
    with pytest.raises(UnknownConfigKeyError, match="dataloader.train.aspect_ratio_groupin "):
        load_config(DEMO, ["dataloader.train.aspect_ratio_groupin=False"])


def test_the_demo_names_the_loader_whose_options_it_sets():
    from smca_d2.data import build_resumable_train_loader

    demo = LazyConfig.load(DEMO)
    assert demo.dataloader.train._target_ is build_resumable_train_loader
    assert demo.dataloader.train.size_grouping == 16


# --------------------------------------------------------------------------------------------
# Datasets: missing paths, num_classes
# --------------------------------------------------------------------------------------------
def test_missing_dataset_paths_are_reported_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    name = register(str(tmp_path / "synthetic" / "annotations" / "train.json"), str(tmp_path / "synthetic" / "train"))
    cfg = load_config(DEMO, [f"dataloader.train.dataset.names={name}"])
    with pytest.raises(DatasetNotFoundError) as e:
        check_config_datasets(cfg)
    assert f"Dataset '{name}': the annotation file {tmp_path}/synthetic/annotations/train.json does not exist" in str(
        e.value
    )
    assert "prepare_synthetic.py" in str(e.value)


def test_num_classes_checked_against_train_and_test_datasets(tmp_path):
    json_path, image_dir = write_coco(str(tmp_path / "d"), [simple_image(1)], [dict(image_id=1, bbox=[1, 1, 5, 5])])
    train, test = register(json_path, image_dir), register(json_path, image_dir)
    cfg = load_config(
        DEMO,
        [f"dataloader.train.dataset.names={train}", f"dataloader.test.dataset.names={test}", "model.num_classes=2"],
    )
    instantiate(cfg.dataloader.train.dataset)
    check_num_classes(cfg)  # 2 categories in the json
    cfg.model.num_classes = 3
    with pytest.raises(
        ValueError, match=f"model.num_classes=3 but dataset '{train}' has 2 classes \\(a, b\\). Set model.num_classes=2"
    ):
        check_num_classes(cfg)
    # the test split is checked once its metadata is loaded (train_net loads it before training)
    cfg.dataloader.train.dataset.names = "smca_synthetic_train"
    cfg.model.num_classes = 5
    instantiate(cfg.dataloader.test.dataset)
    with pytest.raises(ValueError, match=f"dataset '{test}' has 2 classes"):
        check_num_classes(cfg)


# --------------------------------------------------------------------------------------------
# A checkpoint whose shapes do not fit
# --------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, classes=5, extra=False):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, classes)
        if extra:
            self.extra = nn.Linear(2, 2)


def test_shape_mismatch_is_summarised_and_refused_when_strict(tmp_path, caplog):
    SafeCheckpointer(Net(classes=91), str(tmp_path)).save("source")
    path = str(tmp_path / "source.pth")

    model = Net(classes=5, extra=True)
    initial_head = model.head.weight.detach().clone()
    caplog.set_level(logging.WARNING)
    SafeCheckpointer(model).load(path)
    log = caplog.text
    assert "2 tensor(s) have a different shape in the checkpoint and were NOT loaded" in log
    assert "head.weight: checkpoint [91, 8] vs model [5, 8]" in log and "head.bias: checkpoint [91] vs model [5]" in log
    assert "2 tensor(s) of the model are not in the checkpoint" in log and "extra.weight" in log
    assert torch.equal(model.head.weight, initial_head)  # re-initialised = kept its initial values
    saved = torch.load(path, weights_only=True)["model"]
    assert torch.equal(model.body.weight, saved["body.weight"])  # what fits is loaded

    with pytest.raises(CheckpointMismatchError, match="head.weight: checkpoint \\[91, 8\\] vs model \\[5, 8\\]"):
        SafeCheckpointer(Net(classes=5), strict=True).load(path)
    SafeCheckpointer(Net(classes=91), strict=True).load(path)  # an exact fit passes


def test_resuming_into_a_changed_model_is_an_error(tmp_path):
    SafeCheckpointer(Net(classes=91), str(tmp_path)).save("model_0000009")
    with pytest.raises(CheckpointMismatchError, match="Resuming needs the model the checkpoint was written for"):
        SafeCheckpointer(Net(classes=5), str(tmp_path)).resume_or_load("", resume=True)
