"""Loading a LazyConfig for train_net.py: the reliability pieces put in place, overrides checked.

* :func:`prepare_config` replaces detectron2's dataset, mapper and training-loader functions by
  the validating / resumable ones of smca_d2 (same arguments), so that every config gets them,
  and adds the ``train`` options of train_net.py that a config lacks (detectron2's own
  ``configs/common/train.py`` has none of them) with their defaults;
* :func:`check_override_keys` refuses ``key=value`` overrides whose key is not in the config
  (``LazyConfig.apply_overrides`` would silently add it, and the typo would go unnoticed),
  listing close matches. A key may be a parameter that a ``LazyCall`` leaves at its default
  (e.g. ``dataloader.train.aspect_ratio_grouping``); ``+key=value`` adds a new key on purpose;
* :func:`check_config_datasets` fails before any work if a dataset's files are missing.
"""
import difflib
import inspect
import logging
from typing import Iterable, List, Optional, Sequence, Set

from omegaconf import DictConfig, ListConfig

from detectron2.config import LazyConfig

__all__ = [
    "TRAIN_DEFAULTS",
    "UnknownConfigKeyError",
    "check_config_datasets",
    "check_override_keys",
    "config_dataset_names",
    "load_config",
    "prepare_config",
]

logger = logging.getLogger(__name__)

_VALIDATED_DATASET = "smca_d2.data.dataset_dicts.validated_dataset_dicts"
_ROBUST_MAPPER = "smca_d2.data.mapper.RobustDatasetMapper"
_RESUMABLE_LOADER = "smca_d2.data.resumable_loader.build_resumable_train_loader"

# The options of configs/common/train.py that detectron2's configs/common/train.py does not have,
# with the values given there (-1: a random seed, what detectron2's default_setup does without one).
TRAIN_DEFAULTS = {
    "seed": -1,
    "strict_load": False,
    "keep_freed_cpu_memory": True,
    "ema": {"enabled": False, "decay": 0.9998},
    "amp": {"precision": None},
}


class UnknownConfigKeyError(ValueError):
    """An override names a key that the config does not have."""


def _locate(target):
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            return locate(target)
        except Exception:
            return None
    return target


def _node(cfg, path: str):
    node = cfg
    for part in path.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node._get_node(part)
    return node if isinstance(node, DictConfig) else None


def prepare_config(cfg) -> List[str]:
    """Use smca_d2's reliable replacements of detectron2's data functions in ``cfg``, in place.

    ========================================================  =============================================
    detectron2 (as ``_target_``)                              replaced by
    ========================================================  =============================================
    ``get_detection_dataset_dicts`` (train and test)          :func:`smca_d2.data.dataset_dicts.validated_dataset_dicts`
    ``DatasetMapper`` (train and test)                        :class:`smca_d2.data.mapper.RobustDatasetMapper`
    ``build_detection_train_loader`` (without a ``sampler``)  :func:`smca_d2.data.resumable_loader.build_resumable_train_loader`
    ========================================================  =============================================

    The replacements take the same arguments, plus options of their own that can then be
    overridden (``dataloader.train.dataset.verify_images=True``). Targets that are anything else
    are left alone. Also adds the options of :data:`TRAIN_DEFAULTS` that ``train`` lacks
    (``train.seed=-1``, ``train.strict_load=False``, ...), so that a detectron2 config runs as it
    is, these options can be overridden without ``+`` and the saved config.yaml shows them.

    Returns:
        the paths of the replaced nodes.
    """
    from detectron2.data import DatasetMapper, build_detection_train_loader, get_detection_dataset_dicts

    swaps = {
        get_detection_dataset_dicts: _VALIDATED_DATASET,
        DatasetMapper: _ROBUST_MAPPER,
        build_detection_train_loader: _RESUMABLE_LOADER,
    }
    replaced = []
    for path in (
        "dataloader.train.dataset",
        "dataloader.test.dataset",
        "dataloader.train.mapper",
        "dataloader.test.mapper",
        "dataloader.train",
    ):
        node = _node(cfg, path)
        if node is None or "_target_" not in node:
            continue
        target = _locate(node._get_node("_target_")._value())
        new = next((v for k, v in swaps.items() if target is k), None)
        if new is None:
            continue
        if new == _RESUMABLE_LOADER and node.get("sampler", None) is not None:
            logger.warning(
                f"{path} has its own sampler: detectron2's loader is kept, and a resumed run restarts "
                "its data stream (the batches after --resume differ from an uninterrupted run)."
            )
            continue
        node._target_ = new
        replaced.append(path)
    if replaced:
        logger.info(f"Using smca_d2's validating / resumable data pipeline for {', '.join(replaced)}.")
    train = _node(cfg, "train")
    if train is not None:
        _add_missing(train, TRAIN_DEFAULTS)
    return replaced


