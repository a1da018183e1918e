"""Loading checkpoints without running code, and saving them so that a crash never leaves half a file.

Loading (:func:`load_checkpoint_file`, used by :class:`SafeCheckpointer`):

* ``.pth`` / ``.pt`` / ``.pyth``: ``torch.load(weights_only=True)``: tensors, containers and plain
  values only;
* ``.pkl`` (detectron2 / Detectron model zoo: pickled numpy arrays): a restricted unpickler that
  can build numpy arrays, dtypes and scalars and nothing else;
* anything else in the file (a pickled object, whose unpickling could run arbitrary code) is
  refused with :class:`~smca_d2.checkpoint.official.UnsafeCheckpointError`, unless the user says
  the file is trusted: ``SMCA_D2_TRUST_CHECKPOINTS=1`` in the environment, or ``trust=True``.

Saving (:meth:`SafeCheckpointer.save`): the checkpoint is written to a temporary file in the same
folder, flushed to disk (``fsync``) and renamed over the target (``os.replace``, atomic); only then
is ``last_checkpoint`` updated, the same way. A process killed at any moment leaves either the old
or the new file, never a partial one, and ``last_checkpoint`` always names a complete checkpoint.
A model with NaN/inf weights is not saved (the last good checkpoint stays the last one).

A checkpoint given as a URL (``detectron2://...``, ``https://...``) is fetched first; if it cannot
be fetched (no network), :class:`CheckpointUnavailableError` names the file and how to pass a local
copy. ``PATH?matching_heuristics=True`` loads with detectron2's name-matching heuristics (detectron2
``main`` parses that query itself; for ``v0.6`` it is parsed here).

Loading into a model (:meth:`SafeCheckpointer.load`): tensors whose shapes do not fit the model
are skipped (they keep the model's freshly initialised values), as in detectron2, but reported in
one summary naming every such tensor; with ``strict=True`` (``train.strict_load=True``, and always
when resuming) any mismatch, missing or unexpected tensor is an error.
"""

import io
import logging
import os
import pickle
import re
import zipfile
from typing import Any, Dict, List, Optional
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer

from .official import UnsafeCheckpointError, rename_official_decoder_key

__all__ = [
    "EMA_KEY",
    "TRUST_ENV",
    "CheckpointMismatchError",
    "CheckpointUnavailableError",
    "CheckpointWriteError",
    "DamagedCheckpointError",
    "NonFiniteWeightsError",
    "SafeCheckpointer",
    "UnsafeCheckpointError",
    "atomic_write",
    "load_checkpoint_file",
    "load_numpy_pickle",
    "trust_checkpoints",
]

logger = logging.getLogger(__name__)

#: Environment variable that, set to 1/true/yes, allows checkpoints that need full unpickling.
TRUST_ENV = "SMCA_D2_TRUST_CHECKPOINTS"


#: Key of the averaged (EMA) weights in a training checkpoint (smca_d2.engine.ema).
EMA_KEY = "model_ema"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model (strict loading)."""


class CheckpointUnavailableError(FileNotFoundError):
    """A checkpoint URL that cannot be fetched, or a checkpoint path that does not exist."""


#: detectron2 ``main`` parses ``?matching_heuristics=True`` in ``DetectionCheckpointer.load`` and
#: reads ``.pth`` files through ``_torch_load``; ``v0.6`` has neither (see smca_d2.compat).
UPSTREAM_URL_QUERIES = hasattr(DetectionCheckpointer, "_torch_load")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, file size limit, unwritable folder); nothing
    was left in its place."""


class DamagedCheckpointError(ValueError):
    """A checkpoint file that cannot be read: cut short (a full disk), empty, or not a checkpoint."""


class NonFiniteWeightsError(FloatingPointError):
    """The model holds NaN or inf values: it is not saved."""


