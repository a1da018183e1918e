"""train_net.py on detectron2's own model-zoo LazyConfigs, as they are: their ``train`` (detectron2's
``configs/common/train.py``) has no ``seed``, ``ema`` ..., and R-CNN keeps its class count at
``model.roi_heads.num_classes``. Only the dataset, the device, the sizes, the length, the norms
(trainable: there are no pretrained weights) and the score threshold are overridden."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_script, write_tiny_coco
from omegaconf import OmegaConf

from smca_d2.engine import ConfigChange, adapt_foreign_config, check_num_classes, load_config
from smca_d2.engine.config import DATA_REPLACEMENTS, TRAIN_DEFAULTS

from detectron2 import model_zoo
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

RETINANET = "COCO-Detection/retinanet_R_50_FPN_1x.py"
# detectron2 has no Faster R-CNN LazyConfig (COCO-Detection/faster_rcnn_*.yaml only): its R-CNN
# LazyConfig is Mask R-CNN, which is Faster R-CNN without mask_in_features.
MASK_RCNN = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py"
AS_FASTER_RCNN = ["model.roi_heads.mask_in_features=null", "dataloader.train.mapper.use_instance_mask=False"]


@pytest.fixture
def one_thread():
    """R50 steps on tiny images are too small to gain from a second thread, and on a shared
    machine its busy-waiting makes them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_dataset(tmp_path, request):
    """A registered tiny COCO-format dataset (2 images, 2 classes) whose boxes also have polygon
    masks; used for training and evaluation."""
    json_path, image_dir = write_tiny_coco(str(tmp_path / "tiny_coco"), num_images=2)
    with open(json_path) as f:
        data = json.load(f)
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    with open(json_path, "w") as f:
        json.dump(data, f)
    name = "d2_zoo_tiny_" + re.sub(r"\W", "_", request.node.name)  # a valid override value
    register_coco_instances(name, {}, json_path, image_dir)
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def tiny_overrides(dataset, out, num_classes_key):
    return [
        f"dataloader.train.dataset.names={dataset}",
        f"dataloader.test.dataset.names={dataset}",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
        "dataloader.train.mapper.augmentations.0.max_size=96",
        "dataloader.test.mapper.augmentations.0.short_edge_length=64",
        "dataloader.test.mapper.augmentations.0.max_size=96",
        f"{num_classes_key}=2",
        "train.device=cpu",
        "train.init_checkpoint=",
        # Without pretrained weights FrozenBN is the identity and the untrained R50's outputs
        # explode (no detections to evaluate): trainable norms, as when training from scratch.
        "model.backbone.bottom_up.stem.norm=BN",
        "model.backbone.bottom_up.stages.norm=BN",
        "train.max_iter=1",
        "train.eval_period=1",
        "train.log_period=1",
        f"train.output_dir={out}",
        # Added by adapt_foreign_config (so no "+"); this process is pytest's, leave its malloc alone.
        "train.speedups.keep_freed_cpu_memory=False",
    ]


def run_main(*args, train_net=None):
    """train_net.py's main, in this process."""
    train_net = train_net or load_script("train_net.py")
    return train_net.main(train_net.argument_parser().parse_args(list(args)))


def metrics_of(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]


def test_the_model_zoo_configs_lack_our_train_options():
    # What the end-to-end tests below rely on: the configs really are detectron2's.
    for config in (RETINANET, MASK_RCNN):
        cfg = LazyConfig.load(model_zoo.get_config_file(config))
        assert not set(cfg.train) & {"seed", "ema", "strict_load", "speedups"}
        assert "precision" not in cfg.train.amp
    assert "num_classes" not in LazyConfig.load(model_zoo.get_config_file(MASK_RCNN)).model


