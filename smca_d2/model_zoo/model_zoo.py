"""Configs by name and models built from them, with the semantics of ``detectron2.model_zoo``.

The configs are package data (``smca_d2/model_zoo/configs``, the source tree's ``configs/``
copied or linked there by ``setup.py``), so they can be used wherever smca-d2 is installed.
"""

import difflib
import logging
import os
from typing import Dict, List, Optional

import torch

__all__ = [
    "CHECKPOINTS",
    "ConfigNotFoundError",
    "NoTrainedCheckpointError",
    "available_configs",
    "get",
    "get_checkpoint_url",
    "get_config",
    "get_config_file",
    "resolve_config_file",
]

logger = logging.getLogger(__name__)

#: Trained checkpoints published for a config: {config name: path or URL}. No SMCA model trained
#: with these configs has been published yet (the official authors released none for R50 either),
#: so the table is empty; ``trained=True`` then fails with a message saying how to pass weights.
CHECKPOINTS: Dict[str, str] = {}

_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGE_CONFIGS = os.path.join(_HERE, "configs")
# A source checkout used without installing (PYTHONPATH=.): the configs/ folder beside the package.
_SOURCE_CONFIGS = os.path.normpath(os.path.join(_HERE, "..", "..", "configs"))


class ConfigNotFoundError(FileNotFoundError):
    """A config name that is neither a file nor a config of the model zoo."""


class NoTrainedCheckpointError(RuntimeError):
    """``trained=True`` for a config without a published checkpoint."""


def _configs_root() -> str:
    for root in (_PACKAGE_CONFIGS, _SOURCE_CONFIGS):
        if os.path.isdir(root):
            return root
    raise FileNotFoundError(
        f"smca_d2's configs are not installed ({_PACKAGE_CONFIGS} is missing): reinstall smca-d2 "
        "(`pip install .` or `pip install -e .` in the source tree)"
    )


def available_configs() -> List[str]:
    """Names of the shipped configs (paths relative to ``configs/``), sorted. ``common/`` holds
    the pieces they are made of and is not listed."""
    root = _configs_root()
    names = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        rel = os.path.relpath(folder, root)
        if rel.split(os.sep)[0] in ("common", "__pycache__"):
            continue
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                names.append(os.path.normpath(os.path.join(rel, f)).replace(os.sep, "/"))
    return sorted(names)


def _config_name(config_path: str) -> str:
    name = config_path.replace(os.sep, "/")
    if name.startswith("configs/"):
        name = name[len("configs/") :]
    return name if name.endswith(".py") else name + ".py"


def get_config_file(config_path: str) -> str:
    """The path of a shipped config.

    Args:
        config_path: a name relative to ``configs/``, e.g. ``"smca_single_scale_r50_50ep.py"``
            or ``"demo/smca_r18_synthetic.py"`` (the ``.py`` may be left out).

    Raises:
        ConfigNotFoundError: for an unknown name; the message lists the available configs.
    """
    name = _config_name(config_path)
    available = available_configs()
    if name in available:
        return os.path.join(_configs_root(), name)
    close = difflib.get_close_matches(name, available, n=3, cutoff=0.6)
    raise ConfigNotFoundError(
        f"{config_path!r} is not a config of the smca_d2 model zoo"
        + (f" (did you mean {', '.join(close)}?)" if close else "")
        + ". Available configs:\n"
        + "\n".join(f"  {n}" for n in available)
    )


def resolve_config_file(path_or_name: str) -> str:
    """``path_or_name`` if it is an existing file, else the model-zoo config of that name.

    What ``train_net.py --config-file``, ``demo/demo.py`` and the tools accept.
    """
    path = os.fspath(path_or_name)
    if os.path.isfile(path):
        return path
    try:
        return get_config_file(path)
    except ConfigNotFoundError as e:
        raise ConfigNotFoundError(f"no config file {path!r}, and {e}") from None


def get_checkpoint_url(config_path: str) -> str:
    """The published trained checkpoint of a config.

    Raises:
        NoTrainedCheckpointError: when none is published for it (today: for every config).
    """
    get_config_file(config_path)  # an unknown name fails listing the available ones
    name = _config_name(config_path)
    url = CHECKPOINTS.get(name)
    if url is None:
        raise NoTrainedCheckpointError(
            f"no trained checkpoint is published for {name}. Train one (python train_net.py "
            f"--config-file {name}) or pass weights you have: "
            "model_zoo.get_config(name) then cfg.train.init_checkpoint='/path/to/model.pth' "
            "(train_net.py / demo/demo.py: train.init_checkpoint=/path/to/model.pth)."
        )
    return url


def get_config(config_path: str, trained: bool = False):
    """The LazyConfig of a shipped config.

    Args:
        config_path: see :func:`get_config_file`.
        trained: set ``train.init_checkpoint`` to the config's published trained checkpoint
            (:data:`CHECKPOINTS`); otherwise it stays what the config says (for the COCO configs,
            the ImageNet-pretrained backbone).
    """
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(get_config_file(config_path))
    if trained:
        cfg.train.init_checkpoint = get_checkpoint_url(config_path)
    return cfg


def get(config_path: str, trained: bool = False, device: Optional[str] = None) -> torch.nn.Module:
    """A model built from a shipped config, in training mode, as ``detectron2.model_zoo.get``.

    Args:
        config_path: see :func:`get_config_file`.
        trained: load the config's published trained checkpoint (see :func:`get_config`).
        device: where to put the model (default: the config's ``train.device`` when CUDA is
            available, else the CPU).

    With ``trained=False`` the config's ``train.init_checkpoint`` is loaded as detectron2 does
    (for the COCO configs the ImageNet backbone). If that file cannot be fetched (no network)
    the model keeps its random initialisation and a warning says how to pass a local copy;
    with ``trained=True`` that is an error.
    """
    from smca_d2.checkpoint import CheckpointUnavailableError, SafeCheckpointer

    from detectron2.config import instantiate

    cfg = get_config(config_path, trained)
    if device is None:
        device = cfg.train.get("device", "cuda") if torch.cuda.is_available() else "cpu"
    model = instantiate(cfg.model).to(device)
    checkpoint = cfg.train.get("init_checkpoint", "")
    if checkpoint:
        try:
            SafeCheckpointer(model).load(checkpoint)
        except CheckpointUnavailableError as e:
            if trained:
                raise
            logger.warning(f"{e}\nThe model returned keeps its random initialisation.")
    return model