def trust_checkpoints(trust: Optional[bool] = None) -> bool:
    """``trust`` if given, else whether ``$SMCA_D2_TRUST_CHECKPOINTS`` is set to a true value."""
    if trust is not None:
        return bool(trust)
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------
# numpy pickles (.pkl)
# ---------------------------------------------------------------------------------------------
def _numpy_globals() -> Dict[tuple, Any]:
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
        ("_codecs", "encode"): __import__("codecs").encode,  # bytes in protocol-2 pickles
    }
    multiarray = getattr(np, "_core", None) or np.core
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray.multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.multiarray.scalar
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes by their class
    if dtypes is not None:
        for name in dir(dtypes):
            obj = getattr(dtypes, name)
            if isinstance(obj, type) and issubclass(obj, np.dtype):
                allowed[("numpy.dtypes", name)] = obj
    return allowed


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles containers of numpy arrays; any other global is refused before it is imported."""

    _allowed = None

    def find_class(self, module, name):
        if _NumpyUnpickler._allowed is None:
            _NumpyUnpickler._allowed = _numpy_globals()
        module = {"copy_reg": "copyreg", "__builtin__": "builtins"}.get(module, module)
        found = _NumpyUnpickler._allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")
        return found


def load_numpy_pickle(path: str, *, trust: Optional[bool] = None):
    """Read a ``.pkl`` checkpoint (plain pickle, ``latin1`` for Python 2 files) that may only hold
    containers of numpy arrays, numbers and strings.

    Raises:
        UnsafeCheckpointError: the pickle references anything else (it is not loaded), unless
            trusted (``trust=True`` or ``$SMCA_D2_TRUST_CHECKPOINTS``).
    """
    from detectron2.utils.file_io import PathManager

    with PathManager.open(path, "rb") as f:
        data = f.read()
    if trust_checkpoints(trust):
        logger.warning(f"Loading {path} with full unpickling ({TRUST_ENV} is set): it can run code.")
        return pickle.loads(data, encoding="latin1")
    try:
        return _NumpyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise _unsafe(path, str(e), "numpy arrays, numbers, strings and containers") from None


def _unsafe(path: str, message: str, allowed: str) -> Exception:
    found = list(dict.fromkeys(re.findall(r"GLOBAL ([\w.]+)", message)))
    if not found:  # not a forbidden object: a damaged or foreign file
        return pickle.UnpicklingError(f"cannot read checkpoint {path}: {message.strip()}")
    return UnsafeCheckpointError(
        f"refusing to load checkpoint {path}: it contains pickled objects ({', '.join(found)}) and "
        f"unpickling them could run arbitrary code. Only {allowed} are accepted. If you trust this "
        f"file, set {TRUST_ENV}=1 to load it anyway, or re-save its weights alone "
        "(torch.save({'model': state_dict}, path)) in a trusted environment."
    )


# ---------------------------------------------------------------------------------------------
# torch files
# ---------------------------------------------------------------------------------------------
def _torch_load(path: str, *, trust: Optional[bool] = None):
    from detectron2.utils.file_io import PathManager

    if trust_checkpoints(trust):
        logger.warning(f"Loading {path} with torch.load(weights_only=False) ({TRUST_ENV} is set): it can run code.")
        with PathManager.open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=False)
    try:
        with PathManager.open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        error = _unsafe(path, str(e), "tensors, numbers, strings and containers")
        if isinstance(error, UnsafeCheckpointError):
            raise error from None
        raise DamagedCheckpointError(str(error)) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:  # what torch.load raises for a cut-off or foreign file
        size = os.path.getsize(path) if os.path.isfile(path) else None
        raise DamagedCheckpointError(
            f"cannot read checkpoint {path}" + (f" ({size} bytes)" if size is not None else "") + f": {e}"
        ) from None


def load_checkpoint_file(path: str, *, trust: Optional[bool] = None) -> Dict[str, Any]:
    """Read a checkpoint file without running code from it (see the module docstring).

    Returns:
        what the file holds: detectron2's checkpoints are dicts with a ``"model"`` state dict.
    """
    if str(path).endswith(".pkl"):
        return load_numpy_pickle(path, trust=trust)
    return _torch_load(path, trust=trust)


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------
def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on some systems (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write_fn) -> None:
    """Write ``path`` through ``write_fn(file_object)`` so that it is either complete or absent.

    The data goes to ``<path>.tmp`` in the same folder, is fsync'ed and renamed over ``path``
    (``os.replace``); the folder is fsync'ed so that the rename survives a power loss.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


