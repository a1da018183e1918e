"""The COCO-sized dataset generator (smca_d2/data/coco_sized.py, datasets/prepare_coco_sized.py):
counts, image headers, and COCO train2017's distributions at a small scale."""

import json
import os

import numpy as np
import pytest
from conftest import REPO, load_script
from PIL import Image

from smca_d2.data.coco_sized import COCO_TRAIN2017_BOXES, COCO_TRAIN2017_IMAGES, make_coco_sized_dataset

NUM_IMAGES = 1500


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_sized")
    paths = make_coco_sized_dataset(str(root), num_images=NUM_IMAGES)
    with open(paths["json_file"]) as f:
        return paths, json.load(f)


def test_counts_and_categories(generated):
    paths, coco = generated
    assert len(coco["images"]) == NUM_IMAGES
    assert len(coco["annotations"]) == round(COCO_TRAIN2017_BOXES * NUM_IMAGES / COCO_TRAIN2017_IMAGES)
    assert len({i["id"] for i in coco["images"]}) == NUM_IMAGES
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    ids = sorted(c["id"] for c in coco["categories"])
    assert len(ids) == 80 and ids[0] == 1 and ids[-1] == 90  # COCO's ids, with gaps
    assert {"id": 1, "name": "person", "supercategory": "thing"} in coco["categories"]
    assert {a["category_id"] for a in coco["annotations"]} <= set(ids)


def test_every_image_is_a_jpeg_with_the_json_size(generated):
    paths, coco = generated
    assert len(os.listdir(paths["image_root"])) == NUM_IMAGES
    for image in coco["images"]:
        path = os.path.join(paths["image_root"], image["file_name"])
        assert not os.path.islink(path) and os.stat(path).st_nlink == 1
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.size == (image["width"], image["height"])
    with Image.open(path) as im:
        im.load()  # a real JPEG, that decodes


def test_distributions_are_coco_like(generated):
    _, coco = generated
    heights = np.array([i["height"] for i in coco["images"]])
    widths = np.array([i["width"] for i in coco["images"]])
    assert 0.9 < (np.maximum(heights, widths) == 640).mean() < 1.0
    assert 0.65 < (widths > heights).mean() < 0.85  # landscape
    per_image = np.bincount(
        np.unique([a["image_id"] for a in coco["annotations"]], return_inverse=True)[1],
    )
    empty = NUM_IMAGES - len(per_image)
    assert 0 < empty < 0.03 * NUM_IMAGES
    assert len(coco["annotations"]) / NUM_IMAGES == pytest.approx(7.27, abs=0.01)
    assert per_image.max() > 25 and np.median(per_image) < 7.27  # a long tail
    boxes = np.array([a["bbox"] for a in coco["annotations"]])
    area = boxes[:, 2] * boxes[:, 3]
    small, large = (area < 32**2).mean(), (area >= 96**2).mean()
    assert small == pytest.approx(0.41, abs=0.04) and large == pytest.approx(0.24, abs=0.04)
    assert 0.003 < np.mean([a["iscrowd"] for a in coco["annotations"]]) < 0.025
    person = np.mean([a["category_id"] == 1 for a in coco["annotations"]])
    assert person == pytest.approx(0.3, abs=0.04)


def test_segmentations_span_their_boxes_and_crowds_are_rle(generated):
    from pycocotools import mask as mask_util

    paths, coco = generated
    sizes = {i["id"]: (i["height"], i["width"]) for i in coco["images"]}
    crowds = 0
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        H, W = sizes[ann["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= W + 1e-6 and y + h <= H + 1e-6
        if ann["iscrowd"]:
            crowds += 1
            rle = ann["segmentation"]
            assert rle["size"] == [H, W] and sum(rle["counts"]) == H * W
            assert mask_util.area(mask_util.frPyObjects(rle, H, W)) == ann["area"] == w * h
        else:
            (polygon,) = ann["segmentation"]
            xs, ys = polygon[0::2], polygon[1::2]
            assert len(xs) >= 6 and 0 < ann["area"] <= w * h
            assert min(xs) == pytest.approx(x, abs=0.011) and max(xs) == pytest.approx(x + w, abs=0.011)
            assert min(ys) == pytest.approx(y, abs=0.011) and max(ys) == pytest.approx(y + h, abs=0.011)
    assert crowds > 0
    # Bytes per box as in COCO's 450 MB json, so that parsing costs what it does there.
    per_box = os.path.getsize(paths["json_file"]) / len(coco["annotations"])
    assert 450 < per_box < 650


def test_same_seed_same_bytes_and_the_cli_scale(tmp_path):
    a = make_coco_sized_dataset(str(tmp_path / "a"), num_images=30, num_boxes=100, seed=3, write_images=False)
    b = make_coco_sized_dataset(str(tmp_path / "b"), num_images=30, num_boxes=100, seed=3, write_images=False)
    with open(a["json_file"], "rb") as fa, open(b["json_file"], "rb") as fb:
        assert fa.read() == fb.read()
    assert not os.listdir(a["image_root"])
    prepare = load_script("datasets/prepare_coco_sized.py")
    prepare.main(["--scale", "0.001", "--output", str(tmp_path / "c"), "--no-images"])
    with open(tmp_path / "c" / "annotations" / "instances.json") as f:
        coco = json.load(f)
    assert len(coco["images"]) == 118 and len(coco["annotations"]) == 858


def test_the_default_output_is_git_ignored(monkeypatch):
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    with open(os.path.join(REPO, ".gitignore")) as f:
        assert "/datasets/coco_sized/" in f.read().split()
    assert (
        load_script("datasets/prepare_coco_sized.py").default_output().endswith(os.path.join("datasets", "coco_sized"))
    )
