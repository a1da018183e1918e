"""validated_dataset_dicts parses a COCO json once and gives detectron2's dicts; the checks made
at once (the json's from pycocotools' index, the boxes with numpy) decide as the one-by-one ones."""

import json

import numpy as np
import pycocotools.coco
import pytest
from reliability_helpers import register, simple_image, unique_name, write_coco

from smca_d2.data import DatasetValidationError, validated_dataset_dicts
from smca_d2.data import annotations as annotations_module
from smca_d2.data.annotations import sanitize_annotations
from smca_d2.data.coco_json import load_coco_api, use_parsed_coco
from smca_d2.data.coco_sized import make_coco_sized_dataset

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode


@pytest.fixture(scope="module")
def coco_sized(tmp_path_factory):
    """A small COCO-sized dataset: polygons, crowd RLEs, images without boxes, sparse ids."""
    paths = make_coco_sized_dataset(str(tmp_path_factory.mktemp("coco_sized")), num_images=200, write_images=False)
    return paths["json_file"], paths["image_root"]


@pytest.fixture
def json_loads(monkeypatch):
    """The files that json.load parses (ours and pycocotools' alike)."""
    parsed, original = [], json.load

    def counting_load(f, *args, **kwargs):
        parsed.append(getattr(f, "name", f))
        return original(f, *args, **kwargs)

    monkeypatch.setattr(json, "load", counting_load)
    return parsed


def test_the_json_is_parsed_once_and_the_dicts_are_detectron2s(coco_sized, json_loads):
    json_file, image_root = coco_sized
    name = register(json_file, image_root)
    ours = validated_dataset_dicts(name, filter_empty=False, check_images=False)
    assert json_loads == [json_file]
    assert pycocotools.coco.COCO.__name__ == "COCO"  # restored
    ours_classes = MetadataCatalog.get(name).thing_classes
    theirs = DatasetCatalog.get(name)
    assert len(json_loads) == 2  # detectron2 alone parses it itself
    assert ours == theirs and ours_classes == MetadataCatalog.get(name).thing_classes
    assert any(a["iscrowd"] for d in ours for a in d["annotations"]) and any(not d["annotations"] for d in ours)


def test_the_parsed_json_is_handed_over_once(coco_sized, json_loads):
    json_file, image_root = coco_sized
    coco_api = load_coco_api(json_file)
    with use_parsed_coco(json_file, coco_api):
        first = load_coco_json(json_file, image_root)
        second = load_coco_json(json_file, image_root)  # parses the file afresh
        assert pycocotools.coco.COCO(None).dataset == {}  # other constructions are pycocotools' own
    assert len(json_loads) == 2 and first == second
    assert pycocotools.coco.COCO.__name__ == "COCO"


def test_problems_found_through_the_index_are_named(tmp_path):
    images = [simple_image(1), simple_image(2)]
    cases = [
        (
            [dict(image_id=1, bbox=[1, 1, 5, 5], id=4), dict(image_id=2, bbox=[1, 1, 5, 5], id=4)],
            "duplicate annotation",
        ),
        ([dict(image_id=1, bbox=[1, 1, 5], id=1)], r"bbox \[1, 1, 5\] is not four numbers"),
        ([dict(image_id=1, bbox=[1, 1, "5", 5], id=1)], "is not four numbers"),
        ([dict(bbox=[1, 1, 5, 5], id=1)], "pycocotools cannot index it.*'image_id'"),
        ([dict(image_id=1, bbox=[1, 1, 5, 5], id=1, category_id=9)], "category_id 9 is not in 'categories'"),
    ]
    for annotations, message in cases:
        json_file, image_dir = write_coco(str(tmp_path / unique_name()), images, annotations)
        with pytest.raises(DatasetValidationError, match=message) as e:
            validated_dataset_dicts(register(json_file, image_dir), check_images=False)
        assert json_file in str(e.value)


def _random_records(rng, n_images=60):
    """Records with boxes of every kind: fine, partly or wholly outside, degenerate, NaN/inf,
    integer and float coordinates, XYWH and XYXY."""
    records = []
    for i in range(n_images):
        h, w = int(rng.integers(20, 80)), int(rng.integers(20, 80))
        anns = []
        for _ in range(int(rng.integers(0, 8))):
            box = rng.uniform(-30, 100, 4).round(int(rng.integers(0, 3)))
            kind = rng.random()
            if kind < 0.05:
                box[int(rng.integers(4))] = np.nan
            elif kind < 0.1:
                box[int(rng.integers(4))] = np.inf
            elif kind < 0.2:
                box[2] = 0
            box = [int(v) for v in box] if rng.random() < 0.3 and np.isfinite(box).all() else box.tolist()
            mode = BoxMode.XYXY_ABS if rng.random() < 0.3 else BoxMode.XYWH_ABS
            anns.append({"bbox": box, "bbox_mode": mode, "category_id": int(rng.integers(3))})
        records.append({"file_name": f"{i}.jpg", "image_id": i, "height": h, "width": w, "annotations": anns})
    return records


def test_boxes_checked_at_once_as_one_by_one(monkeypatch):
    import copy

    records = _random_records(np.random.default_rng(0))
    at_once, stats = sanitize_annotations(copy.deepcopy(records), "random", num_classes=3)
    monkeypatch.setattr(annotations_module, "_check_boxes_at_once", lambda *args: None)
    one_by_one, stats_one_by_one = sanitize_annotations(copy.deepcopy(records), "random", num_classes=3)
    assert stats == stats_one_by_one
    assert {"clipped", "outside", "degenerate", "non_finite"} <= set(stats)
    assert at_once == one_by_one
