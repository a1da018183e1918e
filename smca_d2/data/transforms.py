"""Augmentations missing from detectron2.data.transforms."""
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
        self.choices = [T.AugmentationList(c if isinstance(c, (list, tuple)) else [c]) for c in choices]

    def __call__(self, aug_input) -> T.Transform:
        return self.choices[np.random.randint(len(self.choices))](aug_input)

    def __repr__(self):
        return f"RandomChoice(choices={self.choices})"
