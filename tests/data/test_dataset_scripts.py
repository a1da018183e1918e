"""Tests of the dataset tooling: the synthetic generator, the deepforest converter and their CLIs."""

import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from smca_d2.data import deepforest
from smca_d2.data.synthetic import CLASS_NAMES, make_synthetic_coco

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load_json(path):
    with open(path) as f:
        return json.load(f)


def _assert_boxes_inside(coco):
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == len(coco["images"]), "duplicate image ids"
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"]), "duplicate ann ids"
    for ann in coco["annotations"]:
        image = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0, ann
        assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"], (ann, image)
        assert ann["iscrowd"] == 0 and ann["area"] == pytest.approx(w * h)


# --------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return root, make_synthetic_coco(str(root / "a"), num_train=20, num_val=5, seed=0)


def test_synthetic_is_valid_coco(synthetic):
    root, paths = synthetic
    for split, count in (("train", 20), ("val", 5)):
        api = COCO(paths[f"{split}_json"])
        assert len(api.getImgIds()) == count
        assert len(api.getAnnIds()) >= count  # at least one object per image
        assert sorted(api.getCatIds()) == list(range(1, len(CLASS_NAMES) + 1))
        assert [c["name"] for c in api.loadCats(api.getCatIds())] == list(CLASS_NAMES)
        _assert_boxes_inside(api.dataset)
        for image in api.dataset["images"]:
            with Image.open(os.path.join(paths[f"{split}_images"], image["file_name"])) as im:
                assert im.size == (image["width"], image["height"])
                assert im.mode == "RGB"


def test_synthetic_content(synthetic):
    _, paths = synthetic
    coco = _load_json(paths["train_json"])
    assert len({a["category_id"] for a in coco["annotations"]}) >= 4
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=21)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 6
    sides = np.array([a["bbox"][2:] for a in coco["annotations"]])
    assert sides.max() <= 60 and sides.max(axis=1).min() >= 12
    sizes = {(im["height"], im["width"]) for im in coco["images"]}
    assert len(sizes) > 1 and all(96 <= s <= 160 for hw in sizes for s in hw)


def test_synthetic_is_deterministic(synthetic):
    """Same seed, same bytes, whether rendered in one process or several; a training set's first
    images are those of a smaller one with the same seed."""
    root, paths = synthetic
    for workers in (1, 2):
        again = make_synthetic_coco(str(root / f"b{workers}"), num_train=20, num_val=5, seed=0, workers=workers)
        for key in ("train_json", "val_json"):
            assert Path(paths[key]).read_bytes() == Path(again[key]).read_bytes()
        for split in ("train_images", "val_images"):
            names = sorted(os.listdir(paths[split]))
            assert names == sorted(os.listdir(again[split]))
            assert all((Path(paths[split]) / n).read_bytes() == (Path(again[split]) / n).read_bytes() for n in names)
    other = make_synthetic_coco(str(root / "c"), num_train=20, num_val=5, seed=1)
    for key in ("train_json", "val_json"):
        assert Path(paths[key]).read_bytes() != Path(other[key]).read_bytes()
    smaller = make_synthetic_coco(str(root / "d"), num_train=8, num_val=5, seed=0)
    assert _load_json(smaller["train_json"])["images"] == _load_json(paths["train_json"])["images"][:8]
    assert Path(smaller["val_json"]).read_bytes() == Path(paths["val_json"]).read_bytes()


def test_synthetic_fixed_size_and_bad_size(tmp_path):
    paths = make_synthetic_coco(str(tmp_path), num_train=3, num_val=0, image_size=(80, 100), size_jitter=0)
    coco = _load_json(paths["train_json"])
    assert {(im["height"], im["width"]) for im in coco["images"]} == {(80, 100)}
    assert _load_json(paths["val_json"])["images"] == []
    with pytest.raises(ValueError):
        make_synthetic_coco(str(tmp_path / "small"), num_train=1, num_val=0, image_size=(64, 64))


# --------------------------------------------------------------------------------------------
# deepforest
# --------------------------------------------------------------------------------------------