def _add_missing(node: DictConfig, defaults: dict) -> None:
    for key, value in defaults.items():
        if key not in node:
            node[key] = value
        elif isinstance(value, dict) and isinstance(node._get_node(key), DictConfig):
            _add_missing(node._get_node(key), value)


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------
def _signature_params(target) -> Optional[Set[str]]:
    """Parameter names of a LazyCall target; None if it takes **kwargs (anything goes)."""
    fn = _locate(target)
    if fn is None:
        return set()
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL} - {"self", "cls"}


def _key_exists(cfg, key: str) -> bool:
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, DictConfig):
            if part in node:
                node = node._get_node(part)
                continue
            if "_target_" in node:  # a LazyCall: its target's parameters are valid keys
                params = _signature_params(node._get_node("_target_")._value())
                return last and (params is None or part in params)
            return False
        if isinstance(node, ListConfig):
            if part.isdigit() and int(part) < len(node):
                node = node._get_node(int(part))
                continue
            return False
        return False  # a value has no sub-keys
    return True


def _all_keys(node, prefix: str = "") -> Iterable[str]:
    if isinstance(node, DictConfig):
        keys = [str(k) for k in node.keys()]
        if "_target_" in node:
            params = _signature_params(node._get_node("_target_")._value()) or set()
            keys = sorted(set(keys) | params)
        for k in keys:
            if k == "_target_":
                continue
            path = f"{prefix}{k}"
            yield path
            if k in node:
                yield from _all_keys(node._get_node(k), path + ".")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from _all_keys(node._get_node(i), f"{prefix}{i}.")


def _suggestions(cfg, key: str) -> List[str]:
    keys = list(_all_keys(cfg))
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
    last = key.split(".")[-1]
    by_name = [k for k in keys if difflib.SequenceMatcher(None, k.split(".")[-1], last).ratio() >= 0.8]
    return list(dict.fromkeys(close + sorted(by_name, key=len)[:5]))[:5]


def check_override_keys(cfg, overrides: Sequence[str]) -> None:
    """Raise :class:`UnknownConfigKeyError` if an override's key is not in ``cfg``.

    ``+key=value`` (hydra's syntax for adding a key) is accepted as is.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    unknown = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.type in (OverrideType.ADD, OverrideType.FORCE_ADD):
            continue
        key = override.key_or_group
        if not _key_exists(cfg, key):
            unknown.append(key)
    if unknown:
        lines = []
        for key in unknown:
            close = _suggestions(cfg, key)
            lines.append(f"  {key}" + (f"  (did you mean: {', '.join(close)}?)" if close else ""))
        raise UnknownConfigKeyError(
            f"{len(unknown)} override(s) name keys that are not in the config:\n" + "\n".join(lines)
            + "\nOverriding them would add new keys that nothing reads. Fix the spelling, or write "
            "+key=value to add a key on purpose."
        )


def load_config(config_file: str, overrides: Sequence[str] = ()):
    """``LazyConfig.load`` + :func:`prepare_config` + checked ``LazyConfig.apply_overrides``.

    ``config_file`` is a path, or the name of a shipped config (``smca_single_scale_r50_50ep.py``,
    see :mod:`smca_d2.model_zoo`).
    """
    from smca_d2.model_zoo import resolve_config_file

    cfg = LazyConfig.load(resolve_config_file(config_file))
    prepare_config(cfg)
    check_override_keys(cfg, overrides)
    return LazyConfig.apply_overrides(cfg, list(overrides))


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------
def config_dataset_names(cfg, splits=("train", "test")) -> List[str]:
    """Dataset names of ``dataloader.<split>.dataset.names``."""
    names = []
    for split in splits:
        node = _node(cfg, f"dataloader.{split}.dataset")
        if node is None or "names" not in node:
            continue
        value = node.names
        names += [value] if isinstance(value, str) else list(value)
    return list(dict.fromkeys(names))


def check_config_datasets(cfg, splits=("train", "test")) -> None:
    """The datasets of ``cfg`` are registered and their files exist (see
    :func:`smca_d2.data.check_dataset_files`)."""
    from smca_d2.data import check_dataset_files

    check_dataset_files(config_dataset_names(cfg, splits))
