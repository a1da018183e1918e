"""demo/demo.py: a folder of images (subprocess), a single image to a file, a video."""

import importlib.util
import json
import os
import subprocess
import sys

import cv2
import pytest
from tiny_smca import R18_CONFIG, REPO, TINY_OVERRIDES, random_image, tiny_config, write_checkpoint

from smca_d2.inference import collect_inputs, instances_to_json
from smca_d2.inference.demo import output_paths

DEMO = os.path.join(REPO, "demo", "demo.py")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _ = write_checkpoint(tiny_config(), str(tmp_path_factory.mktemp("ckpt") / "tiny.pth"))
    return path


def _load_demo():
    spec = importlib.util.spec_from_file_location("smca_d2_demo_script", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_on_a_folder(tmp_path, checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(80, 100), (96, 72)]):
        cv2.imwrite(str(images / f"img{i}.jpg"), random_image(h, w, seed=i))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        DEMO,
        "--config-file",
        R18_CONFIG,
        "--input",
        str(images),
        "--output",
        str(out),
        "--confidence-threshold",
        "0.0",
        "--device",
        "cpu",
        "--opts",
        *TINY_OVERRIDES,
        f"train.init_checkpoint={checkpoint}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(os.listdir(out)) == ["img0.jpg", "img0.json", "img1.jpg", "img1.json"]
    for i, (h, w) in enumerate([(80, 100), (96, 72)]):
        drawing = cv2.imread(str(out / f"img{i}.jpg"))
        assert drawing.shape == (h, w, 3)
        with open(out / f"img{i}.json") as f:
            result = json.load(f)
        assert result["file_name"].endswith(f"img{i}.jpg") and result["image_size"] == [h, w]
        n = len(result["boxes"])
        assert n > 0 and len(result["scores"]) == len(result["classes"]) == len(result["class_names"]) == n
        assert all(len(b) == 4 and 0 <= b[0] <= b[2] <= w and 0 <= b[1] <= b[3] <= h for b in result["boxes"])
        assert all(isinstance(name, str) for name in result["class_names"])
        assert result["scores"] == sorted(result["scores"], reverse=True)


def test_single_image_to_a_file_and_threshold(tmp_path, checkpoint):
    demo = _load_demo()
    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), random_image(64, 64))
    opts = ["--device", "cpu", "--opts", *TINY_OVERRIDES, f"train.init_checkpoint={checkpoint}"]

    def run(output, threshold):
        args = ["--config-file", R18_CONFIG, "--input", str(image), "--output", str(tmp_path / output)]
        return demo.main(args + ["--confidence-threshold", threshold] + opts)

    assert run("drawn.png", "0.0") == 0
    with open(tmp_path / "drawn.json") as f:
        assert len(json.load(f)["boxes"]) > 0
    assert cv2.imread(str(tmp_path / "drawn.png")).shape == (64, 64, 3)
    # Nothing of an untrained model reaches 0.99.
    assert run("high.png", "0.99") == 0
    with open(tmp_path / "high.json") as f:
        assert json.load(f)["boxes"] == []


def test_demo_on_a_video(tmp_path, checkpoint):
    demo = _load_demo()
    video = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 5, (80, 64))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG videos")
    for i in range(3):
        writer.write(random_image(64, 80, seed=i))
    writer.release()
    out = tmp_path / "video_out"
    args = ["--config-file", R18_CONFIG, "--video-input", video, "--output", str(out), "--confidence-threshold", "0.0"]
    assert demo.main(args + ["--device", "cpu", "--opts", *TINY_OVERRIDES, f"train.init_checkpoint={checkpoint}"]) == 0
    with open(out / "clip.json") as f:
        frames = json.load(f)["frames"]
    assert [f["frame"] for f in frames] == [0, 1, 2] and all(len(f["boxes"]) > 0 for f in frames)
    capture = cv2.VideoCapture(str(out / "clip.mp4"))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    assert count == 3


def test_collect_inputs_and_output_paths(tmp_path):
    for name in ["b.jpg", "a.png", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"x")
    found = collect_inputs([str(tmp_path), str(tmp_path / "sub" / "*.png"), str(tmp_path / "a.png")])
    assert [os.path.relpath(p, tmp_path) for p in found] == ["a.png", "b.jpg", os.path.join("sub", "a.png")]
    with pytest.raises(FileNotFoundError):
        collect_inputs([str(tmp_path / "missing*.jpg")])
    used = set()
    first = output_paths(found[0], str(tmp_path / "o"), 3, used)
    second = output_paths(found[2], str(tmp_path / "o"), 3, used)  # same file name, other folder
    assert os.path.basename(first[0]) == "a.png" and os.path.basename(second[0]) == "a_1.png"
    assert first[1].endswith("a.json") and second[1].endswith("a_1.json")


def test_instances_to_json_names():
    import torch

    from detectron2.structures import Boxes, Instances

    inst = Instances((10, 20))
    inst.pred_boxes = Boxes(torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 5.0, 5.0]]))
    inst.scores = torch.tensor([0.9, 0.5])
    inst.pred_classes = torch.tensor([1, 7])
    out = instances_to_json(inst, ["cat", "dog"], file_name="x.jpg")
    assert out == {
        "file_name": "x.jpg",
        "image_size": [10, 20],
        "boxes": [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 5.0, 5.0]],
        "scores": [0.9, 0.5],
        "classes": [1, 7],
        "class_names": ["dog", "7"],
    }
