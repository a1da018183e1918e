"""Configuration checks that run before any work, with messages that say what to change."""
import torch

from detectron2.data import MetadataCatalog

from .config import config_dataset_names


def check_num_classes(cfg) -> None:
    """Fail if ``model.num_classes`` differs from the classes of the training/test datasets.

    Must run after the datasets were loaded once (their metadata is filled in on load).
    """
    num_classes = cfg.model.num_classes
    for name in config_dataset_names(cfg, splits=("train", "test")):
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"model.num_classes={num_classes} but dataset '{name}' has {len(classes)} "
                f"classes ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}). "
                f"Set model.num_classes={len(classes)} on the command line or in the config."
            )


def check_device(device: str) -> None:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"train.device={device} but no CUDA device is available; pass train.device=cpu."
        )
