"""A one-image predictor for LazyConfig models: the analogue of Detectron2's ``DefaultPredictor``.

Usage::

    predictor = LazyPredictor("configs/demo/smca_r18_synthetic.py", "model_final.pth")
    image = cv2.imread("photo.jpg")  # BGR uint8 HxWx3
    instances = predictor(image)["instances"]  # {"instances": Instances}, as DefaultPredictor returns
    instances = predictor.instances(image)  # the same, bare
    print(instances.pred_boxes, instances.scores, instances.pred_classes)

Loading weights for inference also checks that the checkpoint holds weights for the whole model:
:func:`load_inference_weights` (what ``LazyPredictor`` and ``train_net.py --eval-only`` use) warns
when parts of the model keep their random initialisation, e.g. with a backbone-only
(ImageNet-pretrained) checkpoint.
"""

import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from omegaconf import DictConfig

from smca_d2.checkpoint import SafeCheckpointer
from smca_d2.engine.amp import inference_autocast, inference_dtype
from smca_d2.engine.config import load_config
from smca_d2.engine.ema import use_ema_weights
from smca_d2.speedups import optimize_for_inference

from detectron2.config import instantiate
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.structures import Instances

__all__ = [
    "LazyPredictor",
    "build_test_augmentations",
    "dataset_class_names",
    "load_inference_weights",
    "missing_weight_parts",
    "untrained_keys",
    "warn_if_untrained",
]

logger = logging.getLogger(__name__)

IMAGE_FORMATS = ("RGB", "BGR")


def _select(cfg, dotted: str, default=None):
    node = cfg
    for key in dotted.split("."):
        try:
            if key not in node:
                return default
            node = node[key]
        except TypeError:  # not a mapping
            return default
    return node


def build_test_augmentations(cfg) -> List[T.Augmentation]:
    """The test-time augmentations of ``cfg.dataloader.test.mapper.augmentations``, instantiated.

    Falls back to ``ResizeShortestEdge(800, 1333)`` (the COCO test resize) when the config has no
    such entry. An explicitly empty list means no resize (the images are used as they are).
    """
    augs = _select(cfg, "dataloader.test.mapper.augmentations")
    if augs is None:
        return [T.ResizeShortestEdge(short_edge_length=800, max_size=1333)]
    return [instantiate(a) for a in augs]


def _dataset_names(cfg) -> List[str]:
    names = _select(cfg, "dataloader.test.dataset.names")
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    return [str(n) for n in names]


