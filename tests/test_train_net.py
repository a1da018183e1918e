"""train_net.py end to end on a tiny dataset: train -> checkpoint -> resume -> eval-only."""

import json
import os
import subprocess
import sys

import pytest
import torch

from smca_d2.speedups.memory import glibc_malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "common", "r18_synthetic.py")


def run_train_net(tmp_path, *args, check=True, size_jitter=32):
    """Run train_net.py in `tmp_path` on a tiny generated dataset; `args` default to the small
    R18 config (the demo's base, single-scale) when they name no --config-file."""
    from smca_d2.data.synthetic import make_synthetic_coco

    data = tmp_path / "data"
    if not data.exists():
        make_synthetic_coco(str(data / "synthetic"), num_train=8, num_val=4, seed=1, size_jitter=size_jitter)
    env = dict(os.environ, DETECTRON2_DATASETS=str(data))
    if "--config-file" not in args:
        args = ("--config-file", CONFIG, *args)
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), *args]
    return subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, check=check)


def tiny_overrides(out):
    return [
        f"train.output_dir={out}",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "model.transformer.encoder.num_layers=1",
        "model.transformer.decoder.num_layers=2",
        "train.checkpointer.period=3",
        "train.log_period=1",
    ]


@pytest.mark.slow
def test_train_checkpoint_resume_eval(tmp_path):
    out = tmp_path / "out"
    first = run_train_net(tmp_path, *tiny_overrides(out), "train.max_iter=3", "train.eval_period=3", check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "model_final.pth").is_file() and (out / "config.yaml").is_file()
    assert "AP" in first.stdout + first.stderr
    if glibc_malloc():  # train.speedups.keep_freed_cpu_memory (default True) on the CPU
        assert "malloc keeps freed memory" in first.stdout + first.stderr
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("loss_class" in m for m in metrics)

    # Resumed with the moving average of the weights turned on: it starts from the resumed weights,
    # is evaluated, and saved next to them.
    ema = ["train.ema.enabled=True", "train.ema.decay=0.9"]
    resumed = run_train_net(
        tmp_path, "--resume", *tiny_overrides(out), "train.max_iter=5", "train.eval_period=5", *ema, check=False
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Starting training from iteration 3" in resumed.stdout + resumed.stderr
    assert "Evaluating the averaged (EMA) weights, 2 updates" in resumed.stdout + resumed.stderr
    train_iters = [
        m["iteration"] for m in map(json.loads, (out / "metrics.json").read_text().splitlines()) if "loss_class" in m
    ]
    assert max(train_iters) == 4  # iterations 0..4 of max_iter=5, the last two after the resume
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["model_ema"].keys() == final["model"].keys()
    assert any(not torch.equal(v, final["model"][k]) for k, v in final["model_ema"].items())

    evaluated = run_train_net(
        tmp_path,
        "--eval-only",
        *tiny_overrides(out),
        f"train.init_checkpoint={out}/model_final.pth",
        "train.speedups.keep_freed_cpu_memory=False",
        *ema,
        check=False,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "copypaste: AP,AP50" in evaluated.stdout + evaluated.stderr
    assert "Using the averaged (EMA) weights" in evaluated.stdout + evaluated.stderr
    assert "malloc keeps freed memory" not in evaluated.stdout + evaluated.stderr
    assert "meaningless" not in evaluated.stdout + evaluated.stderr  # a complete checkpoint

    untrained = run_train_net(
        tmp_path,
        "--eval-only",
        *tiny_overrides(out),
        "train.init_checkpoint=",
        "train.speedups.keep_freed_cpu_memory=False",
        "train.amp.enabled=True",
        check=False,
    )
    assert untrained.returncode == 0, untrained.stderr[-3000:]
    assert "the detections will be meaningless" in untrained.stdout + untrained.stderr
    # --eval-only with train.amp.enabled evaluates under bfloat16 autocast on the CPU (float32,
    # with a warning, on a CPU without bfloat16 instructions).
    log = untrained.stdout + untrained.stderr
    assert "Evaluating under bfloat16 autocast" in log or "no bfloat16 instructions" in log


@pytest.mark.slow
def test_num_classes_mismatch_is_refused_before_training(tmp_path):
    out = tmp_path / "out"
    result = run_train_net(tmp_path, *tiny_overrides(out), "model.num_classes=7", "train.max_iter=2", check=False)
    assert result.returncode != 0
    assert "model.num_classes=7 but dataset 'smca_synthetic_train' has 5 classes" in result.stderr
    assert not (out / "model_final.pth").exists()