def test_adapt_foreign_config_adds_our_train_options_with_the_values_of_our_train_config():
    cfg = LazyConfig.load(model_zoo.get_config_file(RETINANET))
    added = [c for c in adapt_foreign_config(cfg) if c.key.startswith("train.")]
    ours = LazyConfig.load(os.path.join(REPO, "configs", "common", "train.py")).train
    for key, value in TRAIN_DEFAULTS.items():
        for sub, default in value.items() if isinstance(value, dict) else [(None, value)]:
            assert (ours[key] if sub is None else ours[key][sub]) == default, (key, sub)  # declared there
            assert (cfg.train[key] if sub is None else cfg.train[key][sub]) == default, (key, sub)
    assert cfg.train.seed == -1 and cfg.train.ema.enabled is False and cfg.train.amp.enabled is False
    assert cfg.train.amp.precision is None
    # Each addition is reported: a whole option, or the sub-options of one that detectron2 has
    # ("amp" exists there, "amp.precision" does not).
    theirs = LazyConfig.load(model_zoo.get_config_file(RETINANET)).train
    expected = set()
    for key, value in TRAIN_DEFAULTS.items():
        if key not in theirs:
            expected.add(f"train.{key}")
        else:
            expected |= {f"train.{key}.{sub}" for sub in value if sub not in theirs[key]}
    assert "train.strict_load" in expected and "train.amp.precision" in expected
    assert {c.key for c in added} == expected and all(c.old is None for c in added)

    # So they can be overridden without "+" (a key not in the config is refused otherwise).
    overridden = load_config(
        model_zoo.get_config_file(RETINANET), ["train.seed=5", "train.ema.enabled=True", "train.amp.precision=bfloat16"]
    )
    assert overridden.train.seed == 5 and overridden.train.ema.enabled is True
    assert overridden.train.ema.decay == 0.9998 and overridden.train.amp.precision == "bfloat16"

    # A config's own values are kept.
    ours_cfg = LazyConfig.load(model_zoo.get_config_file(RETINANET))
    ours_cfg.train.seed = 7
    ours_cfg.train.ema = {"enabled": True}
    changes = adapt_foreign_config(ours_cfg)
    assert ours_cfg.train.seed == 7
    assert ours_cfg.train.ema.enabled is True and ours_cfg.train.ema.decay == 0.9998
    assert ConfigChange("train.ema.decay", None, 0.9998) in changes and "train.seed" not in {c.key for c in changes}


def test_foreign_data_functions_are_replaced_reported_and_switchable():
    from smca_d2.data import RobustDatasetMapper, build_resumable_train_loader, validated_dataset_dicts

    path = model_zoo.get_config_file(RETINANET)
    cfg, changes = load_config(path, return_changes=True)
    replaced = {c.key: c for c in changes if c.key.endswith("._target_")}
    assert set(replaced) == {
        "dataloader.train._target_",
        "dataloader.train.dataset._target_",
        "dataloader.test.dataset._target_",
        "dataloader.train.mapper._target_",
        "dataloader.test.mapper._target_",
    }
    assert set(DATA_REPLACEMENTS) == {c.old for c in replaced.values()}
    assert str(replaced["dataloader.train._target_"]) == (
        "dataloader.train._target_: detectron2.data.build.build_detection_train_loader -> "
        "smca_d2.data.resumable_loader.build_resumable_train_loader"
    )
    for key, target in (
        ("dataloader.train", build_resumable_train_loader),
        ("dataloader.train.dataset", validated_dataset_dicts),
        ("dataloader.test.mapper", RobustDatasetMapper),
    ):
        assert OmegaConf.select(cfg, key)._target_ == f"{target.__module__}.{target.__name__}"
    # Options of the drop-ins can then be overridden.
    cfg = load_config(path, ["dataloader.train.dataset.verify_images=True", "dataloader.train.size_grouping=32"])
    assert cfg.dataloader.train.dataset.verify_images is True

    # Switched off: the data functions are detectron2's, as written; the train options are still added.
    as_written, changes = load_config(path, replace_data_functions=False, return_changes=True)
    original = LazyConfig.load(path)
    assert as_written.dataloader == original.dataloader
    assert changes and all(c.key.startswith("train.") for c in changes)
    # A training loader with its own sampler is kept.
    original.dataloader.train.sampler = {"_target_": "detectron2.data.samplers.TrainingSampler", "size": 1}
    assert "dataloader.train._target_" not in {c.key for c in adapt_foreign_config(original)}


def test_train_net_logs_the_adaptation_after_logging_starts_and_data_as_written_turns_it_off(
    tiny_dataset, tmp_path, monkeypatch
):
    from smca_d2.data import RobustDatasetMapper

    from detectron2.data import DatasetMapper
    from detectron2.utils.registry import locate

    train_net = load_script("train_net.py")
    monkeypatch.setattr(train_net, "do_train", lambda args, cfg: None)  # only the setup is tested
    for flags in ([], ["--data-as-written"]):
        out = str(tmp_path / ("as_written" if flags else "adapted"))
        run_main(
            "--config-file",
            model_zoo.get_config_file(RETINANET),
            *flags,
            *tiny_overrides(tiny_dataset, out, "model.num_classes"),
            train_net=train_net,
        )
        log = Path(out, "log.txt").read_text()  # the file of train_net.py's logger
        saved = LazyConfig.load(os.path.join(out, "config.yaml"))  # what ran
        assert "The config was adapted to train_net.py" in log
        assert "train.strict_load=False (added)" in log
        replaced = (
            "dataloader.train.mapper._target_: detectron2.data.dataset_mapper.DatasetMapper -> "
            "smca_d2.data.mapper.RobustDatasetMapper"
        )
        assert (replaced in log) == (not flags)
        assert locate(saved.dataloader.train.mapper._target_) is (DatasetMapper if flags else RobustDatasetMapper)