def dataset_class_names(metadata) -> Optional[List[str]]:
    """``thing_classes`` of a dataset's metadata; for a registered COCO-format dataset that was not
    loaded yet, read from the category list of its ``json_file`` (sorted by id, as
    ``load_coco_json`` numbers them) and stored in the metadata. None when unknown."""
    if metadata is None:
        return None
    classes = metadata.get("thing_classes")
    if classes is not None:
        return list(classes)
    json_file = metadata.get("json_file")
    if not json_file or not os.path.isfile(json_file):
        return None
    try:
        with open(json_file) as f:
            categories = json.load(f).get("categories", [])
    except (OSError, ValueError) as e:
        logger.warning("could not read class names from %s: %s", json_file, e)
        return None
    classes = [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
    metadata.thing_classes = classes
    return classes


def _default_device(cfg) -> str:
    wanted = str(_select(cfg, "train.device", "cuda"))
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        return "cpu"
    return wanted


# ---------------------------------------------------------------------------------------------
# Checking that a checkpoint holds weights for the whole model
# ---------------------------------------------------------------------------------------------
#: Parts of a model that only compute training losses: weights missing there do not matter.
TRAINING_ONLY_PARTS = ("criterion",)


def _tensors(n: int) -> str:
    return f"{n} tensor" if n == 1 else f"{n} tensors"


def _part(key: str) -> str:
    return key.split(".", 1)[0]


def missing_weight_parts(model: torch.nn.Module, missing_keys: Sequence[str]) -> Dict[str, Tuple[int, int]]:
    """The parts of ``model`` (its direct children, e.g. ``backbone``, ``transformer``,
    ``class_embed``) that ``missing_keys`` leaves without some of their weights.

    A tensor shared under several names counts as loaded when one of its names was loaded. Parts
    in :data:`TRAINING_ONLY_PARTS` are ignored.

    Returns:
        ``{part: (number of its state-dict tensors missing, number of its tensors)}``, in the
        order of the model's state dict, for the parts with at least one tensor missing.
    """
    missing = set(missing_keys)
    names_of: Dict[int, List[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(key)
    counts: Dict[str, List[int]] = {}
    for names in names_of.values():
        part = _part(names[0])
        if part in TRAINING_ONLY_PARTS:
            continue
        count = counts.setdefault(part, [0, 0])
        count[1] += 1
        if all(name in missing for name in names):
            count[0] += 1
    return {part: (n, total) for part, (n, total) in counts.items() if n > 0}


def warn_if_untrained(
    model: torch.nn.Module, missing_keys: Optional[Sequence[str]], checkpoint: str = ""
) -> Optional[str]:
    """Warn (logger ``smca_d2.inference.predictor``) that detections will be meaningless when the
    checkpoint left parts of ``model`` with their random initialisation, e.g. a backbone-only
    (ImageNet-pretrained) checkpoint: no weights for the transformer and the heads.

    Args:
        model: the model the checkpoint was loaded into.
        missing_keys: the model's state-dict keys the checkpoint did not provide (see
            :func:`untrained_keys`); None means that nothing was loaded.
        checkpoint: the checkpoint's name, for the message.

    Returns:
        the warning, or None when every weight was loaded.
    """
    if missing_keys is None:
        missing_keys = list(model.state_dict().keys())
    parts = missing_weight_parts(model, missing_keys)
    if not parts:
        return None
    absent = [f"{part} ({_tensors(total)})" for part, (n, total) in parts.items() if n == total]
    partial = [f"{part} ({n} of {_tensors(total)})" for part, (n, total) in parts.items() if n < total]
    what = []
    if absent:
        what.append("no weights for " + ", ".join(absent))
    if partial:
        what.append("weights missing for part of " + ", ".join(partial))
    source = f"the checkpoint {checkpoint}" if checkpoint else "the checkpoint"
    message = (
        f"{source} has {'; '.join(what)}: these keep their random initialisation and the detections will "
        "be meaningless. Pass a trained SMCA-DETR checkpoint (the model_final.pth of train_net.py, or an "
        "official one converted with tools/convert_official_smca.py); a backbone-only checkpoint "
        "(e.g. ImageNet-pretrained) is only a starting point for training."
    )
    logger.warning(message)
    return message


def untrained_keys(checkpointer: SafeCheckpointer) -> Optional[List[str]]:
    """The model's state-dict keys that the checkpointer's last ``load`` did not fill (missing
    from the checkpoint, or of another shape there); None when it loaded nothing."""
    report = checkpointer.last_load_report
    if report is None:
        return None
    return list(report["missing"]) + [key for key, _, _ in report["incorrect_shapes"]]


def load_inference_weights(model: torch.nn.Module, checkpoint: str, *, ema_weights: bool = False) -> List[str]:
    """Load ``checkpoint`` into ``model`` with :class:`~smca_d2.checkpoint.SafeCheckpointer` and
    warn (:func:`warn_if_untrained`) if it does not provide weights for the whole model.

    Args:
        ema_weights: use the checkpoint's averaged (EMA) weights when it has them.

    Returns:
        the model's state-dict keys that the checkpoint did not provide.
    """
    checkpointer = SafeCheckpointer(model, ema_weights=ema_weights)
    checkpointer.load(checkpoint)
    missing = untrained_keys(checkpointer)
    if missing is None:
        missing = list(model.state_dict().keys())
    warn_if_untrained(model, missing, checkpoint)
    return missing


class LazyPredictor:
    """Builds ``cfg.model``, loads its weights and runs it on one image at a time.

    Like Detectron2's ``DefaultPredictor``, it (1) loads a checkpoint, (2) converts the image from
    ``input_format`` to the model's ``input_format``, (3) applies the config's test-time resize
    (``cfg.dataloader.test.mapper.augmentations``) and (4) returns the detections of that one
    image, in the coordinates of the image it was given.

    Calling the predictor returns what ``DefaultPredictor`` returns, ``{"instances": Instances}``;
    :meth:`instances` returns the bare ``Instances``. Usage::

        predictor = LazyPredictor("configs/smca_single_scale_r50_50ep.py", "model_final.pth")
        image = cv2.imread("input.jpg")
        instances = predictor(image)["instances"]  # as with DefaultPredictor
        instances = predictor.instances(image)  # the same, without the dict
        keep = instances[instances.scores > 0.5]

    A checkpoint that does not hold weights for the whole model (e.g. a backbone-only, ImageNet
    pretrained one: the transformer and the heads keep their random initialisation) is loaded with
    a warning that the detections will be meaningless (:func:`warn_if_untrained`).

    Attributes:
        cfg: the config (a copy; overrides applied).
        model: the model, in eval mode, on ``device``.
        augmentations: the test-time augmentations.
        input_format: channel order of the images given to :meth:`__call__`.
        model_format: channel order the model expects.
        autocast_dtype: the autocast type of ``precision`` here, None for float32.
        missing_weights: the state-dict keys of the model as built (before ``optimize``) that the
            checkpoint did not provide (all of them without a checkpoint); empty when every
            weight was loaded.
    """

    def __init__(
        self,
        cfg_or_path: Union[str, os.PathLike, DictConfig],
        checkpoint: Optional[str] = None,
        *,
        device: Optional[str] = None,
        input_format: str = "BGR",
        overrides: Optional[List[str]] = None,
        optimize: bool = True,
        precision: str = "float32",
    ):
        """
        Args:
            cfg_or_path: a LazyConfig path or a loaded LazyConfig (it is not modified).
            checkpoint: weights to load with :class:`smca_d2.checkpoint.SafeCheckpointer` (a path or URL). None uses
                ``cfg.train.init_checkpoint`` when it is set; "" loads nothing (random weights). With
                ``train.ema.enabled`` in the config, the checkpoint's averaged (EMA) weights are used.
            device: "cpu", "cuda", ... (default: ``cfg.train.device``, or the CPU if CUDA is
                not available).
            input_format: "BGR" (OpenCV, the default) or "RGB": channel order of the images
                that will be passed to :meth:`__call__`.
            overrides: ``key=value`` config overrides.
            optimize: apply the inference speed-ups of :mod:`smca_d2.speedups` to the model after
                loading (batch norms folded into convolutions, a channels-last backbone on the
                CPU; the same outputs to float rounding). The process-wide malloc setting
                (:func:`smca_d2.speedups.keep_freed_cpu_memory`) is the caller's choice.
            precision: "float32" (the default), "bfloat16" (CPUs with AVX512-BF16 or AMX, and
                CUDA; elsewhere float32 with a warning) or "float16" (CUDA): the autocast type
                of the forward pass, with the attention logits and softmax, the Gaussian centers
                and the heads in float32 (:func:`smca_d2.engine.inference_dtype`).
        """
        if input_format not in IMAGE_FORMATS:
            raise ValueError(f"input_format must be one of {IMAGE_FORMATS}, got {input_format!r}")
        self.cfg = load_config(cfg_or_path, overrides)
        self.device = torch.device(device or _default_device(self.cfg))
        self.autocast_dtype = inference_dtype(self.device.type, precision)
        self.model = instantiate(self.cfg.model).to(self.device)
        self.model.eval()
        self.input_format = input_format
        self.model_format = getattr(
            self.model, "input_format", _select(self.cfg, "dataloader.test.mapper.image_format", "BGR")
        )
        if self.model_format not in IMAGE_FORMATS:
            raise ValueError(f"the model's input format {self.model_format!r} is not one of {IMAGE_FORMATS}")

        if checkpoint is None:
            checkpoint = _select(self.cfg, "train.init_checkpoint", "") or ""
        self.checkpoint = checkpoint
        if checkpoint:
            self.missing_weights = load_inference_weights(self.model, checkpoint, ema_weights=use_ema_weights(self.cfg))
        else:
            self.missing_weights = list(self.model.state_dict().keys())
            logger.warning(
                "LazyPredictor: no checkpoint given, the model has random weights: the detections will be meaningless"
            )
        if optimize:
            # The model's speed-ups only: malloc's settings are the process's, left to the
            # application (demo/demo.py keeps freed memory on the CPU).
            optimize_for_inference(self.model)

        self.augmentations = T.AugmentationList(build_test_augmentations(self.cfg))
        self._metadata = None
        self._class_names = None

    @property
    def metadata(self):
        """Metadata of the first test dataset (``cfg.dataloader.test.dataset.names``), with
        ``thing_classes`` when they can be found; an empty ``Metadata`` if there is none."""
        if self._metadata is None:
            names = _dataset_names(self.cfg)
            self._metadata = MetadataCatalog.get(names[0]) if names else Metadata(name="")
            dataset_class_names(self._metadata)
        return self._metadata

    @property
    def class_names(self) -> List[str]:
        """One name per model class: the dataset's ``thing_classes``, or the class indices."""
        if self._class_names is None:
            num_classes = getattr(self.model, "num_classes", None)
            names = dataset_class_names(self.metadata)
            if names is not None and num_classes is not None and len(names) != num_classes:
                logger.warning(
                    "the dataset has %d classes, the model %s: using class indices as names", len(names), num_classes
                )
                names = None
            self._class_names = names if names is not None else [str(i) for i in range(num_classes or 0)]
        return self._class_names

    def preprocess(self, image: np.ndarray) -> Dict:
        """The model input for one image: ``{"image": CHW float tensor, "height", "width"}``.

        Args:
            image: HxWx3 uint8 array in ``self.input_format``.
        """
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            shape = getattr(image, "shape", None)
            raise ValueError(f"expected an HxWx3 numpy image, got {type(image).__name__} of shape {shape}")
        if self.input_format != self.model_format:
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        aug_input = T.AugInput(np.ascontiguousarray(image))
        self.augmentations(aug_input)
        resized = np.ascontiguousarray(aug_input.image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        return {"image": tensor, "height": height, "width": width}

    @torch.no_grad()
    def instances(self, image: np.ndarray) -> Instances:
        """Detections on one image, as a bare ``Instances`` (``self(image)["instances"]``).

        Args:
            image: HxWx3 uint8 array in ``self.input_format`` (BGR by default, as ``cv2.imread``).

        Returns:
            Instances of the original image size, on the CPU: ``pred_boxes`` (XYXY pixels),
            ``scores``, ``pred_classes``, sorted by decreasing score.
        """
        inputs = self.preprocess(image)
        with inference_autocast(self.device.type, self.autocast_dtype):
            instances = self.model([inputs])[0]["instances"]
        return instances.to("cpu")

    def __call__(self, image: np.ndarray) -> Dict[str, Instances]:
        """Detections on one image, in the form Detectron2's ``DefaultPredictor`` returns them.

        Args:
            image: HxWx3 uint8 array in ``self.input_format`` (BGR by default, as ``cv2.imread``).

        Returns:
            ``{"instances": Instances}``: see :meth:`instances`.
        """
        return {"instances": self.instances(image)}