class _WriteErrorRecorder(io.RawIOBase):
    """A writable file that keeps the first OSError of its writes: ``torch.save`` turns it into a
    RuntimeError whose message ("unexpected pos ...") names neither the cause nor the file."""

    def __init__(self, f):
        super().__init__()
        self._f = f
        self.error: Optional[OSError] = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self._f.flush()


def _torch_save(data, f) -> None:
    recorder = _WriteErrorRecorder(f)
    try:
        torch.save(data, recorder)
    except RuntimeError:
        if recorder.error is not None:
            raise recorder.error from None
        raise


def _non_finite_tensors(state_dict: Dict[str, Any]) -> List[str]:
    return [
        k
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()
    ]


class SafeCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` with safe loading, atomic saving and clear mismatch reports.

    Args:
        model, save_dir, save_to_disk, checkpointables: as for DetectionCheckpointer.
        strict: fail (:class:`CheckpointMismatchError`) if the checkpoint does not fit the model
            exactly, instead of loading what fits. Resuming is always strict.
        trust: allow checkpoints that need full unpickling (default: ``$SMCA_D2_TRUST_CHECKPOINTS``).
        ema_weights: load a checkpoint's averaged weights (``"model_ema"``, written when training
            with ``train.ema.enabled``) instead of its ``"model"`` weights, for inference. A
            checkpoint without them is loaded as usual, with a warning.
    """

    def __init__(
        self, model, save_dir="", *, save_to_disk=None, strict=False, trust=None, ema_weights=False, **checkpointables
    ):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.strict = strict
        self.trust = trust
        self.ema_weights = ema_weights
        self._strict_now = strict
        self._resuming = False
        self._query = None  # the URL query of the path being loaded (detectron2 v0.6)
        self.last_load_report = None

    # -- saving --------------------------------------------------------------------------------
    def _is_local(self) -> bool:
        return "://" not in str(self.save_dir)

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._is_local():  # a remote PathManager backend: no atomic rename there
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        bad = _non_finite_tensors(data["model"])
        if bad:
            raise NonFiniteWeightsError(
                f"not saving checkpoint '{name}': the model has NaN/inf values in {len(bad)} tensor(s) "
                f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}). The last checkpoint saved "
                f"before this is {self.get_checkpoint_file() or 'none'}."
            )
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        try:
            os.makedirs(self.save_dir, exist_ok=True)
            atomic_write(save_file, lambda f: _torch_save(data, f))
            self.tag_last_checkpoint(basename)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            # last_checkpoint is replaced atomically, so it still names the previous checkpoint
            previous = self.get_checkpoint_file() if self.has_checkpoint() else None
            raise CheckpointWriteError(
                f"cannot write checkpoint {save_file}: {e}. Nothing was left in its place. The last "
                f"complete checkpoint is {previous or 'none (this was the first)'}; --resume continues "
                f"from it once {self.save_dir} is writable and has space (or with another train.output_dir "
                "holding a copy of it)."
            ) from e

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._is_local():
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    def remove_partial_files(self) -> List[str]:
        """Delete ``*.tmp`` files left in ``save_dir`` by a process killed while saving."""
        if not self.save_dir or not self.save_to_disk or not self._is_local() or not os.path.isdir(self.save_dir):
            return []
        removed = []
        for name in os.listdir(self.save_dir):
            if name.endswith(".pth.tmp") or name == "last_checkpoint.tmp":
                os.remove(os.path.join(self.save_dir, name))
                removed.append(name)
        if removed:
            self.logger.warning(f"Removed partial checkpoint file(s) of an interrupted save: {', '.join(removed)}")
        return removed

    # -- loading -------------------------------------------------------------------------------
    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        self.remove_partial_files()
        if resume and self.has_checkpoint():
            last = self.get_checkpoint_file()
            if not os.path.isfile(last) and not self.path_manager.exists(last):
                raise FileNotFoundError(
                    f"{os.path.join(self.save_dir, 'last_checkpoint')} names {last}, which does not exist. "
                    "Point last_checkpoint at an existing model_*.pth in that folder, or start without --resume."
                )
            self._strict_now = self._resuming = True  # resuming into another model is a config change
            try:
                return self._resume_from(last)
            finally:
                self._strict_now, self._resuming = self.strict, False
        return self.load(path, checkpointables=[])

    def _resume_from(self, last: str) -> Dict[str, Any]:
        """Load ``last``; if it is damaged (cut short by a full disk, emptied), the newest readable
        checkpoint of ``save_dir`` instead. A damaged file is kept, renamed to ``<name>.damaged``,
        so that it is neither tried again nor lost."""
        damaged = []
        for path in [last, *self._older_checkpoints(last)]:
            try:
                loaded = self.load(path)
            except DamagedCheckpointError as e:
                damaged.append(f"{os.path.basename(path)} ({e})")
                self._set_aside(path)
                continue
            if damaged:
                self.logger.warning(
                    f"Resuming from {path}, the newest checkpoint that can be read: "
                    f"{'; '.join(damaged)}. Renamed to *.damaged."
                )
                self.tag_last_checkpoint(os.path.basename(path))
            return loaded
        raise DamagedCheckpointError(
            f"--resume found no readable checkpoint in {self.save_dir}: {'; '.join(damaged)}. They were "
            "renamed to *.damaged. Start without --resume, or set train.init_checkpoint to a good copy."
        )

    def _older_checkpoints(self, last: str) -> List[str]:
        """The other checkpoints of ``save_dir`` (``model_*.pth``), newest first."""
        if not self._is_local() or not os.path.isdir(self.save_dir):
            return []
        paths = [
            os.path.join(self.save_dir, name)
            for name in os.listdir(self.save_dir)
            if name.startswith("model_") and name.endswith(".pth")
        ]
        paths = [p for p in paths if os.path.abspath(p) != os.path.abspath(last)]
        return sorted(paths, key=os.path.getmtime, reverse=True)

    def _set_aside(self, path: str) -> None:
        try:
            os.replace(path, f"{path}.damaged")
        except OSError as e:
            self.logger.warning(f"Could not rename the damaged checkpoint {path}: {e}")

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        self._query = None
        if not path:
            return super().load(path, *args, **kwargs)
        url = urlparse(path)
        local = self._local_copy(url._replace(query="").geturl() if url.query else path)
        if url.query and UPSTREAM_URL_QUERIES:
            local = f"{local}?{url.query}"
        elif url.query:
            self._query = parse_qs(url.query)
            if set(self._query) - {"matching_heuristics"}:
                raise ValueError(f"unsupported query in checkpoint path {path!r}: only ?matching_heuristics=True")
        return super().load(local, *args, **kwargs)

    def _local_copy(self, path: str) -> str:
        """A local file for ``path``: ``path`` itself, or the cached download of a URL."""
        if os.path.isfile(path):
            return path
        if "://" not in path:
            if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
                return path  # detectron2 decides: a worker without the file loads from the main one
            raise CheckpointUnavailableError(f"checkpoint {path} does not exist")
        try:
            local = self.path_manager.get_local_path(path)
        except Exception as e:  # URLError, HTTPError, timeouts, a handler's own errors
            raise CheckpointUnavailableError(
                f"could not fetch the checkpoint {path} ({type(e).__name__}: {e}). Download it where "
                "there is network access and pass the local file instead, e.g. "
                "train.init_checkpoint=/path/to/"
                + os.path.basename(urlparse(path).path)
                + ' (or train.init_checkpoint="" for random initial weights).'
            ) from None
        if not os.path.isfile(local):
            raise CheckpointUnavailableError(f"checkpoint {path} was fetched to {local}, which does not exist")
        return local

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pkl"):
            data = load_numpy_pickle(filename, trust=self.trust)
            if not isinstance(data, dict):
                raise ValueError(f"{filename} holds a {type(data).__name__}, not a dict of weights")
            if "model" in data and "__author__" in data:  # detectron2 model zoo
                self.logger.info(f"Reading a file from '{data['__author__']}'")
                return data
            if "blobs" in data:  # Caffe2 / Detectron1 detection models
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):  # pycls
            loaded = load_checkpoint_file(filename, trust=self.trust)
            if not isinstance(loaded, dict) or "model_state" not in loaded:
                raise ValueError(f"Cannot load .pyth file {filename}; pycls checkpoints must contain 'model_state'.")
            state = {k: v for k, v in loaded["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        if UPSTREAM_URL_QUERIES:  # reads the file with _torch_load, applies the URL query
            loaded = super()._load_file(filename)
        else:
            loaded = self._torch_load(filename)
            if "model" not in loaded:
                loaded = {"model": loaded}
            if self._query and self._query.get("matching_heuristics") == ["True"]:
                loaded["matching_heuristics"] = True
        loaded = self._rename_decoder_modules(loaded, filename)
        if self.ema_weights:
            if EMA_KEY in loaded:
                self.logger.info(f"Using the averaged (EMA) weights of {filename}")
                loaded = {**loaded, "model": loaded[EMA_KEY]}
            else:
                self.logger.warning(
                    f"{filename} has no averaged (EMA) weights ('{EMA_KEY}'): loading its trained weights. "
                    "(EMA weights are asked for because train.ema.enabled is set.)"
                )
        return loaded

    def _rename_decoder_modules(self, loaded: Dict[str, Any], filename: str) -> Dict[str, Any]:
        """Checkpoints written by smca_d2 0.1 name the decoder modules as the official code does
        (``point1``, ``norm4``, ...): give their weights today's names (the same tensors)."""
        renamed = dict(loaded)
        count = 0
        for entry in ("model", EMA_KEY):
            state = loaded.get(entry)
            if not isinstance(state, dict):
                continue
            new = {rename_official_decoder_key(k): v for k, v in state.items()}
            count += sum(a != b for a, b in zip(state, new))
            renamed[entry] = new
        if not count:
            return loaded
        self.logger.info(
            f"{filename} names decoder modules as the official code does (point1, point2, point3, norm4, "
            f"multihead_attn): {count} tensor(s) renamed to center_head, offset_head, scale_head, "
            "modulation_norm, cross_attn"
        )
        return renamed

    def _torch_load(self, filename: str) -> Dict[str, Any]:
        loaded = load_checkpoint_file(filename, trust=self.trust)
        if not isinstance(loaded, dict):
            raise ValueError(f"{filename} holds a {type(loaded).__name__}, not a checkpoint dict")
        return loaded

    def _log_incompatible_keys(self, incompatible) -> None:
        from fvcore.common.checkpoint import _filter_reused_missing_keys

        missing = (
            _filter_reused_missing_keys(self.model, incompatible.missing_keys) if incompatible.missing_keys else []
        )
        shapes = list(incompatible.incorrect_shapes)
        missing = [k for k in missing if k not in {name for name, _, _ in shapes}]
        unexpected = list(incompatible.unexpected_keys)
        self.last_load_report = {"incorrect_shapes": shapes, "missing": missing, "unexpected": unexpected}
        if not (shapes or missing or unexpected):
            self.logger.info("The checkpoint fits the model: every tensor was loaded.")
            return
        lines = []
        if shapes:
            lines.append(
                f"{len(shapes)} tensor(s) have a different shape in the checkpoint and were NOT loaded; they keep "
                "the model's freshly initialised values:"
            )
            lines += [f"    {k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in shapes]
        if missing:
            lines.append(
                f"{len(missing)} tensor(s) of the model are not in the checkpoint and keep their initial values:"
            )
            lines += [f"    {k}" for k in missing[:50]] + (
                [f"    ... and {len(missing) - 50} more"] if len(missing) > 50 else []
            )
        if unexpected:
            lines.append(f"{len(unexpected)} tensor(s) of the checkpoint are not used by the model:")
            lines += [f"    {k}" for k in unexpected[:50]] + (
                [f"    ... and {len(unexpected) - 50} more"] if len(unexpected) > 50 else []
            )
        summary = "\n".join(lines)
        if self._strict_now:
            if self._resuming:
                how = (
                    "Resuming needs the model the checkpoint was written for: did the config change? To start a "
                    "new run from these weights, use another train.output_dir (or no --resume) with "
                    "train.init_checkpoint=<checkpoint> (add train.strict_load=False to re-initialise what does not fit)."
                )
            else:
                how = "Set train.strict_load=False to load what fits and keep the model's initial values for the rest."
            raise CheckpointMismatchError("the checkpoint does not fit the model:\n" + summary + "\n" + how)
        self.logger.warning("Checkpoint loaded partially:\n" + summary)
