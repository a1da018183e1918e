"""Every shipped config, reduced in size, goes through train_net.py: train -> checkpoint ->
resume -> evaluate; and round-trips through LazyConfig.save/load.

`make test` runs the train/resume/evaluate check on one config of each kind (model type, data
pipeline); the configs derived from those by schedule, depth or dataset run it under the `long`
marker (`make test-long`), and every config is built and round-tripped in `make test`."""

import glob
import json
import math
import os

import pytest
from test_train_net import REPO, run_train_net

from detectron2.config import LazyConfig, instantiate

CONFIGS = sorted(
    glob.glob(os.path.join(REPO, "configs", "*.py"))
    + glob.glob(os.path.join(REPO, "configs", "demo", "*.py"))
    + glob.glob(os.path.join(REPO, "configs", "convergence", "*.py"))
    + glob.glob(os.path.join(REPO, "configs", "ablations", "*.py"))
)
IDS = [os.path.relpath(p, os.path.join(REPO, "configs")) for p in CONFIGS]
# One config per data pipeline: COCO with DETR's augmentation (single-scale) and the generated
# shapes with size-grouped batches (the demo). The others differ from one of these in the model
# only (multi-scale, the DETR baseline: losses, gradients and inference of each in
# test_smca_model.py, exported in test_export.py), or in schedule, depth or dataset (the trees
# configs: their dataset is checked in tests/data); they run under the long marker.
E2E_IN_MAKE_TEST = {
    "smca_single_scale_r50_50ep.py",
    "demo/smca_r18_synthetic.py",
}
E2E_CONFIGS = [
    pytest.param(path, id=name, marks=() if name in E2E_IN_MAKE_TEST else pytest.mark.long)
    for path, name in zip(CONFIGS, IDS)
]

# Tiny images, a narrow transformer and the generated dataset instead of COCO.
REDUCED = [
    "dataloader.train.dataset.names=smca_synthetic_train",
    "dataloader.test.dataset.names=smca_synthetic_val",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "model.num_classes=5",
    "model.num_queries=10",
    "model.transformer.decoder.num_layers=2",
    "model.transformer.decoder.d_model=64",
    "model.transformer.decoder.dim_feedforward=128",
    "train.device=cpu",
    "train.init_checkpoint=",
    "train.checkpointer.period=2",
    "train.log_period=1",
]
AUGMENTATION = [
    "dataloader.train.mapper.augmentations.min_sizes=[64,96]",
    "dataloader.train.mapper.augmentations.max_size=128",
    "dataloader.train.mapper.augmentations.crop_resize_sizes=[96]",
    "dataloader.train.mapper.augmentations.crop_size=[48,64]",
    "dataloader.test.mapper.augmentations.min_size=96",
    "dataloader.test.mapper.augmentations.max_size=128",
]


def reduced_overrides(path, out):
    cfg = LazyConfig.load(path)
    overrides = REDUCED + [f"train.output_dir={out}"]
    if cfg.model.transformer.encoder.get("num_layers", 0) > 1:  # 0 (the demo) stays 0
        overrides.append("model.transformer.encoder.num_layers=1")
    if "min_sizes" in cfg.dataloader.train.mapper.augmentations:
        overrides += AUGMENTATION
    return overrides


def test_the_configs_run_in_make_test_exist():
    assert set(IDS) >= E2E_IN_MAKE_TEST


@pytest.mark.slow
@pytest.mark.parametrize("path", E2E_CONFIGS)
def test_config_trains_resumes_and_evaluates(path, tmp_path):
    out = tmp_path / "out"
    overrides = reduced_overrides(path, out)
    first = run_train_net(
        tmp_path, "--config-file", path, *overrides, "train.max_iter=2", "train.eval_period=2", check=False
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "model_0000001.pth").is_file() or (out / "model_final.pth").is_file()
    resumed = run_train_net(
        tmp_path, "--config-file", path, "--resume", *overrides, "train.max_iter=3", "train.eval_period=3", check=False
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "Starting training from iteration 2" in log and "copypaste: AP,AP50" in log
    saved = LazyConfig.load(str(out / "config.yaml"))  # the resolved config is loadable again
    assert saved.model.num_queries == 10
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert {m["iteration"] for m in metrics if "loss_class" in m} >= {0, 1, 2}


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_round_trips_through_save_and_load(path, tmp_path):
    cfg = LazyConfig.load(path)
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    loaded = LazyConfig.load(str(tmp_path / "config.yaml"))
    assert loaded.model.num_classes == cfg.model.num_classes
    assert loaded.model.criterion.num_classes == cfg.model.num_classes  # one source of truth
    assert loaded.train.max_iter == cfg.train.max_iter
    assert instantiate(loaded.lr_multiplier)(0.0) == 1.0


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_lr_drops_at_four_fifths_of_max_iter_also_when_it_is_overridden(path):
    """detectron2's LRScheduler hook reads the schedule at iter / train.max_iter: a command-line
    train.max_iter moves the drop with it."""
    import torch

    from smca_d2.engine import load_config

    from detectron2.solver import LRMultiplier

    for overrides in ([], ["train.max_iter=50"]):
        cfg = load_config(path, overrides)
        max_iter, drop = cfg.train.max_iter, int(cfg.train.max_iter * 0.8)
        # fvcore reads the schedule at (fraction + 1e-6): the drop may come that much early (1
        # iteration of the 108-epoch schedules' 1.58 million)
        early = math.ceil(1e-6 * cfg.lr_multiplier.num_updates)
        for it, expected in ((0, 1.0), (drop - 1 - early, 1.0), (drop, 0.1), (max_iter - 1, 0.1)):
            optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "initial_lr": 1.0}], lr=1.0)
            # what the hook builds, at iteration `it` (as when resuming there)
            LRMultiplier(optimizer, instantiate(cfg.lr_multiplier), max_iter, last_iter=it - 1)
            assert optimizer.param_groups[0]["lr"] == pytest.approx(expected), (overrides, it)


COCO_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


@pytest.mark.parametrize("path", COCO_CONFIGS, ids=[os.path.basename(p) for p in COCO_CONFIGS])
def test_coco_configs_keep_num_queries_detections_as_the_official_evaluation(path):
    """k = num_queries (300) of the query x class scores, as the official code evaluates; it
    follows num_queries and stays configurable. The official multi-scale code (the
    smca_conv_multi_scale configs) keeps 500."""
    from smca_d2.engine import load_config

    cfg = load_config(path)
    assert cfg.model.num_queries == 300
    if os.path.basename(path).startswith("smca_conv_multi_scale_"):
        assert cfg.model.test_topk == 500
    else:
        assert cfg.model.test_topk == 300
        assert load_config(path, ["model.num_queries=100"]).model.test_topk == 100
    assert load_config(path, ["model.test_topk=100"]).model.test_topk == 100
