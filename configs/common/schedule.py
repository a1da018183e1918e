# Step schedules counted in epochs (COCO train2017: 117,266 images with annotations).
from detectron2.config import LazyCall as L
from fvcore.common.param_scheduler import MultiStepParamScheduler

COCO_TRAIN_IMAGES = 117266


def epoch_step_schedule(epochs, batch_size, drop_fraction=0.8, num_images=COCO_TRAIN_IMAGES):
    """(max_iter, lr multiplier): lr x0.1 after `drop_fraction` of `epochs` (40 of 50 in the paper)."""
    max_iter = epochs * num_images // batch_size
    multiplier = L(MultiStepParamScheduler)(
        values=[1.0, 0.1], milestones=[int(max_iter * drop_fraction)], num_updates=max_iter
    )
    return max_iter, multiplier
