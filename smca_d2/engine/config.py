"""Loading a LazyConfig for train_net.py: overrides checked, a detectron2 config adapted visibly.

* :func:`load_config` is ``LazyConfig.load`` + :func:`adapt_foreign_config` + checked
  ``LazyConfig.apply_overrides``. The configs under ``configs/`` name the functions that run and
  declare every ``train`` option train_net.py reads, so for them it changes nothing;
* :func:`adapt_foreign_config` makes a config written for detectron2 (a model-zoo file) run under
  train_net.py: it adds the ``train`` options that detectron2's ``configs/common/train.py`` lacks
  (:data:`TRAIN_DEFAULTS`) and, unless told not to (``train_net.py --data-as-written``), names
  smca_d2's drop-ins instead of detectron2's data functions (:data:`DATA_REPLACEMENTS`). It
  returns what it changed, which train_net.py logs once logging is set up;
* :func:`check_override_keys` refuses ``key=value`` overrides whose key is not in the config
  (``LazyConfig.apply_overrides`` would silently add it, and the typo would go unnoticed),
  listing close matches. A key may be a parameter that a ``LazyCall`` leaves at its default
  (e.g. ``dataloader.train.aspect_ratio_grouping``); ``+key=value`` adds a new key on purpose;
* :func:`check_config_datasets` fails before any work if a dataset's files are missing.
"""

import copy
import difflib
import inspect
import logging
import os
from typing import Any, Iterable, List, NamedTuple, Optional, Sequence, Set

from omegaconf import DictConfig, ListConfig

from smca_d2.speedups import DEFAULT_SPEEDUPS

from detectron2.config import LazyConfig

__all__ = [
    "DATA_REPLACEMENTS",
    "TRAIN_DEFAULTS",
    "ConfigChange",
    "UnknownConfigKeyError",
    "adapt_foreign_config",
    "check_config_datasets",
    "check_override_keys",
    "config_dataset_names",
    "describe_config_changes",
    "load_config",
]

logger = logging.getLogger(__name__)

#: detectron2's data functions and smca_d2's drop-ins for them (same arguments, plus options of
#: their own), by import path. A foreign config's ``dataloader.{train,test}.dataset``,
#: ``.mapper`` and ``dataloader.train`` that name the first get the second.
DATA_REPLACEMENTS = {
    "detectron2.data.build.get_detection_dataset_dicts": "smca_d2.data.dataset_dicts.validated_dataset_dicts",
    "detectron2.data.dataset_mapper.DatasetMapper": "smca_d2.data.mapper.RobustDatasetMapper",
    "detectron2.data.build.build_detection_train_loader": "smca_d2.data.resumable_loader.build_resumable_train_loader",
}
_DATA_NODES = (
    "dataloader.train.dataset",
    "dataloader.test.dataset",
    "dataloader.train.mapper",
    "dataloader.test.mapper",
    "dataloader.train",
)

# The options of configs/common/train.py that detectron2's configs/common/train.py does not have,
# with the values given there (-1: a random seed, what detectron2's default_setup does without one).
TRAIN_DEFAULTS = {
    "seed": -1,
    "strict_load": False,
    "speedups": dict(DEFAULT_SPEEDUPS),
    "ema": {"enabled": False, "decay": 0.9998},
    "amp": {"precision": None},
}


class UnknownConfigKeyError(ValueError):
    """An override names a key that the config does not have."""


class ConfigChange(NamedTuple):
    """One change :func:`adapt_foreign_config` made: ``key`` was ``old`` (None: absent), is ``new``."""

    key: str
    old: Any
    new: Any

    def __str__(self):
        if self.old is None:
            return f"{self.key}={self.new!r} (added)"
        return f"{self.key}: {self.old} -> {self.new}"


def describe_config_changes(changes: Sequence[ConfigChange]) -> str:
    """The log message for what :func:`adapt_foreign_config` changed ("" for nothing)."""
    if not changes:
        return ""
    lines = "\n".join(f"  {c}" for c in changes)
    note = ""
    if any(c.key.endswith("._target_") for c in changes):
        note = " (train_net.py --data-as-written keeps detectron2's data functions)"
    return f"The config was adapted to train_net.py{note}:\n{lines}"


def _locate(target):
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            return locate(target)
        except Exception:
            return None
    return target


