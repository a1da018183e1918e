"""Training hooks: stop cleanly on a non-finite loss; make each iteration reproducible on resume;
name the file when writing the metrics fails."""

import contextlib
import logging
import math
import random
from collections.abc import Mapping
from typing import Optional

import numpy as np
import torch

from smca_d2.data.resumable_loader import sample_seed

from detectron2.engine import HookBase
from detectron2.engine import hooks as d2_hooks
from detectron2.utils import comm

__all__ = ["DeterministicSteps", "MetricsWriteError", "NonFiniteLossCheck", "NonFiniteLossError", "PeriodicWriter"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss is NaN or infinite. (detectron2's own check raises FloatingPointError as well.)"""


class NonFiniteLossCheck(HookBase):
    """Stop training when a loss is NaN or infinite, *before* the backward pass and the optimizer
    step, with a message naming the iteration, the non-finite losses and the last checkpoint.

    detectron2 only notices after the backward pass (on the main process, in ``_write_metrics``)
    and prints every loss. Here the check runs in every process, as a forward hook on the model,
    so no NaN gradient reaches the optimizer, and no checkpoint is written afterwards: the hooks'
    ``after_step`` does not run for the failed iteration, and :class:`SafeCheckpointer` refuses
    to save NaN weights anyway.

    Args:
        checkpointer: used to name the last complete checkpoint in the message (optional).
    """

    def __init__(self, checkpointer=None):
        self._checkpointer = checkpointer
        self._handle = None

    def before_train(self):
        self._handle = self.trainer.model.register_forward_hook(self._check)

    def after_train(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _check(self, module, inputs, output):
        if not module.training or not isinstance(output, Mapping):
            return
        losses = {k: v for k, v in output.items() if isinstance(v, torch.Tensor)}
        if not losses:
            return
        total = torch.stack([v.detach().float().sum() for v in losses.values()])
        if bool(torch.isfinite(total).all()):  # one device sync for all losses
            return
        values = {k: v.detach().float().sum().item() for k, v in losses.items()}
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        good = {k: v for k, v in values.items() if math.isfinite(v)}
        last = ""
        if self._checkpointer is not None and self._checkpointer.has_checkpoint():
            last = self._checkpointer.get_checkpoint_file()
        raise NonFiniteLossError(
            f"Non-finite loss at iteration {self.trainer.iter}: "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + (f" (finite: {', '.join(f'{k}={v:.4g}' for k, v in good.items())})" if good else "")
            + ". Training stopped before the backward pass; the weights of this iteration were not "
            "updated and no checkpoint is written. "
            + (f"The last complete checkpoint is {last}; " if last else "No checkpoint was written yet; ")
            + "after fixing the cause (learning rate, data, loss weights) continue with --resume. "
            "The dataset was validated when it was loaded, so bad boxes are an unlikely cause."
        )


class DeterministicSteps(HookBase):
    """Make iteration ``i`` compute the same thing whether or not training was interrupted before it.

    * ``before_train``: tells a :class:`~smca_d2.data.ResumableTrainLoader` to start
      its stream at the trainer's start iteration (so a resumed run sees the batches an
      uninterrupted run sees);
    * ``before_step``: seeds python, numpy and torch (CPU and CUDA) random numbers from
      ``(seed, rank, iteration)``, so dropout and any other randomness of the step do not depend
      on what ran before;
    * the seed is saved in the checkpoint (``trainer.hooks.DeterministicSteps.seed``) and taken
      from it on resume, also when the config asked for a random seed (``train.seed < 0``).

    A config without ``train.seed`` (detectron2's own ``configs/common/train.py`` has none) gets
    what detectron2's ``default_setup`` does for it: ``-1``, a random seed. It is drawn once,
    shared by all processes and saved like a chosen one, so ``--resume`` stays exact.

    Args:
        seed: ``train.seed``; None or negative: a random seed, the same in all processes.
        data_loader: the training loader; told where to start if it has ``set_start``.
    """

    def __init__(self, seed: Optional[int] = None, data_loader=None):
        self.seed = int(seed) if seed is not None and seed >= 0 else comm.shared_random_seed()
        self._data_loader = data_loader

    def before_train(self):
        set_start = getattr(self._data_loader, "set_start", None)
        if set_start is not None:
            set_start(self.trainer.iter, seed=self.seed)
        elif self.trainer.iter > 0:
            logger.warning(
                "The training loader cannot resume its data stream: the batches after this resume "
                "differ from those of an uninterrupted run."
            )

    def before_step(self):
        seed = sample_seed(self.seed, comm.get_rank(), self.trainer.iter)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also seeds every CUDA device

    def state_dict(self):
        return {"seed": self.seed}

    def load_state_dict(self, state_dict):
        seed = int(state_dict["seed"])
        if seed != self.seed:
            logger.info(f"Resuming with the seed of the checkpoint ({seed}) instead of {self.seed}.")
        self.seed = seed


class MetricsWriteError(OSError):
    """Writing the training metrics failed (disk full, file size limit, unwritable folder)."""


def _writer_outputs(writers):
    paths = []
    for writer in writers:
        handle = getattr(writer, "_file_handle", None)  # JSONWriter
        if handle is not None and getattr(handle, "name", None):
            paths.append(str(handle.name))
        summary = getattr(writer, "_writer", None)  # TensorboardXWriter
        if summary is not None and hasattr(summary, "logdir"):
            paths.append(str(summary.logdir))
    return paths


class PeriodicWriter(d2_hooks.PeriodicWriter):
    """detectron2's ``PeriodicWriter``; a failed write raises :class:`MetricsWriteError` naming
    the files written to (detectron2's error names none: ``[Errno 28] No space left on device``)."""

    @contextlib.contextmanager
    def _naming_the_files(self):
        try:
            yield
        except OSError as e:
            raise MetricsWriteError(
                f"cannot write the training metrics to {', '.join(_writer_outputs(self._writers)) or 'the writers'}: "
                f"{e}. Training stops here; the checkpoints written so far are complete, and --resume "
                "continues from the last one once the folder is writable and has space."
            ) from e

    def after_step(self):
        with self._naming_the_files():
            super().after_step()

    def after_train(self):
        with self._naming_the_files():
            super().after_train()