def _voc(filename, width, height, objects):
    parts = [f"<annotation><filename>{filename}</filename>"]
    parts.append(f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>")
    for label, (x0, y0, x1, y1) in objects:
        parts.append(
            f"<object><name>{label}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def _coordinate_image(width, height):
    """RGB image whose red/green values are the pixel's x/y: shows where a crop came from."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx, yy, np.zeros_like(xx)], axis=-1).astype(np.uint8)


# 96 x 64 image cut into 32 px tiles without overlap: x at 0, 32, 64 and y at 0, 32.
BIG_BOXES = [
    ("Tree", (2, 2, 12, 12)),  # inside tile (0, 0)
    ("Tree", (26, 4, 38, 14)),  # half in (0, 0), half in (32, 0): kept in both
    ("Tree", (60, 40, 70, 50)),  # 40 % in (32, 32): dropped there; 60 % in (64, 32): kept
    ("Tree", (40, 31, 50, 41)),  # 1 px row in (32, 0): dropped; 90 % in (32, 32): kept
]
EXPECTED_TILES = {  # (left, top) -> boxes in tile coordinates, [x, y, w, h]
    (0, 0): [[2, 2, 10, 10], [26, 4, 6, 10]],
    (32, 0): [[0, 4, 6, 10]],
    (64, 0): [],
    (0, 32): [],
    (32, 32): [[8, 0, 10, 9]],
    (64, 32): [[0, 8, 6, 10]],
}


@pytest.fixture
def fake_wheel(tmp_path):
    """A wheel with the layout of deepforest 2.1.0 and tiny made-up images."""
    sources = {
        deepforest.TRAIN_SOURCES[0]: (_coordinate_image(96, 64), BIG_BOXES),
        deepforest.TRAIN_SOURCES[1]: (_coordinate_image(24, 20), [("Tree", (4, 4, 20, 16))]),
        "OSBS_029": (_coordinate_image(32, 32), [("Tree", (0, 0, 10, 10)), ("Tree", (20, 20, 32, 32))]),
        "SOAP_061": (_coordinate_image(32, 32), [("Alive", (1, 1, 5, 5)), ("Dead", (10, 10, 20, 25))]),
    }
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    path = wheel_dir / f"deepforest-{deepforest.DEEPFOREST_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("deepforest/__init__.py", "")
        zf.writestr("deepforest-2.1.0.dist-info/licenses/LICENSE", "MIT License\n\nCopyright (c) test\n")
        for stem, (pixels, objects) in sources.items():
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            zf.writestr(f"deepforest/data/{stem}.png", buffer.getvalue())
            height, width = pixels.shape[:2]
            zf.writestr(f"deepforest/data/{stem}.xml", _voc(f"{stem}.png", width, height, objects))
    return path


def test_tile_starts():
    assert deepforest.tile_starts(1249, 400, 0.25) == [0, 283, 566, 849]
    assert deepforest.tile_starts(800, 400, 0.0) == [0, 400]
    assert deepforest.tile_starts(300, 400, 0.25) == [0]
    for length in (401, 1035, 2299, 2472):
        starts = deepforest.tile_starts(length, 400, 0.25)
        assert starts[0] == 0 and starts[-1] + 400 == length
        assert all(0 < b - a <= 300 for a, b in zip(starts, starts[1:]))  # overlap >= 100 px


def test_deepforest_tiling_and_clipping(fake_wheel, tmp_path):
    out = tmp_path / "out"
    paths = deepforest.prepare_deepforest(str(out), wheel_dir=str(fake_wheel.parent), tile_size=32, overlap=0.0)
    assert paths["wheel"] == str(fake_wheel)
    train = COCO(paths["train_json"]).dataset
    _assert_boxes_inside(train)
    assert [c["name"] for c in train["categories"]] == ["tree"]

    big = [im for im in train["images"] if im["source"] == deepforest.TRAIN_SOURCES[0]]

    def boxes_of(image):
        return sorted(a["bbox"] for a in train["annotations"] if a["image_id"] == image["id"])

    got = {tuple(im["tile_origin"]): boxes_of(im) for im in big}
    assert got == {k: sorted(v) for k, v in EXPECTED_TILES.items()}
    assert all((im["width"], im["height"]) == (32, 32) for im in big)

    # Tiles are the right crops: pixel (0, 0) of a tile has the source coordinates of its origin.
    for im in big:
        pixels = np.asarray(Image.open(out / "train" / im["file_name"]))
        left, top = im["tile_origin"]
        assert pixels[0, 0].tolist() == [left, top, 0]

    # A source smaller than the tile is one (smaller) tile, its box untouched.
    small = [im for im in train["images"] if im["source"] == deepforest.TRAIN_SOURCES[1]]
    assert [(im["width"], im["height"], im["tile_origin"]) for im in small] == [(24, 20, [0, 0])]
    assert boxes_of(small[0]) == [[4, 4, 16, 12]]
    assert len(train["images"]) == 7 and len(train["annotations"]) == 6

    val = COCO(paths["val_json"]).dataset
    _assert_boxes_inside(val)
    assert [im["file_name"] for im in val["images"]] == ["OSBS_029.png", "SOAP_061.png"]
    assert sorted(a["bbox"] for a in val["annotations"]) == sorted(
        [[0, 0, 10, 10], [20, 20, 12, 12], [1, 1, 4, 4], [10, 10, 10, 15]]
    )
    assert {a["category_id"] for a in val["annotations"]} == {1}  # Alive/Dead/Tree -> tree
    assert (out / "LICENSE.deepforest.txt").read_text().startswith("MIT License")


def test_deepforest_default_tiles_keep_boxes_whole(fake_wheel, tmp_path):
    # Overlapping tiles (stride 12) and a wheel given as a file: every box is whole in some tile.
    paths = deepforest.prepare_deepforest(str(tmp_path), wheel_dir=str(fake_wheel), tile_size=32, overlap=0.5)
    train = _load_json(paths["train_json"])
    _assert_boxes_inside(train)
    assert len(train["images"]) == 5 * 3 + 1  # x at 0, 16, 32, 48, 64; y at 0, 16, 32; small image
    whole = set()
    for im in train["images"]:
        left, top = im["tile_origin"]
        for a in train["annotations"]:
            if a["image_id"] == im["id"]:
                x, y, w, h = a["bbox"]
                whole.add((im["source"], x + left, y + top, x + left + w, y + top + h))
    big = {(deepforest.TRAIN_SOURCES[0], *box) for _, box in BIG_BOXES}
    assert big <= whole


def test_deepforest_download_failure_is_explained(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert "download" in cmd and f"deepforest=={deepforest.DEEPFOREST_VERSION}" in cmd
        stderr = "ERROR: No matching distribution found"
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(deepforest.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match=r"(?s)No matching distribution.*pip download --no-deps"):
        deepforest.prepare_deepforest(str(tmp_path / "out"), wheel_dir=str(tmp_path))
    assert not (tmp_path / "out").exists()


REAL_WHEEL = os.environ.get("DEEPFOREST_WHEEL", "")


@pytest.mark.skipif(
    not (REAL_WHEEL and os.path.exists(REAL_WHEEL)),
    reason="network-free by default: set DEEPFOREST_WHEEL to the downloaded deepforest-2.1.0 wheel",
)
def test_deepforest_real_wheel(tmp_path):
    paths = deepforest.prepare_deepforest(str(tmp_path), wheel_dir=REAL_WHEEL)
    train, val = _load_json(paths["train_json"]), _load_json(paths["val_json"])
    assert len(train["images"]) == 16 + 64 and len(val["images"]) == 2
    assert len(val["annotations"]) == 61 + 37
    _assert_boxes_inside(train)
    _assert_boxes_inside(val)


# --------------------------------------------------------------------------------------------
# command-line scripts
# --------------------------------------------------------------------------------------------


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_synthetic_cli(tmp_path, capsys, monkeypatch):
    script = _script("prepare_synthetic")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert script.default_output() == os.path.join(str(tmp_path), "synthetic")
    script.main(["--output", str(tmp_path / "s"), "--num-train", "4", "--num-val", "2"])
    printed = capsys.readouterr().out
    assert "train:     4 images" in printed and "val  :     2 images" in printed
    assert len(_load_json(tmp_path / "s" / "annotations" / "train.json")["images"]) == 4


def test_prepare_synthetic_does_not_import_torch(tmp_path, monkeypatch):
    """`make demo` runs the script before training: it must not spend seconds importing torch
    and detectron2 (the generator needs numpy and PIL), and its default output is the one the
    registered datasets read."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['prepare_synthetic.py', '--output', {str(tmp_path / 's')!r}, '--num-train', '3', '--num-val', '1']\n"
        "module = runpy.run_path('datasets/prepare_synthetic.py', run_name='__main__')\n"
        "assert 'torch' not in sys.modules and 'smca_d2' not in sys.modules, sorted(sys.modules)\n"
        "print(module['default_output']())\n"
    )
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path / "root")}
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, check=True, capture_output=True, text=True
    )
    assert len(_load_json(tmp_path / "s" / "annotations" / "train.json")["images"]) == 3
    from smca_d2.data.datasets import datasets_root

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "root"))
    assert run.stdout.splitlines()[-1] == os.path.join(datasets_root(), "synthetic")


def test_prepare_deepforest_cli(fake_wheel, tmp_path, capsys):
    script = _script("prepare_deepforest")
    script.main(["--output", str(tmp_path / "d"), "--wheel", str(fake_wheel), "--tile-size", "32"])
    printed = capsys.readouterr().out
    assert "val  :    2 images,     4 boxes" in printed
    assert (tmp_path / "d" / "annotations" / "train.json").exists()


def test_synthetic_train_800_is_the_first_800_training_images(tmp_path):
    from smca_d2.data import datasets

    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    assert "smca_synthetic_train_800" in DatasetCatalog.list()
    paths = make_synthetic_coco(str(tmp_path), num_train=803, num_val=1)
    register_coco_instances("test_synthetic_803", {}, paths["train_json"], paths["train_images"])
    dicts = datasets._first_images("test_synthetic_803_first", "test_synthetic_803", 800)
    assert [d["image_id"] for d in dicts] == list(range(1, 801))
    assert dicts[-1]["file_name"].endswith("000800.jpg")
