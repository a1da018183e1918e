"""A ``DatasetMapper`` that survives an image it cannot read."""

import copy
import logging

import numpy as np
import torch
from PIL import Image

from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode, Instances

from .images import read_image

__all__ = ["RobustDatasetMapper"]

logger = logging.getLogger(__name__)


class RobustDatasetMapper(DatasetMapper):
    """:class:`detectron2.data.DatasetMapper` that reads images with :func:`read_image`, and skips
    (returns None, with a warning naming the file) an image that cannot be read or whose size
    differs from its record, instead of ending the training run. detectron2's datasets and the
    resumable loader replace a skipped image by another one.

    With the validation of :func:`validated_dataset_dicts` this only happens if a file changes
    during training.

    Args:
        image_cache_mb: keep up to this many MiB of decoded images in memory (in each process
            that maps data) and read each of them only once: for a dataset that fits, every
            epoch after the first skips reading and decoding. 0 (the default) keeps none. A file
            changed after it was cached is not read again.
        the others: those of :class:`detectron2.data.DatasetMapper` (or its ``cfg`` form).
    """

    def __init__(self, *args, image_cache_mb: float = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if image_cache_mb < 0:
            raise ValueError(f"image_cache_mb must be >= 0, got {image_cache_mb}")
        self.image_cache_bytes = int(image_cache_mb * 2**20)
        self._image_cache = {}
        self._image_cache_used = 0

    def _read_checked_image(self, dataset_dict) -> np.ndarray:
        """The record's image, of the size the record says (``check_image_size``), from the
        cache or from its file."""
        file_name = dataset_dict["file_name"]
        image = self._image_cache.get(file_name)
        cached = image is not None
        if not cached:
            image = read_image(file_name, format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        if not cached and self._image_cache_used + image.nbytes <= self.image_cache_bytes:
            # Read-only, as the arrays of PIL images are: the augmentations make new arrays.
            image.flags.writeable = False
            self._image_cache[file_name] = image
            self._image_cache_used += image.nbytes
        return image

    def _boxes_only(self, dataset_dict) -> bool:
        """Whether only the boxes and classes of the annotations are used (or none, at test time):
        then the boxes are transformed together (one ``apply_box`` per image) and the record is
        not deep-copied."""
        return (
            not (self.use_instance_mask or self.use_keypoint or self.recompute_boxes)
            and self.proposal_topk is None
            and "sem_seg_file_name" not in dataset_dict
        )

    def _transform_box_annotations(self, dataset_dict, transforms, image_shape):
        """What detectron2's ``_transform_annotations`` gives for boxes and classes (crowd boxes
        left out, the others converted to XYXY one by one, transformed, clipped to the image and
        the empty ones dropped), with the transforms applied to all boxes of the image at once."""
        annos = [a for a in dataset_dict.pop("annotations") if a.get("iscrowd", 0) == 0]
        boxes = np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos]).reshape(-1, 4)
        height, width = image_shape
        boxes = np.minimum(transforms.apply_box(boxes).clip(min=0), [width, height, width, height])
        instances = Instances(image_shape)
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.tensor([int(a["category_id"]) for a in annos], dtype=torch.int64)
        dataset_dict["instances"] = utils.filter_empty_instances(instances)

    def __call__(self, dataset_dict):
        boxes_only = self._boxes_only(dataset_dict)
        # With boxes only, nothing below changes a value of the record in place: a new dict is
        # enough.
        dataset_dict = dict(dataset_dict) if boxes_only else copy.deepcopy(dataset_dict)
        try:
            image = self._read_checked_image(dataset_dict)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            logger.warning(f"Skipping {dataset_dict['file_name']}: {type(e).__name__}: {e}")
            return None

        if "sem_seg_file_name" in dataset_dict:
            sem_seg_gt = read_image(dataset_dict.pop("sem_seg_file_name"), "L").squeeze(2)
        else:
            sem_seg_gt = None
        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk)
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            if boxes_only:
                self._transform_box_annotations(dataset_dict, transforms, image_shape)
            else:
                self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict
