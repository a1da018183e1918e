"""Augmentations missing from detectron2.data.transforms."""

from collections import abc
from typing import List, Sequence, Union

import numpy as np

from detectron2.data import transforms as T


class RandomChoice(T.Augmentation):
    """Apply one of several augmentation pipelines, chosen uniformly at random per image.

    DETR's training augmentation picks either a multi-scale resize or a resize + crop + resize.
    """

    def __init__(self, choices: Sequence[Union[T.Augmentation, List[T.Augmentation]]]):
        super().__init__()
        if not choices:
            raise ValueError("RandomChoice needs at least one choice")
        # A choice is one augmentation or a sequence of them (a ListConfig when instantiated).
        self.choices = [T.AugmentationList(list(c) if isinstance(c, abc.Sequence) else [c]) for c in choices]

    def __call__(self, aug_input) -> T.Transform:
        return self.choices[np.random.randint(len(self.choices))](aug_input)

    def __repr__(self):
        return f"RandomChoice(choices={self.choices})"


def detr_train_augmentations(
    *,
    min_sizes: Sequence[int] = tuple(range(480, 801, 32)),
    max_size: int = 1333,
    crop_resize_sizes: Sequence[int] = (400, 500, 600),
    crop_size: Sequence[int] = (384, 600),
    horizontal_flip: bool = True,
) -> List[T.Augmentation]:
    """DETR's training augmentation: flip, then either a multi-scale resize (shorter side from
    ``min_sizes``, longer side at most ``max_size``) or [resize to ``crop_resize_sizes``, random
    crop with sides in ``crop_size``, the same multi-scale resize]."""
    multi_scale = T.ResizeShortestEdge(list(min_sizes), max_size, sample_style="choice")
    augmentations = [T.RandomFlip(horizontal=True)] if horizontal_flip else []
    augmentations.append(
        RandomChoice(
            [
                [multi_scale],
                [
                    T.ResizeShortestEdge(list(crop_resize_sizes), sample_style="choice"),
                    T.RandomCrop("absolute_range", tuple(crop_size)),
                    multi_scale,
                ],
            ]
        )
    )
    return augmentations


def detr_test_augmentations(*, min_size: int = 800, max_size: int = 1333) -> List[T.Augmentation]:
    """Test-time resize: shorter side ``min_size``, longer side at most ``max_size``."""
    return [T.ResizeShortestEdge(min_size, max_size)]
