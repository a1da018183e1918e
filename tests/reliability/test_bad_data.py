"""Bad data in a COCO-format dataset: each case is handled (converted, clipped, dropped with a
logged count) or refused before training with a message naming the file and the problem."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reliability_helpers import register, simple_image, unique_name, write_coco

from smca_d2.data import (
    DatasetNotFoundError,
    DatasetValidationError,
    ResumableTrainLoader,
    RobustDatasetMapper,
    check_dataset_files,
    read_image,
    validated_dataset_dicts,
)
from smca_d2.data.annotations import sanitize_annotations
from smca_d2.data.images import image_size

from detectron2.structures import BoxMode


@pytest.fixture
def caplog_validation(caplog):
    caplog.set_level(logging.INFO, logger="smca_d2.data")
    return caplog


def box(image_id, bbox, **kw):
    return dict(image_id=image_id, bbox=bbox, **kw)


def dataset(tmp_path, images, annotations, **kw):
    json_path, image_dir = write_coco(str(tmp_path / unique_name("d")), images, annotations, **kw)
    return register(json_path, image_dir), json_path, image_dir


# --------------------------------------------------------------------------------------------
# Boxes: clipped or dropped, with counts
# --------------------------------------------------------------------------------------------
def test_bad_boxes_are_clipped_or_dropped_with_counts(tmp_path, caplog_validation):
    images = [simple_image(1), simple_image(2), simple_image(3)]
    annotations = [
        box(1, [10, 10, 20, 10]),  # fine
        box(1, [50, 30, 20, 20]),  # partly outside (image is 60 x 40): clipped to [50, 30, 10, 10]
        box(1, [-5, -5, 10, 10]),  # partly outside at the top left: clipped to [0, 0, 5, 5]
        box(1, [5, 5, 0, 10]),  # zero width: dropped
        box(1, [5, 5, 10, -3]),  # negative height: dropped
        box(2, [float("nan"), 5, 10, 10]),  # NaN: dropped (json.dumps writes NaN)
        box(2, [100, 100, 10, 10]),  # wholly outside: dropped
        box(2, [5, 5, float("inf"), 10]),  # infinite: dropped
    ]  # image 3 has no annotation at all
    name, _, _ = dataset(tmp_path, images, annotations)
    dicts = validated_dataset_dicts(name, filter_empty=False)
    by_id = {d["image_id"]: d for d in dicts}
    assert [a["bbox"] for a in by_id[1]["annotations"]] == [
        [10, 10, 20, 10],
        [50.0, 30.0, 10.0, 10.0],
        [0.0, 0.0, 5.0, 5.0],
    ]
    assert by_id[2]["annotations"] == [] and by_id[3]["annotations"] == []
    log = caplog_validation.text
    assert "2 clipped to the image" in log
    assert "2 dropped for NaN or infinite coordinates" in log
    assert "2 dropped for zero or negative width/height" in log
    assert "1 dropped for lying wholly outside the image" in log

    # Training: images left without boxes are dropped, with a count; evaluation keeps them.
    train = validated_dataset_dicts(name)
    assert [d["image_id"] for d in train] == [1]
    assert "2 of 3 images have no usable box" in caplog_validation.text


def test_xyxy_boxes_of_custom_loaders_are_clipped_in_their_mode():
    record = {
        "file_name": "x.png",
        "height": 10,
        "width": 10,
        "image_id": 1,
        "annotations": [
            {"bbox": [-1, 2, 12, 8], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},
            {"bbox": [3, 3, 3, 8], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},  # x1 == x0
        ],
    }
    dicts, stats = sanitize_annotations([record], "custom", num_classes=1)
    assert dicts[0]["annotations"] == [{"bbox": [0.0, 2.0, 10.0, 8.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0}]
    assert stats["clipped"] == 1 and stats["degenerate"] == 1


def test_category_out_of_range_in_custom_loader_is_refused():
    record = {
        "file_name": "x.png",
        "height": 10,
        "width": 10,
        "image_id": 1,
        "annotations": [{"bbox": [1, 1, 2, 2], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 3}],
    }
    with pytest.raises(DatasetValidationError, match=r"x.png: category_id 3 is not in \[0, 2\)"):
        sanitize_annotations([record], "custom", num_classes=2)


# --------------------------------------------------------------------------------------------
# The json: refused, naming the json and the ids
# --------------------------------------------------------------------------------------------
def test_unknown_category_id_is_refused_naming_json_and_ids(tmp_path):
    name, json_path, _ = dataset(tmp_path, [simple_image(1)], [box(1, [1, 1, 5, 5], category_id=7, id=42)])
    with pytest.raises(DatasetValidationError) as e:
        validated_dataset_dicts(name)
    message = str(e.value)
    assert json_path in message and name in message
    assert "category_id 7 is not in 'categories'" in message and "ids 42" in message


def test_duplicate_image_ids_are_refused_naming_json_ids_and_files(tmp_path):
    images = [simple_image(1, name="a.png"), simple_image(1, name="b.png"), simple_image(2)]
    name, json_path, _ = dataset(tmp_path, images, [box(1, [1, 1, 5, 5]), box(2, [1, 1, 5, 5])])
    with pytest.raises(DatasetValidationError) as e:
        validated_dataset_dicts(name)
    assert json_path in str(e.value) and "duplicate image id 1: a.png, b.png" in str(e.value)


def test_duplicate_annotation_ids_and_bad_sizes_are_refused(tmp_path):
    images = [simple_image(1), dict(id=2, file_name="none.png", height=0, width=10)]
    name, json_path, _ = dataset(tmp_path, images, [box(1, [1, 1, 5, 5], id=3), box(1, [2, 2, 5, 5], id=3)])
    with pytest.raises(DatasetValidationError) as e:
        validated_dataset_dicts(name)
    assert "duplicate annotation id(s): 3" in str(e.value)
    assert "image id 2 (none.png): height=0, width=10" in str(e.value)


def test_unparsable_json_is_refused(tmp_path):
    name, json_path, _ = dataset(tmp_path, [], [], raw_json='{"images": [')
    with pytest.raises(DatasetValidationError, match="not valid json"):
        validated_dataset_dicts(name)


def test_missing_json_or_image_folder_is_refused_with_how_to_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    name = register(str(tmp_path / "synthetic" / "annotations" / "train.json"), str(tmp_path / "synthetic" / "train"))
    with pytest.raises(DatasetNotFoundError) as e:
        validated_dataset_dicts(name)
    assert "annotation file" in str(e.value) and str(tmp_path / "synthetic" / "annotations" / "train.json") in str(
        e.value
    )
    assert "python datasets/prepare_synthetic.py" in str(e.value)

    json_path, _ = write_coco(str(tmp_path / "other"), [], [])
    name = register(json_path, str(tmp_path / "other" / "no_such_folder"))
    with pytest.raises(DatasetNotFoundError, match="image folder .*no_such_folder does not exist"):
        check_dataset_files(name)


def test_unregistered_dataset_name_suggests_close_names():
    with pytest.raises(DatasetNotFoundError, match="Did you mean 'smca_synthetic_train'"):
        check_dataset_files("smca_synthetic_trian")


# --------------------------------------------------------------------------------------------
# Image files: missing, unreadable, truncated, wrong size -> refused with the file name
# --------------------------------------------------------------------------------------------
def _jpeg(path, h=40, w=60, exif=None):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    if exif is not None:
        image.save(path, exif=exif, quality=90)
    else:
        image.save(path, quality=90)


def test_missing_unreadable_truncated_and_mismatched_images_are_refused(tmp_path):
    root = tmp_path / unique_name("imgs")
    images = [
        simple_image(1),
        dict(id=2, file_name="missing.png", height=40, width=60),
        dict(id=3, file_name="garbage.jpg", height=40, width=60),
        dict(id=4, file_name="truncated.jpg", height=40, width=60),
        dict(id=5, file_name="truncated.png", height=40, width=60),
        simple_image(6, h=30, w=60),
    ]  # written 30 x 60
    images[5]["height"] = 40  # ... but the json says 40 x 60
    annotations = [box(i, [1, 1, 5, 5]) for i in range(1, 7)]
    json_path, image_dir = write_coco(str(root), images, annotations)
    with open(os.path.join(image_dir, "garbage.jpg"), "wb") as f:
        f.write(b"this is not an image" * 10)
    _jpeg(os.path.join(image_dir, "full.jpg"))
    data = Path(image_dir, "full.jpg").read_bytes()
    with open(os.path.join(image_dir, "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) * 2 // 3])
    data = Path(image_dir, "0001.png").read_bytes()
    with open(os.path.join(image_dir, "truncated.png"), "wb") as f:
        f.write(data[: len(data) // 2])
    name = register(json_path, image_dir)

    with pytest.raises(DatasetValidationError) as e:
        validated_dataset_dicts(name)
    message = str(e.value)
    assert "5 of 6 image(s) cannot be used" in message
    assert f"{image_dir}/missing.png: file not found" in message
    assert f"{image_dir}/garbage.jpg: cannot read the image" in message
    assert f"{image_dir}/truncated.jpg: cannot read the image" in message and "truncated" in message
    assert f"{image_dir}/truncated.png: cannot read the image" in message
    assert (
        f"{image_dir}/0006.png: the image is 60x30 (width x height, after EXIF orientation) but the json says 60x40"
        in message
    )
    assert "0001.png" not in message

    # The checks can be turned off; then only the header-level problems remain for the mapper.
    dicts = validated_dataset_dicts(name, check_images=False)
    assert len(dicts) == 6


def test_full_decode_finds_damage_that_headers_do_not_show(tmp_path):
    root = tmp_path / unique_name("imgs")
    images = [simple_image(1, name="bad.png")]
    json_path, image_dir = write_coco(str(root), images, [box(1, [1, 1, 5, 5])])
    path = os.path.join(image_dir, "bad.png")
    data = bytearray(Path(path).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # damaged pixel data; header and end marker intact
    with open(path, "wb") as f:
        f.write(data)
    name = register(json_path, image_dir)
    validated_dataset_dicts(name)  # the header and the tail look fine
    with pytest.raises(DatasetValidationError, match="bad.png: cannot read the image"):
        validated_dataset_dicts(name, verify_images=True)


def test_exif_rotated_jpeg(tmp_path):
    root = tmp_path / unique_name("exif")
    os.makedirs(root / "images")
    exif = Image.Exif()
    exif[274] = 6  # rotate 90 degrees when displayed: stored 60 wide x 40 high, shown 40 x 60
    _jpeg(str(root / "images" / "rot.jpg"), exif=exif)
    assert image_size(str(root / "images" / "rot.jpg")) == (60, 40)
    assert read_image(str(root / "images" / "rot.jpg"), "RGB").shape == (60, 40, 3)

    # json with the displayed size: fine
    json_path, image_dir = write_coco(
        str(root), [dict(id=1, file_name="rot.jpg", height=60, width=40)], [box(1, [1, 1, 5, 5])]
    )
    assert len(validated_dataset_dicts(register(json_path, image_dir))) == 1
    # json with the stored size: the boxes were drawn on the unrotated image -> refused, explained
    json_path, image_dir = write_coco(
        str(root), [dict(id=1, file_name="rot.jpg", height=40, width=60)], [box(1, [1, 1, 5, 5])]
    )
    with pytest.raises(DatasetValidationError, match="EXIF orientation tag \\(6\\)"):
        validated_dataset_dicts(register(json_path, image_dir))


# --------------------------------------------------------------------------------------------
# Image modes: converted correctly
# --------------------------------------------------------------------------------------------
def test_image_modes_are_converted(tmp_path):
    h, w = 4, 6
    rgb = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)

    gray = Image.fromarray(rgb).convert("L")
    gray.save(tmp_path / "gray.png")
    out = read_image(str(tmp_path / "gray.png"), "RGB")
    assert out.shape == (h, w, 3) and (out == np.asarray(gray)[..., None]).all()

    palette = Image.fromarray(rgb).convert("P")
    palette.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(read_image(str(tmp_path / "pal.png"), "RGB"), np.asarray(palette.convert("RGB")))

    # RGBA: opaque pixels keep their colour, transparent ones become white (not the hidden colour)
    alpha = np.full((h, w), 255, np.uint8)
    alpha[0, :] = 0
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    out = read_image(str(tmp_path / "rgba.png"), "RGB")
    assert (out[0] == 255).all() and (out[1:] == rgb[1:]).all()
    assert (read_image(str(tmp_path / "rgba.png"), "BGR")[1:] == rgb[1:, :, ::-1]).all()

    # 16-bit: scaled (v / 257), not clipped to 255
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16).repeat(2, 0)
    Image.fromarray(values).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I;16")
    out = read_image(str(tmp_path / "i16.png"), "RGB")
    np.testing.assert_array_equal(out[..., 0], [[0, 100, 255]] * 2)
    assert (out[..., 0] == out[..., 2]).all()

    # CMYK JPEG and 1-bit PNG: converted by PIL as in detectron2
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert read_image(str(tmp_path / "cmyk.jpg"), "RGB").shape == (h, w, 3)
    Image.fromarray(rgb).convert("1").save(tmp_path / "bw.png")
    assert set(np.unique(read_image(str(tmp_path / "bw.png"), "RGB"))) <= {0, 255}


def test_detectron2_reader_saturates_16_bit_images(tmp_path):
    """Why read_image is replaced: detectron2's makes a 16-bit image almost white."""
    from detectron2.data.detection_utils import read_image as d2_read_image

    Image.fromarray(np.full((2, 2), 257 * 100, np.uint16)).save(tmp_path / "i16.png")
    assert (d2_read_image(str(tmp_path / "i16.png"), "RGB") == 255).all()
    assert (read_image(str(tmp_path / "i16.png"), "RGB") == 100).all()


