"""Independent NumPy float64 re-implementation of SuperGradients' EMA, driven the way its trainer drives it.

Nothing here imports ``hf_ema`` or ``super_gradients``. Written from Deci-AI/super-gradients at commit
``e0ccacf8868ffa1296fa4f8407c03d2bc227312c`` (read, not copied):

* ``src/super_gradients/training/utils/ema_decay_schedules.py``: ``constant`` returns ``decay``; ``threshold``
  ``min(decay, (1 + step) / (10 + step))``; ``exp`` ``decay * (1 - exp(-(step / total_steps) * beta))``; every
  schedule's constructor takes ``**kwargs`` (``exp`` requires ``beta``) and the trainer passes them all.
* ``src/super_gradients/training/utils/ema.py``: ``ModelEMA.from_params(model, decay_type=None, decay=None,
  **kwargs)``: ``decay`` missing -> 0.9999; ``exp_activation`` in kwargs -> popped, ``decay_type = "exp" if it
  else "constant"`` (replacing any ``decay_type``); ``decay_type`` missing -> ``"exp"`` and ``beta = 15`` unless
  given; then ``EMA_DECAY_FUNCTIONS[decay_type](**kwargs)``. ``ModelEMA.update(model, step, total_steps)``:
  ``decay = fn(self.decay, step, total_steps)``, then for every ``state_dict`` entry whose EMA tensor is floating
  point (parameters *and* buffers) ``ema = ema * decay + (1 - decay) * model``; other entries (e.g. BatchNorm's
  ``num_batches_tracked``) are never touched, so they keep the value copied when the EMA was created.
* ``src/super_gradients/training/sg_trainer/sg_trainer.py``, ``Trainer._backward_step``:
  ``global_step = batch_idx + 1 + len(train_loader) * epoch``, ``total_steps = len(train_loader) * max_epochs``;
  after the optimizer step, when ``global_step % batch_accumulate == 0``,
  ``ema_model.update(net, step=global_step, total_steps=total_steps)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["SG_DECAY_FUNCTIONS", "SGModelEMA", "sg_from_params", "sg_train"]


class _SGConstant:
    def __init__(self, **kwargs: Any) -> None:
        pass

    def __call__(self, decay: float, step: int, total_steps: int) -> float:
        return decay


class _SGThreshold:
    def __init__(self, **kwargs: Any) -> None:
        pass

    def __call__(self, decay: float, step: int, total_steps: int) -> float:
        return min(decay, (1.0 + step) / (10.0 + step))


class _SGExp:
    def __init__(self, beta: float, **kwargs: Any) -> None:
        self.beta = beta

    def __call__(self, decay: float, step: int, total_steps: int) -> float:
        return decay * (1.0 - math.exp(-(step / total_steps) * self.beta))


#: SuperGradients' registry; tests add their own schedules to a copy of it.
SG_DECAY_FUNCTIONS: dict[str, type] = {"constant": _SGConstant, "threshold": _SGThreshold, "exp": _SGExp}


class SGModelEMA:
    """``ModelEMA`` over ``{name: array}`` state dicts, in float64."""

    def __init__(self, state: Mapping[str, np.ndarray], decay: float, decay_function: Any) -> None:
        self.ema = {k: np.array(v, copy=True) for k, v in state.items()}
        self.decay = decay
        self.decay_function = decay_function
        self.decays: list[float] = []

    def update(self, state: Mapping[str, np.ndarray], step: int, total_steps: int) -> None:
        decay = float(self.decay_function(self.decay, step, total_steps))
        self.decays.append(decay)
        for name, ema_v in self.ema.items():
            if np.issubdtype(ema_v.dtype, np.floating):
                self.ema[name] = ema_v * decay + (1.0 - decay) * np.asarray(state[name], dtype=np.float64)


def sg_from_params(
    state: Mapping[str, np.ndarray],
    registry: Mapping[str, type] | None = None,
    decay_type: str | None = None,
    decay: float | None = None,
    **kwargs: Any,
) -> SGModelEMA:
    """``ModelEMA.from_params`` (without its warnings)."""
    registry = SG_DECAY_FUNCTIONS if registry is None else registry
    if decay is None:
        decay = 0.9999
    if "exp_activation" in kwargs:
        decay_type = "exp" if bool(kwargs.pop("exp_activation")) else "constant"
    if decay_type is None:
        decay_type = "exp"
        if "beta" not in kwargs:
            kwargs["beta"] = 15
    return SGModelEMA(state, decay, registry[decay_type](**kwargs))


def sg_train(
    ema_params: Mapping[str, Any],
    history: Sequence[Mapping[str, np.ndarray]],
    len_loader: int,
    max_epochs: int,
    batch_accumulate: int = 1,
    registry: Mapping[str, type] | None = None,
) -> SGModelEMA:
    """The EMA SuperGradients' trainer ends with, over a recorded run.

    ``history[0]`` is the state when the EMA was created, ``history[k]`` the state after optimizer step ``k``
    (``len_loader * max_epochs // batch_accumulate`` steps in all).
    """
    ema = sg_from_params(history[0], registry, **dict(ema_params))
    total_steps = len_loader * max_epochs
    done = 0
    for epoch in range(max_epochs):
        for batch_idx in range(len_loader):
            local_step = batch_idx + 1
            global_step = local_step + len_loader * epoch
            if global_step % batch_accumulate == 0:
                done += 1
                ema.update(history[done], step=global_step, total_steps=total_steps)
    if done != len(history) - 1:
        raise ValueError(f"history has {len(history) - 1} optimizer steps, the trainer would take {done}")
    return ema