def test_check_num_classes_names_the_key_where_the_model_keeps_it():
    # The COCO datasets' metadata (80 classes) is registered with detectron2: no files are read.
    cfg = LazyConfig.load(model_zoo.get_config_file(MASK_RCNN))
    check_num_classes(cfg)  # 80, as it is
    cfg.model.roi_heads.num_classes = 7
    with pytest.raises(ValueError) as error:
        check_num_classes(cfg)
    message = str(error.value)
    assert "model.roi_heads.num_classes=7 but dataset 'coco_2017_train' has 80 classes" in message
    assert "Set model.roi_heads.num_classes=80" in message

    retinanet = LazyConfig.load(model_zoo.get_config_file(RETINANET))
    check_num_classes(retinanet)
    retinanet.model.num_classes = 3
    with pytest.raises(ValueError, match=r"model\.num_classes=3 but dataset 'coco_2017_train' has 80"):
        check_num_classes(retinanet)

    # Panoptic FPN: the semantic head against the stuff classes (54 with "things").
    panoptic = LazyConfig.load(model_zoo.get_config_file("COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.py"))
    check_num_classes(panoptic)
    panoptic.model.sem_seg_head.num_classes = 53
    with pytest.raises(ValueError, match=r"model\.sem_seg_head\.num_classes=53 .* has 54 stuff classes"):
        check_num_classes(panoptic)

    # A model that keeps no class count where we look: nothing to check, no error.
    check_num_classes(
        OmegaConf.create(
            {"model": {"head": {"num_outputs": 3}}, "dataloader": {"train": {"dataset": {"names": "coco_2017_train"}}}}
        )
    )


@pytest.mark.slow
def test_retinanet_model_zoo_config_trains_resumes_and_evaluates(tiny_dataset, one_thread, tmp_path):
    out = str(tmp_path / "out")
    config = model_zoo.get_config_file(RETINANET)
    overrides = tiny_overrides(tiny_dataset, out, "model.num_classes")
    overrides.append("model.test_score_thresh=0.0")  # an untrained model must still output boxes
    run_main("--config-file", config, *overrides)
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    metrics = metrics_of(out)
    assert any("loss_cls" in m for m in metrics)
    evaluation = [m for m in metrics if "bbox/AP" in m]
    assert evaluation and evaluation[-1]["iteration"] == 1
    assert 0.0 <= evaluation[-1]["bbox/AP50"] <= 100.0  # COCOEvaluator ran to the end

    # No train.seed: a random one, drawn once and saved; --resume keeps it.
    state = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    seed = state["trainer"]["hooks"]["DeterministicSteps"]["seed"]
    assert isinstance(seed, int) and seed >= 0
    run_main("--config-file", config, "--resume", *overrides, "train.max_iter=2")
    resumed = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    assert resumed["iteration"] == 1  # the last of max_iter=2: one more after the resume
    assert [m["iteration"] for m in metrics_of(out) if "loss_cls" in m] == [0, 1]
    assert resumed["trainer"]["hooks"]["DeterministicSteps"]["seed"] == seed

    results = run_main(
        "--config-file",
        config,
        "--eval-only",
        *overrides,
        f"train.init_checkpoint={os.path.join(out, 'model_final.pth')}",
    )
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75"}


@pytest.mark.slow
@pytest.mark.parametrize("masks", [True, False], ids=["mask_rcnn", "faster_rcnn"])
def test_rcnn_model_zoo_config_trains_and_evaluates(masks, tiny_dataset, one_thread, tmp_path):
    out = str(tmp_path / "out")
    overrides = tiny_overrides(tiny_dataset, out, "model.roi_heads.num_classes")
    overrides.append("model.roi_heads.box_predictor.test_score_thresh=0.0")
    run_main("--config-file", model_zoo.get_config_file(MASK_RCNN), *overrides, *([] if masks else AS_FASTER_RCNN))
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    metrics = metrics_of(out)
    losses = next(m for m in metrics if "loss_cls" in m)
    assert ("loss_mask" in losses) == masks and "loss_rpn_cls" in losses
    evaluation = [m for m in metrics if "bbox/AP" in m]
    assert evaluation and evaluation[-1]["iteration"] == 1
    assert 0.0 <= evaluation[-1]["bbox/AP50"] <= 100.0  # COCOEvaluator ran to the end
    if masks:
        assert 0.0 <= evaluation[-1]["segm/AP50"] <= 100.0
    else:
        assert not any("segm/AP" in m for m in metrics)


def test_model_zoo_class_count_mismatch_names_roi_heads_before_training(tiny_dataset, tmp_path):
    out = str(tmp_path / "out")
    overrides = tiny_overrides(tiny_dataset, out, "model.roi_heads.num_classes")
    overrides[overrides.index("model.roi_heads.num_classes=2")] = "model.roi_heads.num_classes=5"
    with pytest.raises(ValueError, match=rf"model\.roi_heads\.num_classes=5 but dataset '{tiny_dataset}' has 2"):
        run_main("--config-file", model_zoo.get_config_file(MASK_RCNN), *overrides)
    assert not os.path.exists(os.path.join(out, "model_final.pth"))
