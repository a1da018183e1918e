"""Every shipped config, reduced in size, goes through train_net.py: train -> checkpoint ->
resume -> evaluate; and round-trips through LazyConfig.save/load."""
import glob
import json
import os

import pytest

from detectron2.config import LazyConfig, instantiate

from test_train_net import REPO, run_train_net

CONFIGS = sorted(
    glob.glob(os.path.join(REPO, "configs", "*.py"))
    + glob.glob(os.path.join(REPO, "configs", "demo", "*.py"))
    + glob.glob(os.path.join(REPO, "configs", "convergence", "*.py"))
)
IDS = [os.path.relpath(p, os.path.join(REPO, "configs")) for p in CONFIGS]

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
    if "num_layers" in cfg.model.transformer.encoder:
        overrides.append("model.transformer.encoder.num_layers=1")
    if "min_sizes" in cfg.dataloader.train.mapper.augmentations:
        overrides += AUGMENTATION
    return overrides


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_trains_resumes_and_evaluates(path, tmp_path):
    out = tmp_path / "out"
    overrides = reduced_overrides(path, out)
    first = run_train_net(tmp_path, "--config-file", path, *overrides, "train.max_iter=2", "train.eval_period=2", check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "model_0000001.pth").is_file() or (out / "model_final.pth").is_file()
    resumed = run_train_net(tmp_path, "--config-file", path, "--resume", *overrides, "train.max_iter=3", "train.eval_period=3", check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "Starting training from iteration 2" in log and "copypaste: AP,AP50" in log
    saved = LazyConfig.load(str(out / "config.yaml"))  # the resolved config is loadable again
    assert saved.model.num_queries == 10
    metrics = [json.loads(line) for line in open(out / "metrics.json")]
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
