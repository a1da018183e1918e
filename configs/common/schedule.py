# Step schedules: lr x0.1 after a fraction of the iterations, counted in iterations or in epochs
# (COCO train2017: 117,266 images with annotations).
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L

COCO_TRAIN_IMAGES = 117266


def step_schedule(max_iter, drop_fraction=0.8):
    """lr multiplier of `max_iter` iterations: x0.1 after `drop_fraction` of them.

    detectron2's LRScheduler hook reads it at `iter / train.max_iter`, so only the fraction
    counts: `train.max_iter=N` on the command line moves the drop to `drop_fraction * N`.
    """
    return L(MultiStepParamScheduler)(
        values=[1.0, 0.1], milestones=[int(max_iter * drop_fraction)], num_updates=max_iter
    )


def epoch_step_schedule(epochs, batch_size, drop_fraction=0.8, num_images=COCO_TRAIN_IMAGES):
    """(max_iter, lr multiplier): lr x0.1 after `drop_fraction` of `epochs` (40 of 50 in the paper)."""
    max_iter = epochs * num_images // batch_size
    return max_iter, step_schedule(max_iter, drop_fraction)
