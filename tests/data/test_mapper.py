"""The DETR-style training mapper of configs/common/data/coco_detr.py on hand-made annotations."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from smca_d2.data.transforms import RandomChoice

from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FixedCrop(T.Augmentation):
    def __init__(self, x0, y0, w, h):
        super().__init__()
        self.box = (x0, y0, w, h)

    def get_transform(self, image):
        return T.CropTransform(*self.box)


@pytest.fixture
def record(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.full((200, 300, 3), 128, dtype=np.uint8)).save(path)
    box = lambda x0, y0, x1, y1, c=0, crowd=0: {
        "bbox": [x0, y0, x1, y1],
        "bbox_mode": BoxMode.XYXY_ABS,
        "category_id": c,
        "iscrowd": crowd,
    }
    return {
        "file_name": str(path),
        "height": 200,
        "width": 300,
        "image_id": 1,
        "annotations": [
            box(10, 10, 60, 60, c=1),  # inside the crop
            box(90, 20, 140, 90, c=2),  # half inside: clipped to the crop
            box(200, 150, 280, 190, c=3),  # outside the crop: dropped
            box(20, 20, 40, 40, c=4, crowd=1),  # crowd: dropped
        ],
    }


def test_mapper_drops_crowd_and_cropped_away_boxes_and_clips(record):
    mapper = DatasetMapper(is_train=True, augmentations=[FixedCrop(0, 0, 120, 100)], image_format="RGB")
    out = mapper(record)
    assert out["image"].shape == (3, 100, 120)
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [1, 2]
    torch.testing.assert_close(inst.gt_boxes.tensor, torch.tensor([[10.0, 10, 60, 60], [90, 20, 120, 90]]))


def test_image_left_without_boxes_gives_empty_instances(record):
    mapper = DatasetMapper(is_train=True, augmentations=[FixedCrop(150, 0, 40, 40)], image_format="RGB")
    out = mapper(record)
    assert len(out["instances"]) == 0


def test_detr_augmentation_from_config(record):
    cfg = LazyConfig.load(os.path.join(REPO, "configs", "smca_single_scale_r50_50ep.py"))
    mapper = instantiate(cfg.dataloader.train.mapper)
    assert isinstance(mapper.augmentations.augs[0], T.RandomFlip)
    assert isinstance(mapper.augmentations.augs[1], RandomChoice)
    np.random.seed(0)
    shapes = set()
    for _ in range(20):
        out = mapper(dict(record))
        h, w = out["image"].shape[1:]
        shapes.add((h, w))
        assert min(h, w) in range(480, 801, 32) and max(h, w) <= 1333
        boxes = out["instances"].gt_boxes.tensor
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (out["instances"].gt_classes != 4).all()  # the crowd box never reaches the model
    assert len(shapes) > 3  # multi-scale

    test_mapper = instantiate(cfg.dataloader.test.mapper)
    assert test_mapper(dict(record))["image"].shape[1:] == (800, 1200)


def test_random_choice_uses_every_choice():
    aug = RandomChoice([T.ResizeShortestEdge(10, 100), [T.ResizeShortestEdge(20, 100)]])
    np.random.seed(0)
    sizes = set()
    for _ in range(20):
        inp = T.AugInput(np.zeros((40, 60, 3), dtype=np.uint8))
        aug(inp)
        sizes.add(inp.image.shape[0])
    assert sizes == {10, 20}
    with pytest.raises(ValueError):
        RandomChoice([])


def test_image_cache_reads_each_file_once_and_gives_the_same_results(record, monkeypatch):
    """With image_cache_mb, an image is read once; later calls give the same outputs (flipped)
    as an uncached mapper; the cached array is read-only. A cache too small for an image keeps
    none."""
    from smca_d2.data import RobustDatasetMapper
    from smca_d2.data import mapper as mapper_module

    reads = []
    real_read = mapper_module.read_image
    monkeypatch.setattr(mapper_module, "read_image", lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    augs = [T.RandomFlip(prob=1.0, horizontal=True)]
    plain = RobustDatasetMapper(is_train=True, augmentations=augs, image_format="RGB")
    cached = RobustDatasetMapper(is_train=True, augmentations=augs, image_format="RGB", image_cache_mb=1)
    expected = plain(record)
    reads.clear()
    for _ in range(3):
        out = cached(record)
        torch.testing.assert_close(out["image"], expected["image"], rtol=0, atol=0)
        torch.testing.assert_close(out["instances"].gt_boxes.tensor, expected["instances"].gt_boxes.tensor)
    assert reads == [record["file_name"]]

    assert not cached._image_cache[record["file_name"]].flags.writeable

    too_small = RobustDatasetMapper(is_train=True, augmentations=augs, image_format="RGB", image_cache_mb=0.1)
    reads.clear()
    too_small(record), too_small(record)
    assert reads == [record["file_name"]] * 2
    with pytest.raises(ValueError, match="image_cache_mb"):
        RobustDatasetMapper(is_train=True, augmentations=augs, image_format="RGB", image_cache_mb=-1)


@pytest.mark.parametrize(
    "augmentations",
    [
        [T.RandomFlip(prob=1.0, horizontal=True)],
        [FixedCrop(0, 0, 120, 100)],
        [T.Resize((150, 220))],
        [T.RandomFlip(prob=1.0, horizontal=False, vertical=True), T.Resize((90, 130))],
    ],
    ids=["hflip", "crop", "resize", "vflip+resize"],
)
@pytest.mark.parametrize("as_floats", [False, True], ids=["int-boxes", "float-boxes"])
# fvcore's resize of the flipped (read-only) image warns in both mappers alike.
@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_box_only_mapping_equals_detectron2s(record, augmentations, as_floats):
    """The boxes of an image transformed at once (no masks, no keypoints) give exactly what
    detectron2's DatasetMapper gives box by box, XYWH boxes and crowd ones included, and the
    record given to the mapper is left as it was."""
    import copy

    from smca_d2.data import RobustDatasetMapper

    record["annotations"].append(
        {"bbox": [150, 30, 40, 25], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": 0}
    )
    if as_floats:
        for anno in record["annotations"]:
            anno["bbox"] = [v + 0.3 for v in anno["bbox"]]
    before = copy.deepcopy(record)
    ours = RobustDatasetMapper(is_train=True, augmentations=augmentations, image_format="RGB")
    theirs = DatasetMapper(is_train=True, augmentations=augmentations, image_format="RGB")
    assert ours._boxes_only(record)
    out, expected = ours(record), theirs(copy.deepcopy(record))
    assert record == before
    torch.testing.assert_close(out["image"], expected["image"], rtol=0, atol=0)
    assert out["instances"].image_size == expected["instances"].image_size
    assert out["instances"].get_fields().keys() == expected["instances"].get_fields().keys()
    torch.testing.assert_close(out["instances"].gt_boxes.tensor, expected["instances"].gt_boxes.tensor, rtol=0, atol=0)
    assert torch.equal(out["instances"].gt_classes, expected["instances"].gt_classes)
    assert set(out) == set(expected)


def test_mapping_with_masks_still_copies_the_record(record):
    """With instance masks the record goes through detectron2's own (deep-copying) path."""
    from smca_d2.data import RobustDatasetMapper

    for anno in record["annotations"]:
        x0, y0, x1, y1 = anno["bbox"]
        anno["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
    mapper = RobustDatasetMapper(
        is_train=True, augmentations=[T.RandomFlip(prob=1.0)], image_format="RGB", use_instance_mask=True
    )
    assert not mapper._boxes_only(record)
    segmentation = [list(p) for p in record["annotations"][0]["segmentation"]]
    out = mapper(record)
    assert out["instances"].has("gt_masks")
    assert record["annotations"][0]["segmentation"] == segmentation
