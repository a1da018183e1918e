"""train_net.py end to end on things that go wrong: bad data, config typos, a NaN loss."""

import json

import torch
from reliability_helpers import run_train_net, synthetic_data, tiny


def _log(run):
    return run.stdout + run.stderr


def test_non_finite_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path):
    out = tmp_path / "out"
    run = run_train_net(
        tmp_path,
        *tiny(
            out,
            "train.max_iter=8",
            "train.checkpointer.period=3",
            "train.eval_period=0",
            "model.criterion._target_=reliability_helpers.NaNAtCall",
        ),
        SMCA_TEST_NAN_AT_CALL="4",
    )
    assert run.returncode != 0
    log = _log(run)
    assert "NonFiniteLossError: Non-finite loss at iteration 4: loss_bbox=nan (finite: loss_class=" in log
    assert f"The last complete checkpoint is {out}/model_0000002.pth" in log
    # nothing was written after the failure: the checkpoint of iteration 2 is the last one
    assert (out / "last_checkpoint").read_text() == "model_0000002.pth"
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000002.pth"]
    checkpoint = torch.load(out / "model_0000002.pth", weights_only=True)
    assert checkpoint["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert max(r["iteration"] for r in rows if "total_loss" in r) == 3  # iteration 4 never completed


def test_bad_boxes_are_cleaned_and_training_runs(tmp_path):
    data = synthetic_data(tmp_path)
    json_path = data / "synthetic" / "annotations" / "train.json"
    coco = json.loads(json_path.read_text())
    image = coco["images"][0]
    extra = [
        [image["width"] - 5, 2, 30, 10],  # partly outside: clipped
        [3, 3, 0, 8],  # zero width: dropped
        [float("nan"), 3, 5, 5],  # NaN: dropped
        [image["width"] + 10, 3, 5, 5],  # outside: dropped
    ]
    for i, bbox in enumerate(extra):
        coco["annotations"].append(
            {"id": 10_000 + i, "image_id": image["id"], "category_id": 1, "bbox": bbox, "area": 1.0, "iscrowd": 0}
        )
    json_path.write_text(json.dumps(coco))
    out = tmp_path / "out"
    run = run_train_net(tmp_path, *tiny(out, "train.max_iter=2", "train.eval_period=0"))
    assert run.returncode == 0, run.stderr[-3000:]
    log = _log(run)
    assert "1 clipped to the image" in log and "1 dropped for NaN or infinite coordinates" in log
    assert "1 dropped for zero or negative width/height" in log and "1 dropped for lying wholly outside" in log
    assert (out / "model_final.pth").is_file()


def test_unreadable_image_is_refused_before_training(tmp_path):
    data = synthetic_data(tmp_path)
    victim = sorted((data / "synthetic" / "train").iterdir())[3]
    content = victim.read_bytes()
    victim.write_bytes(content[: len(content) // 2])
    out = tmp_path / "out"
    run = run_train_net(tmp_path, *tiny(out, "train.max_iter=2"))
    assert run.returncode != 0
    log = _log(run)
    assert f"{victim}: cannot read the image" in log and "Fix or remove these images" in log
    assert "Starting training" not in log and not list(out.glob("*.pth"))


def test_missing_dataset_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    run = run_train_net(tmp_path, *tiny(out, "train.max_iter=2"), DETECTRON2_DATASETS=str(empty))
    assert run.returncode != 0
    # the prepared datasets were registered under the empty root
    assert f"the annotation file {empty}/synthetic/annotations/train.json does not exist" in _log(run)
    assert "python datasets/prepare_synthetic.py" in _log(run)
    assert not out.exists()  # refused before default_setup created anything


def test_misspelled_override_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    run = run_train_net(tmp_path, *tiny(out, "train.max_iters=2"))
    assert run.returncode != 0
    assert "UnknownConfigKeyError" in run.stderr and "did you mean: train.max_iter" in run.stderr
    assert not out.exists()