def _target_name(target) -> str:
    if isinstance(target, str):
        return target
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"


def _node(cfg, path: str):
    node = cfg
    for part in path.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node._get_node(part)
    return node if isinstance(node, DictConfig) else None


def adapt_foreign_config(cfg, *, replace_data_functions: bool = True) -> List[ConfigChange]:
    """Make a config written for detectron2 run under train_net.py, in place; say what changed.

    * The options of :data:`TRAIN_DEFAULTS` that ``train`` lacks are added with their defaults
      (``train.seed=-1``, ``train.strict_load=False``, ...), so that they can be overridden
      without ``+`` and the saved config.yaml shows them.
    * With ``replace_data_functions``, each ``_target_`` of ``dataloader.{train,test}.dataset``,
      ``dataloader.{train,test}.mapper`` and ``dataloader.train`` that is a key of
      :data:`DATA_REPLACEMENTS` becomes its value: data validated before training, unreadable
      images skipped, and a ``--resume`` that continues the data stream. A training loader
      given its own ``sampler`` is kept (the resumable loader has its own sampling).

    A config that already names what runs and declares these options (those under ``configs/``)
    is left as it is.

    Returns:
        the changes, in the order made (empty: ``cfg`` is untouched).
    """
    changes = []
    if replace_data_functions:
        replacements = {_locate(old): new for old, new in DATA_REPLACEMENTS.items()}
        replacements.pop(None, None)  # a detectron2 without one of them
        for path in _DATA_NODES:
            node = _node(cfg, path)
            if node is None or "_target_" not in node:
                continue
            old = node._get_node("_target_")._value()
            new = replacements.get(_locate(old))
            if new is None or (path == "dataloader.train" and node.get("sampler", None) is not None):
                continue
            node._target_ = new
            changes.append(ConfigChange(f"{path}._target_", _target_name(old), new))
    train = _node(cfg, "train")
    if train is not None:
        changes += _add_missing(train, TRAIN_DEFAULTS, "train")
    return changes


def _add_missing(node: DictConfig, defaults: dict, prefix: str) -> List[ConfigChange]:
    added = []
    for key, value in defaults.items():
        if key not in node:
            node[key] = value
            added.append(ConfigChange(f"{prefix}.{key}", None, value))
        elif isinstance(value, dict) and isinstance(node._get_node(key), DictConfig):
            added += _add_missing(node._get_node(key), value, f"{prefix}.{key}")
    return added


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
        keys = [str(k) for k in node]
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
            f"{len(unknown)} override(s) name keys that are not in the config:\n"
            + "\n".join(lines)
            + "\nOverriding them would add new keys that nothing reads. Fix the spelling, or write "
            "+key=value to add a key on purpose."
        )


def load_config(
    cfg_or_path,
    overrides: Sequence[str] = (),
    *,
    replace_data_functions: bool = True,
    return_changes: bool = False,
):
    """A config as train_net.py runs it: loaded, adapted if written for detectron2, overridden.

    ``LazyConfig.load`` + :func:`adapt_foreign_config` + ``LazyConfig.apply_overrides`` of
    ``overrides`` (``key=value`` strings, as on train_net.py's command line), whose keys are
    checked first (:func:`check_override_keys`).

    Args:
        cfg_or_path: a path, the name of a shipped config (``smca_single_scale_r50_50ep.py``, see
            :mod:`smca_d2.model_zoo`), or a loaded config (deep-copied, not changed).
        replace_data_functions: see :func:`adapt_foreign_config`.
        return_changes: return ``(cfg, changes)`` for the caller to log once its logging is set
            up (train_net.py); otherwise the changes are logged here.
    """
    overrides = list(overrides or ())
    if isinstance(cfg_or_path, (str, os.PathLike)):
        from smca_d2.model_zoo import resolve_config_file

        cfg = LazyConfig.load(resolve_config_file(os.fspath(cfg_or_path)))
    else:
        cfg = copy.deepcopy(cfg_or_path)
    changes = adapt_foreign_config(cfg, replace_data_functions=replace_data_functions)
    check_override_keys(cfg, overrides)
    if overrides:
        cfg = LazyConfig.apply_overrides(cfg, overrides)
    if return_changes:
        return cfg, changes
    if changes:
        logger.info(describe_config_changes(changes))
    return cfg


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