def test_all_odd_modes_train_through_the_mapper(tmp_path):
    h, w = 40, 60
    rgb = np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8)
    pils = {
        "gray.png": Image.fromarray(rgb).convert("L"),
        "rgba.png": Image.fromarray(rgb).convert("RGBA"),
        "pal.png": Image.fromarray(rgb).convert("P"),
        "i16.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
    }
    images = [dict(id=i + 1, file_name=n, height=h, width=w, pil=p) for i, (n, p) in enumerate(pils.items())]
    name, _, _ = dataset(tmp_path, images, [box(i + 1, [5, 5, 20, 10]) for i in range(len(images))])
    dicts = validated_dataset_dicts(name)
    mapper = RobustDatasetMapper(is_train=True, augmentations=[], image_format="RGB")
    for d in dicts:
        out = mapper(d)
        assert out["image"].shape == (3, h, w) and out["image"].dtype == torch.uint8, d["file_name"]
        assert len(out["instances"]) == 1


def test_mapper_skips_an_image_that_disappears_during_training(tmp_path, caplog):
    images = [simple_image(i) for i in range(1, 5)]
    name, _, image_dir = dataset(tmp_path, images, [box(i, [5, 5, 20, 10]) for i in range(1, 5)])
    dicts = validated_dataset_dicts(name)
    os.remove(os.path.join(image_dir, "0002.png"))  # after validation
    mapper = RobustDatasetMapper(is_train=True, augmentations=[], image_format="RGB")
    assert mapper(next(d for d in dicts if d["image_id"] == 2)) is None
    assert "Skipping" in caplog.text and "0002.png" in caplog.text
    loader = ResumableTrainLoader(dicts, mapper=mapper, total_batch_size=2, seed=0)
    seen = [x["image_id"] for batch in _take(loader, 6) for x in batch]
    assert len(seen) == 12 and 2 not in seen  # another image takes its place


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]
