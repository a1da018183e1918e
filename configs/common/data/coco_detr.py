# COCO 2017 with DETR's augmentation: flip, then either a multi-scale resize (shorter side
# 480..800 step 32, max 1333) or [resize 400/500/600, random crop 384..600, multi-scale resize].
# Test: shorter side 800, max 1333. Sizes can be overridden, e.g.
# dataloader.train.mapper.augmentations.max_size=1000
# The dataset function, mapper and training loader are smca_d2's drop-ins for detectron2's
# get_detection_dataset_dicts, DatasetMapper and build_detection_train_loader (same arguments):
# the data is validated before training, an unreadable image is skipped, and --resume continues
# the data stream where it stopped. See "What happens when" in README.md.
from omegaconf import OmegaConf

from smca_d2.data import RobustDatasetMapper, build_resumable_train_loader, validated_dataset_dicts
from smca_d2.data.transforms import detr_test_augmentations, detr_train_augmentations

from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import COCOEvaluator

dataloader = OmegaConf.create()
dataloader.train = L(build_resumable_train_loader)(
    dataset=L(validated_dataset_dicts)(names="coco_2017_train"),
    mapper=L(RobustDatasetMapper)(
        is_train=True,
        augmentations=L(detr_train_augmentations)(
            min_sizes=[480 + 32 * i for i in range(11)],
            max_size=1333,
            crop_resize_sizes=[400, 500, 600],
            crop_size=[384, 600],
        ),
        image_format="RGB",  # must match model.input_format
        use_instance_mask=False,
    ),
    total_batch_size=16,
    num_workers=4,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(validated_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(RobustDatasetMapper)(
        is_train=False,
        augmentations=L(detr_test_augmentations)(min_size=800, max_size=1333),
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}")
