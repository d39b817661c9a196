"""Decay schedules for the EMA and the registry that names them.

A schedule maps ``(decay, step, total_steps)`` to the decay used for one optimizer step, where ``decay`` is the
user's maximum decay, ``step`` the 0-based index of the optimizer step that just finished and ``total_steps`` the
planned number of optimizer steps. The built-in schedules are:

========== =========================================================
name       decay used at ``step``
========== =========================================================
constant   ``decay``
threshold  ``min(decay, (1 + step) / (10 + step))``
exp        ``decay * (1 - exp(-beta * step / total_steps))``
========== =========================================================

Register your own by subclassing :class:`IDecayFunction` and adding it to :data:`EMA_DECAY_FUNCTIONS`::

    class LinearDecay(IDecayFunction):
        def __call__(self, decay, step, total_steps):
            return decay * step / total_steps

    EMA_DECAY_FUNCTIONS["linear"] = LinearDecay
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "EMA_DECAY_FUNCTIONS",
    "ConstantDecay",
    "ExpDecay",
    "IDecayFunction",
    "ThresholdDecay",
    "build_schedule",
]


class IDecayFunction:
    """Base class of EMA decay schedules.

    Subclasses take their options as keyword arguments in ``__init__`` and implement ``__call__``. Set the class
    attribute ``requires_total_steps = True`` when the schedule divides by ``total_steps``, so a missing value is
    reported when the EMA is built rather than at the first update.

    Example:
        >>> class HalfDecay(IDecayFunction):
        ...     def __call__(self, decay, step, total_steps):
        ...         return decay / 2
        >>> EMA_DECAY_FUNCTIONS["half"] = HalfDecay
        >>> HalfDecay()(0.9, 0, 100)
        0.45
    """

    #: Whether the schedule needs ``total_steps`` (checked at construction of the EMA).
    requires_total_steps: bool = False

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = dict(kwargs)

    def __call__(self, decay: float, step: int, total_steps: int | None) -> float:
        """Compute the decay for one optimizer step.

        Args:
            decay: The maximum decay value, in (0, 1).
            step: 0-based index of the optimizer step that just finished.
            total_steps: Planned number of optimizer steps (may be ``None`` for schedules that do not need it).

        Returns:
            The decay to use for this step, in [0, 1].
        """
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Return the JSON-serialisable keyword arguments that rebuild this schedule."""
        return dict(getattr(self, "kwargs", {}))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class ConstantDecay(IDecayFunction):
    """``d(step) = decay``.

    Example:
        >>> ConstantDecay()(0.999, 5, 100)
        0.999
    """

    def __call__(self, decay: float, step: int, total_steps: int | None) -> float:
        return decay


class ThresholdDecay(IDecayFunction):
    """``d(step) = min(decay, (1 + step) / (10 + step))``: a fast-moving EMA early, capped at ``decay``.

    Example:
        >>> ThresholdDecay()(0.9999, 0, None)
        0.1
    """

    def __call__(self, decay: float, step: int, total_steps: int | None) -> float:
        return min(decay, (1 + step) / (10 + step))


class ExpDecay(IDecayFunction):
    """``d(step) = decay * (1 - exp(-beta * step / total_steps))``: warms up to ``decay`` over training.

    Args:
        beta: How fast the decay approaches ``decay``; at ``step = total_steps / beta`` it reaches
            ``decay * (1 - 1/e)``. Default 15.

    Example:
        >>> round(ExpDecay(beta=15)(0.9999, 1000, 1000), 6)
        0.9999
    """

    requires_total_steps = True

    def __init__(self, beta: float = 15.0, **kwargs: Any) -> None:
        if (
            isinstance(beta, bool)
            or not isinstance(beta, (int, float))
            or not math.isfinite(beta)
            or beta <= 0
        ):
            raise ValueError(f"ExpDecay: `beta` must be a finite number > 0, got {beta!r}")
        super().__init__(beta=float(beta), **kwargs)
        self.beta = float(beta)

    def __call__(self, decay: float, step: int, total_steps: int | None) -> float:
        if not total_steps or total_steps <= 0:
            raise ValueError(f"ExpDecay needs `total_steps` > 0, got {total_steps!r}")
        return decay * (1.0 - math.exp(-self.beta * step / total_steps))


#: Registry of schedule names to :class:`IDecayFunction` subclasses. Add your own entries.
EMA_DECAY_FUNCTIONS: dict[str, type[IDecayFunction]] = {
    "constant": ConstantDecay,
    "threshold": ThresholdDecay,
    "exp": ExpDecay,
}


def build_schedule(decay_type: str | IDecayFunction, **kwargs: Any) -> tuple[str, IDecayFunction]:
    """Resolve ``decay_type`` to a ``(name, schedule)`` pair.

    Args:
        decay_type: A name registered in :data:`EMA_DECAY_FUNCTIONS` or an :class:`IDecayFunction` instance.
        **kwargs: Passed to the schedule's constructor (e.g. ``beta`` for ``"exp"``). The built-in schedules take
            ``beta`` only (``constant`` and ``threshold`` ignore it, so a SuperGradients ``ema_params`` dict can
            be passed whole); any other name is refused as a likely typo.

    Returns:
        The registry name (for an instance, the name it is registered under or its class name) and the schedule.

    Raises:
        ValueError: If the name is unknown (the message lists the known names), or a built-in schedule gets an
            argument other than ``beta``.
        TypeError: If ``decay_type`` is neither a string nor an :class:`IDecayFunction`.

    Example:
        >>> name, fn = build_schedule("exp", beta=10)
        >>> name, fn.beta
        ('exp', 10.0)
    """
    if isinstance(decay_type, IDecayFunction):
        name = next(
            (k for k, v in EMA_DECAY_FUNCTIONS.items() if v is type(decay_type)), type(decay_type).__name__
        )
        return name, decay_type
    if not isinstance(decay_type, str):
        raise TypeError(
            "`decay_type` must be a schedule name or an IDecayFunction instance, "
            f"got {type(decay_type).__name__}: {decay_type!r}"
        )
    if decay_type not in EMA_DECAY_FUNCTIONS:
        known = ", ".join(sorted(EMA_DECAY_FUNCTIONS))
        raise ValueError(f"Unknown `decay_type` {decay_type!r}; known schedules: {known}")
    cls = EMA_DECAY_FUNCTIONS[decay_type]
    if cls in (ConstantDecay, ThresholdDecay, ExpDecay):
        # ``beta`` is always accepted (a SuperGradients dict may carry it for any schedule); anything else is a typo.
        unknown = sorted(set(kwargs) - {"beta"})
        if unknown:
            raise ValueError(
                f"Unknown argument(s) {unknown} for decay_type={decay_type!r}; the built-in schedules take only "
                "`beta` (used by 'exp')"
            )
        kwargs = {k: v for k, v in kwargs.items() if cls is ExpDecay}
    return decay_type, cls(**kwargs)
