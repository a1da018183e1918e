"""Mixed-precision training on CUDA and on the CPU (``train.amp.enabled=True``).

Detectron2's ``AMPTrainer`` runs float16 autocast on CUDA only. :class:`AMPTrainer` here does the
same on CUDA and also trains on the CPU, where autocast computes in bfloat16 (on CPUs with
bfloat16 instructions, such as AVX512-BF16 or AMX, oneDNN's convolutions and matrix products then
run faster than in float32). The weights, the optimizer and SMCA's attention logits, softmax,
matcher and losses stay in float32 (see :mod:`smca_d2.modeling.attention` and the criterion).

``train.amp.precision`` picks the autocast type: ``"float16"`` or ``"bfloat16"``; unset (None),
float16 on CUDA and bfloat16 on the CPU. float16 losses are scaled by a ``GradScaler``
(saved in the checkpoints as ``"grad_scaler"``); bfloat16 has float32's range and needs none.
"""

import contextlib
import logging
import time
from typing import ContextManager, Optional

import torch

from detectron2.engine import SimpleTrainer

__all__ = ["AMPTrainer", "amp_dtype", "inference_autocast", "inference_dtype"]

logger = logging.getLogger(__name__)

_PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_dtype(device_type: str, precision: Optional[str] = None) -> torch.dtype:
    """The autocast dtype of ``train.amp.precision`` on ``device_type`` ("cuda" or "cpu").

    Raises:
        ValueError: for a precision other than None, "float16" and "bfloat16", or a device type
            autocast does not train on here.
    """
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"train.amp: mixed precision runs on 'cuda' or 'cpu', not {device_type!r}")
    if precision is None:
        return torch.float16 if device_type == "cuda" else torch.bfloat16
    if precision not in _PRECISIONS:
        raise ValueError(
            f"train.amp.precision={precision!r}: use 'float16', 'bfloat16' or None "
            "(float16 on CUDA, bfloat16 on the CPU)"
        )
    return _PRECISIONS[precision]


def _cpu_has_fast_bfloat16() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


#: Precisions :func:`inference_autocast` accepts: float32 (no autocast) and the autocast types.
INFERENCE_PRECISIONS = ("float32",) + tuple(_PRECISIONS)


def inference_dtype(device_type: str, precision: Optional[str] = "float32") -> Optional[torch.dtype]:
    """The autocast type for computing detections at ``precision`` on ``device_type``, or None
    for float32 (no autocast).

    "float32" (or None): None. "bfloat16" / "float16": that type; under its autocast SMCA keeps
    the attention logits and softmax, the Gaussian centers and the class and box heads in
    float32. On a CPU without bfloat16 instructions (AVX512-BF16 or AMX), bfloat16 would be
    slower than float32: None, with a warning. float16 runs on CUDA only.

    Raises:
        ValueError: an unknown precision, or float16 on the CPU.
    """
    if precision is None or precision == "float32":
        return None
    if precision not in _PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {', '.join(INFERENCE_PRECISIONS)}")
    if device_type == "cpu" and precision == "float16":
        raise ValueError("precision='float16' runs on CUDA; on the CPU use 'bfloat16' or 'float32'")
    if device_type == "cpu" and not _cpu_has_fast_bfloat16():
        logger.warning("this CPU has no bfloat16 instructions (AVX512-BF16 / AMX): computing in float32")
        return None
    return _PRECISIONS[precision]


def inference_autocast(device_type: str, dtype: Optional[torch.dtype]) -> ContextManager:
    """``torch.autocast(device_type, dtype)``, or a no-op context for ``dtype`` None (see
    :func:`inference_dtype`)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


class AMPTrainer(SimpleTrainer):
    """:class:`~detectron2.engine.SimpleTrainer` whose forward pass runs under
    ``torch.autocast(device_type, dtype)``; float16 adds a gradient scaler.

    The optimizer's ``step`` sees unscaled gradients (``GradScaler.step`` unscales first), so
    :class:`smca_d2.solver.AdamWWithClipping` clips the true gradient norm.
    """

    def __init__(self, model, data_loader, optimizer, *, device_type: str, precision: Optional[str] = None):
        """
        Args:
            model, data_loader, optimizer: as for ``SimpleTrainer``.
            device_type: "cuda" or "cpu", where the model is.
            precision: "float16", "bfloat16" or None (float16 on CUDA, bfloat16 on the CPU).
        """
        self.device_type = device_type
        self.dtype = amp_dtype(device_type, precision)
        super().__init__(model, data_loader, optimizer)
        self.grad_scaler = torch.amp.GradScaler(device_type) if self.dtype == torch.float16 else None
        logger.info(
            f"Mixed precision: {str(self.dtype).replace('torch.', '')} autocast on {device_type}"
            + (" with a gradient scaler" if self.grad_scaler is not None else "")
        )
        if device_type == "cpu" and self.dtype == torch.bfloat16 and not _cpu_has_fast_bfloat16():
            logger.warning(
                "train.amp on a CPU without bfloat16 instructions: training is likely slower "
                "than in float32 (train.amp.enabled=False)."
            )

    def run_step(self):
        assert self.model.training, "[AMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        if self.grad_scaler is None:
            losses.backward()
            self._write_metrics(loss_dict, data_time)
            self.optimizer.step()
        else:
            self.grad_scaler.scale(losses).backward()
            self._write_metrics(loss_dict, data_time)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # A checkpoint of a float32 or bfloat16 run has no scaler state: the scaler starts fresh.
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
