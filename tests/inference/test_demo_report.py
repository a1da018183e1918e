"""The pictures at the end of `make demo` (tools/demo_report.py, smca_d2/inference/demo_report.py)."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from smca_d2.inference.demo_report import next_commands, read_metrics, save_learning_curve
from tests.test_train_net import run_train_net, tiny_overrides

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, "configs", "demo", "smca_r18_synthetic.py")


def _write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_read_metrics_keeps_loss_and_ap_and_the_last_value_of_a_repeated_iteration(tmp_path):
    path = _write_metrics(
        tmp_path / "metrics.json",
        [
            {"iteration": 0, "total_loss": 9.0, "lr": 1e-4},
            {"iteration": 1, "total_loss": 8.0},
            {"iteration": 1, "bbox/AP": 3.5, "bbox/AP50": 9.0},
            {"iteration": 1, "total_loss": 7.5},  # resumed from a checkpoint at iteration 1
            {"iteration": 2, "total_loss": 7.0},
            {"iteration": 3, "bbox/AP": 4.5},  # after training (max_iter 3)
        ],
    )
    assert read_metrics(path) == {"loss": [(0, 9.0), (1, 7.5), (2, 7.0)], "ap": [(2, 3.5), (3, 4.5)]}
    out = save_learning_curve(path, str(tmp_path / "curve.png"))
    assert Image.open(out).size[0] > 300


def test_bad_metrics_fail_clearly(tmp_path):
    broken = tmp_path / "metrics.json"
    broken.write_text('{"iteration": 0, "total_loss": 1.0}\n{"iteration": 1,\n')
    with pytest.raises(ValueError, match="line 2: not JSON"):
        read_metrics(str(broken))
    only_ap = _write_metrics(tmp_path / "ap.json", [{"iteration": 4, "bbox/AP": 1.0}])
    with pytest.raises(ValueError, match="no training loss"):
        save_learning_curve(only_ap, str(tmp_path / "curve.png"))
    assert not (tmp_path / "curve.png").exists()


def test_next_commands_name_this_run():
    text = next_commands("configs/demo/smca_r18_synthetic.py", "output/demo/model_final.pth")
    assert "demo/demo.py --config-file configs/demo/smca_r18_synthetic.py" in text
    assert "--eval-only train.init_checkpoint=output/demo/model_final.pth" in text
    assert "configs/smca_single_scale_r50_50ep.py" in text


def _report(tmp_path, *args):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "data"))
    cmd = [sys.executable, os.path.join(REPO, "tools", "demo_report.py"), "--config-file", DEMO, *args]
    return subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True)


@pytest.mark.slow
def test_demo_report_after_a_short_demo_run(tmp_path):
    out = tmp_path / "out"
    overrides = [*tiny_overrides(out), "train.max_iter=4", "train.eval_period=2", "train.checkpointer.period=100"]
    trained = run_train_net(tmp_path, "--config-file", DEMO, *overrides, check=False)
    assert trained.returncode == 0, trained.stderr[-3000:]

    report = _report(tmp_path, "--num-images", "3", "--opts", *overrides)
    assert report.returncode == 0, report.stderr[-3000:]
    for name in ("detections.png", "smca_maps.png", "learning_curve.png"):
        path = out / name
        assert str(path) in report.stdout
        assert min(Image.open(path).size) > 200
    assert "Next:" in report.stdout and f"train.init_checkpoint={out}/model_final.pth" in report.stdout
    # Evaluated after 2 and 4 (the end) iterations: two AP points on the curve.
    assert [it for it, _ in read_metrics(str(out / "metrics.json"))["ap"]] == [2, 4]


def test_demo_report_without_a_run_says_what_to_do(tmp_path):
    report = _report(tmp_path, "--run-dir", str(tmp_path / "nothing"))
    assert report.returncode == 1
    assert "no checkpoint at" in report.stderr and "train first" in report.stderr
    assert not (tmp_path / "nothing").exists()


def test_pictures_do_not_depend_on_the_predictors_channel_order(tmp_path):
    import cv2
    import numpy as np

    from smca_d2.inference import LazyPredictor
    from smca_d2.inference.demo_report import save_detection_grid, save_maps_grid
    from tests.tiny_smca import random_image, tiny_config, write_checkpoint

    cfg = tiny_config()
    checkpoint, _ = write_checkpoint(cfg, str(tmp_path / "tiny.pth"))
    image = str(tmp_path / "image.png")
    cv2.imwrite(image, random_image(64, 80))  # BGR on disk, as OpenCV writes it
    records = [{"file_name": image, "annotations": []}]
    drawn = {}
    for order in ("BGR", "RGB"):
        predictor = LazyPredictor(cfg, checkpoint, device="cpu", input_format=order)
        grid = save_detection_grid(predictor, records, str(tmp_path / f"grid_{order}.png"), confidence_threshold=0.0)
        maps = save_maps_grid(predictor, [image], str(tmp_path / f"maps_{order}.png"), per_image=1)
        drawn[order] = [np.asarray(Image.open(p)) for p in (grid, maps)]
    for bgr, rgb in zip(drawn["BGR"], drawn["RGB"]):
        assert np.array_equal(bgr, rgb)
