"""Exponential moving average (EMA) of a model's weights, kept during training.

The average ``ema = decay_t * ema + (1 - decay_t) * weights`` is updated after every optimizer
step, with ``decay_t = min(decay, (1 + t) / (10 + t))`` after ``t`` updates: early on the average
follows the weights closely, and it settles to ``decay`` (a horizon of ``1 / (1 - decay)``
iterations) as training goes on. Floating-point parameters and buffers (batch-norm statistics)
are averaged; integer buffers are copied.

With ``train.ema.enabled=True``, train_net.py

* updates the average after each iteration (:class:`EMAHook`);
* evaluates the averaged weights (periodic and final evaluation);
* saves them in every checkpoint under ``"model_ema"`` (a state dict of the model, next to the
  trained weights under ``"model"``), so ``--resume`` continues the average exactly;
* loads them for ``--eval-only`` and for :class:`smca_d2.inference.LazyPredictor` (see
  :func:`use_ema_weights`).
"""

import contextlib
from typing import Dict, Iterator, List

import torch
from torch import nn

from detectron2.engine import HookBase

from ..checkpoint.safe_load import EMA_KEY

__all__ = ["EMA_KEY", "EMAHook", "ModelEMA", "use_ema_weights"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model  # DistributedDataParallel


def use_ema_weights(cfg) -> bool:
    """Whether inference with ``cfg`` should use a checkpoint's averaged weights (``train.ema.enabled``)."""
    train = cfg.get("train", None) or {}
    ema = train.get("ema", None) or {}
    return bool(ema.get("enabled", False))


class ModelEMA:
    """The moving average of ``model``'s state dict.

    Args:
        model: the model being trained (a DistributedDataParallel wrapper is looked through).
        decay: the decay the average settles to, in (0, 1).

    It is a checkpointable (``state_dict`` / ``load_state_dict`` hold the averaged weights, keyed
    like the model's state dict) and tracks the number of updates in :attr:`num_updates`.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.restored = False
        self._model = _unwrap(model)
        self._state: Dict[str, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Start the average again from the model's current weights."""
        self._state = {k: v.detach().clone() for k, v in self._model.state_dict().items()}
        self.num_updates = 0
        self.restored = False

    def current_decay(self) -> float:
        """The decay of the next update."""
        t = self.num_updates
        return min(self.decay, (1.0 + t) / (10.0 + t))

    def _pairs(self):
        model_state = self._model.state_dict()
        if model_state.keys() != self._state.keys():
            raise RuntimeError(
                "the model's state dict changed since the EMA was created: "
                f"{sorted(model_state.keys() ^ self._state.keys())[:5]}"
            )
        return [(self._state[k], model_state[k]) for k in self._state]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average."""
        weight = 1.0 - self.current_decay()
        averaged: List[torch.Tensor] = []
        current: List[torch.Tensor] = []
        for ema, value in self._pairs():
            if ema.is_floating_point():
                averaged.append(ema)
                current.append(value.detach().to(ema.dtype))
            else:
                ema.copy_(value)
        if averaged:
            torch._foreach_lerp_(averaged, current, weight)
        self.num_updates += 1

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(self._state)

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        missing = self._state.keys() - state_dict.keys()
        unexpected = state_dict.keys() - self._state.keys()
        if missing or unexpected:
            raise KeyError(
                f"the checkpoint's EMA weights do not fit the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        for k, v in state_dict.items():
            if v.shape != self._state[k].shape:
                raise ValueError(f"EMA weight {k}: checkpoint {list(v.shape)} vs model {list(self._state[k].shape)}")
            self._state[k].copy_(v)
        self.restored = True

    @contextlib.contextmanager
    def weights_in_model(self) -> Iterator[nn.Module]:
        """Within the block, the model holds the averaged weights; its own are put back after."""
        saved = {k: v.detach().clone() for k, v in self._model.state_dict().items()}
        self._model.load_state_dict(self._state)
        try:
            yield self._model
        finally:
            self._model.load_state_dict(saved)


class EMAHook(HookBase):
    """Update a :class:`ModelEMA` after every iteration.

    Register it before the hooks that checkpoint and evaluate, so that they see the average of
    the iteration that just ran. The EMA itself is a checkpointable of the checkpointer (its
    weights); this hook's state (saved with the trainer) is the number of updates.
    Resuming restores both; otherwise the average starts from the weights training starts with
    (after ``train.init_checkpoint`` is loaded).
    """

    def __init__(self, ema: ModelEMA):
        self.ema = ema
        self._num_updates = None

    def before_train(self):
        if not self.ema.restored:
            self.ema.reset()
        elif self._num_updates is not None:
            self.ema.num_updates = self._num_updates
        else:  # a checkpoint with averaged weights but no count: assume one update per iteration
            self.ema.num_updates = self.trainer.iter

    def after_step(self):
        self.ema.update()

    def state_dict(self):
        return {"num_updates": self.ema.num_updates}

    def load_state_dict(self, state_dict):
        self._num_updates = int(state_dict["num_updates"])
