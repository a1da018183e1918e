# COCO 2017 with DETR's augmentation: flip, then either a multi-scale resize or
# [resize 400/500/600, random crop 384..600, multi-scale resize]. Test: shorter side 800, max 1333.
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from smca_d2.data.transforms import RandomChoice

MULTI_SCALE = [480 + 32 * i for i in range(11)]  # 480..800 step 32

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.RandomFlip)(horizontal=True),
            L(RandomChoice)(
                choices=[
                    [L(T.ResizeShortestEdge)(short_edge_length=MULTI_SCALE, max_size=1333, sample_style="choice")],
                    [
                        L(T.ResizeShortestEdge)(short_edge_length=[400, 500, 600], sample_style="choice"),
                        L(T.RandomCrop)(crop_type="absolute_range", crop_size=(384, 600)),
                        L(T.ResizeShortestEdge)(short_edge_length=MULTI_SCALE, max_size=1333, sample_style="choice"),
                    ],
                ]
            ),
        ],
        image_format="RGB",  # must match model.input_format
        use_instance_mask=False,
    ),
    total_batch_size=16,
    num_workers=4,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}")
