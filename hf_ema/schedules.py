"""Decay schedules for the EMA and the registry that names them.

A schedule maps ``(decay, step, total_steps)`` to the decay used for one optimizer step, where ``decay`` is the
user's maximum decay, ``step`` the number of optimizer steps done, **including the one that just finished**
(1, 2, 3, ...: the first update sees ``step = 1``), and ``total_steps`` the planned number of optimizer steps.
This is the convention of SuperGradients, whose trainer passes ``step = batch_idx + 1 + len(loader) * epoch`` and
``total_steps = len(loader) * max_epochs``, so that without gradient accumulation the same schedule gives the same
decays here and there. The built-in schedules are:

========== =========================================================
name       decay used at ``step`` (1-based)
========== =========================================================
constant   ``decay``
threshold  ``min(decay, (1 + step) / (10 + step))``  (2/11 at the first step)
exp        ``decay * (1 - exp(-beta * step / total_steps))``
warmup     ``0`` while ``s = step - update_after_step - 1 <= 0`` (the EMA copies the weights), then
           ``clamp(1 - (1 + s / inv_gamma) ** -warmup_power, min_decay, decay)`` (timm ``ModelEmaV3`` /
           diffusers ``EMAModel`` warm-up)
========== =========================================================

Register your own by subclassing :class:`IDecayFunction` and adding it to :data:`EMA_DECAY_FUNCTIONS`::

    class LinearDecay(IDecayFunction):
        def __call__(self, decay, step, total_steps):
            return decay * step / total_steps

    EMA_DECAY_FUNCTIONS["linear"] = LinearDecay

A schedule's constructor gets only the arguments it declares (``beta`` only when it has a ``beta`` parameter or
``**kwargs``); an argument that neither the EMA nor the schedule takes is refused, with a suggestion.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "EMA_DECAY_FUNCTIONS",
    "ConstantDecay",
    "ExpDecay",
    "IDecayFunction",
    "ThresholdDecay",
    "WarmupDecay",
    "build_schedule",
    "make_schedule",
    "supergradients_kwargs",
]


class IDecayFunction:
    """Base class of EMA decay schedules.

    Subclasses take their options as keyword arguments in ``__init__`` and implement ``__call__``. The EMA passes
    a constructor only the arguments it declares (a ``**kwargs`` constructor gets all of them, ``beta`` included).
    Set the class attribute ``requires_total_steps = True`` when the schedule divides by ``total_steps``, so a
    missing value is reported when the EMA is built rather than at the first update.

    ``step`` is 1-based: the number of optimizer steps done, including the one that just finished.

    Example:
        >>> class HalfDecay(IDecayFunction):
        ...     def __call__(self, decay, step, total_steps):
        ...         return decay / 2
        >>> EMA_DECAY_FUNCTIONS["half"] = HalfDecay
        >>> HalfDecay()(0.9, 1, 100)
        0.45
    """

    #: Whether the schedule needs ``total_steps`` (checked at construction of the EMA).
    requires_total_steps: bool = False
    #: Whether the schedule's averaging profile is relative to training time already (the same for any batch
    #: size): the EMA then refuses ``reference_batch_size``, whose ``d ** (B / B_ref)`` would change that profile.
    batch_size_invariant: bool = False
    #: Whether the schedule reads the user's ``decay`` (``power`` and ``bema`` do not): the Trainer callback's
    #: long-horizon warning, and the default-``decay`` warning of ``from_params``, apply only when it does.
    uses_decay: bool = True

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = dict(kwargs)

    def __call__(self, decay: float, step: int, total_steps: int | None) -> float:
        """Compute the decay for one optimizer step.

        Args:
            decay: The maximum decay value, in (0, 1).
            step: Optimizer steps done, including the one that just finished (1 for the first update).
            total_steps: Planned number of optimizer steps (may be ``None`` for schedules that do not need it).

        Returns:
            The decay to use for this step, in [0, 1].
        """
        raise NotImplementedError

    def validate(self, decay: float) -> None:
        """Check, when the EMA is built, that this schedule can work with the maximum ``decay``; raise a
        ``ValueError`` naming the argument otherwise. The default accepts any decay.

        Example:
            >>> WarmupDecay(min_decay=0.5).validate(0.9)  # fine; min_decay=0.95 would raise
        """

    def interval_decay(self, decay: float, step: int, total_steps: int | None, interval: int) -> float:
        """Decay to apply when averaging once over the last `interval` optimizer steps ending at `step`; default
        ``self(decay, step, total_steps) ** interval``.

        With ``update_every = N`` the EMA averages on steps ``N, 2N, ...`` only, as
        ``ema <- ema * D + theta * (1 - D)`` with ``D = interval_decay(decay, step, total_steps, N)``. The default
        keeps the averaging horizon, in optimizer steps, that ``N = 1`` would have at ``step``; override it when
        the product of the per-step decays over the interval is wanted instead. With ``N = 1`` the engine uses
        ``__call__`` itself (an override must agree with it there).

        Example:
            >>> ConstantDecay().interval_decay(0.5, 4, None, 2)
            0.25
        """
        return float(self(decay, step, total_steps)) ** interval

    def config(self) -> dict[str, Any]:
        """Return the JSON-serialisable keyword arguments that rebuild this schedule."""
        return dict(getattr(self, "kwargs", {}))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class ConstantDecay(IDecayFunction):
    """``d(step) = decay``. Takes no arguments.

    Example:
        >>> ConstantDecay()(0.999, 5, 100)
        0.999
    """

    def __init__(self) -> None:
        super().__init__()

    def __call__(self, decay: float, step: int, total_steps: int | None) -> float:
        return decay


class ThresholdDecay(IDecayFunction):
    """``d(step) = min(decay, (1 + step) / (10 + step))``: a fast-moving EMA early, capped at ``decay``.

    With the 1-based ``step`` the first update uses ``2/11``. Takes no arguments.

    Example:
        >>> ThresholdDecay()(0.9999, 1, None) == 2 / 11
        True
    """

    def __init__(self) -> None:
        super().__init__()

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

    def __init__(self, beta: float = 15.0) -> None:
        if (
            isinstance(beta, bool)
            or not isinstance(beta, (int, float))
            or not math.isfinite(beta)
            or beta <= 0
        ):
            raise ValueError(f"ExpDecay: `beta` must be a finite number > 0, got {beta!r}")
        super().__init__(beta=float(beta))
        self.beta = float(beta)

    def __call__(self, decay: float, step: int, total_steps: int | None) -> float:
        if not total_steps or total_steps <= 0:
            raise ValueError(f"ExpDecay needs `total_steps` > 0, got {total_steps!r}")
        return decay * (1.0 - math.exp(-self.beta * step / total_steps))


def _positive(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"WarmupDecay: `{name}` must be a finite number > 0, got {value!r}")
    return float(value)


class WarmupDecay(IDecayFunction):
    """The warm-up of timm's ``ModelEmaV3`` and diffusers' ``EMAModel`` (``use_ema_warmup``), on the same steps.

    With ``s = step - update_after_step - 1`` (``step`` 1-based, as both libraries count their updates)::

        d(step) = 0                                                       if s <= 0  (the EMA copies the weights)
        d(step) = max(min(1 - (1 + s / inv_gamma) ** -warmup_power, decay), min_decay)   otherwise

    So the first ``update_after_step + 1`` updates copy the weights (no averaging yet: the EMA follows them), and
    the decay then rises towards ``decay``: with ``inv_gamma = 1`` it reaches 0.999 after about 31.6k steps for
    ``warmup_power = 2/3``, 10k steps for ``3/4``. ``min_decay = decay`` gives a constant decay after the copying
    steps (timm's ``ModelEmaV3`` without ``use_warmup``).

    Args:
        warmup_power: Exponent of the warm-up (timm ``warmup_power``, diffusers ``power``), > 0. Default 2/3.
        inv_gamma: Step scale of the warm-up (timm ``warmup_gamma``, diffusers ``inv_gamma``), > 0. Default 1.
        min_decay: Lower bound of the decay after the copying steps, in [0, decay]. Default 0.
        update_after_step: Updates, besides the first, that copy the weights instead of averaging. Default 0.

    Example:
        >>> fn = WarmupDecay()
        >>> fn(0.9999, 1, None), round(fn(0.9999, 2, None), 6)
        (0.0, 0.370039)
    """

    def __init__(
        self,
        warmup_power: float = 2 / 3,
        inv_gamma: float = 1.0,
        min_decay: float = 0.0,
        update_after_step: int = 0,
    ) -> None:
        warmup_power = _positive("warmup_power", warmup_power)
        inv_gamma = _positive("inv_gamma", inv_gamma)
        if (
            isinstance(min_decay, bool)
            or not isinstance(min_decay, numbers.Real)
            or not (0.0 <= min_decay <= 1.0)
        ):
            raise ValueError(f"WarmupDecay: `min_decay` must be a number in [0, 1], got {min_decay!r}")
        if (
            isinstance(update_after_step, bool)
            or not isinstance(update_after_step, numbers.Integral)
            or update_after_step < 0
        ):
            raise ValueError(
                f"WarmupDecay: `update_after_step` must be an integer >= 0, got {update_after_step!r}"
            )
        super().__init__(
            warmup_power=warmup_power,
            inv_gamma=inv_gamma,
            min_decay=float(min_decay),
            update_after_step=int(update_after_step),
        )
        self.warmup_power = warmup_power
        self.inv_gamma = inv_gamma
        self.min_decay = float(min_decay)
        self.update_after_step = int(update_after_step)

    def validate(self, decay: float) -> None:
        if self.min_decay > decay:
            raise ValueError(
                f"WarmupDecay: `min_decay`={self.min_decay!r} is above the maximum `decay`={decay!r}"
            )

    def __call__(self, decay: float, step: int, total_steps: int | None) -> float:
        s = step - self.update_after_step - 1
        if s <= 0:
            return 0.0
        d = 1.0 - (1.0 + s / self.inv_gamma) ** -self.warmup_power
        return max(min(d, decay), self.min_decay)


#: Registry of schedule names to :class:`IDecayFunction` subclasses. Add your own entries.
EMA_DECAY_FUNCTIONS: dict[str, type[IDecayFunction]] = {
    "constant": ConstantDecay,
    "threshold": ThresholdDecay,
    "exp": ExpDecay,
    "warmup": WarmupDecay,
}


def _constructor_params(cls: type) -> tuple[list[str] | None, list[str]]:
    """``(names, required)`` of the keyword arguments ``cls(...)`` takes; ``names`` is None when it takes any."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):  # no introspectable signature: pass everything, let the class decide
        return None, []
    names, required = [], []
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return None, []
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.append(p.name)
            if p.default is inspect.Parameter.empty:
                required.append(p.name)
    return names, required


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)


def make_schedule(
    decay_type: str | IDecayFunction,
    kwargs: Mapping[str, Any],
    *,
    optional: Iterable[str] = (),
    owner_args: Iterable[str] = (),
    owner: str | None = None,
) -> tuple[str, IDecayFunction]:
    """Resolve ``decay_type`` to a ``(name, schedule)`` pair, giving its constructor only what it takes.

    Args:
        decay_type: A name registered in :data:`EMA_DECAY_FUNCTIONS` or an :class:`IDecayFunction` instance.
        kwargs: Schedule arguments. Each one goes to the constructor when its signature names it (or has
            ``**kwargs``); one it does not take is an error, unless it is listed in ``optional``.
        optional: Names that are passed only where accepted and otherwise dropped silently (``beta``: an
            argument of the EMA itself, used by ``exp``, and carried by SuperGradients dicts for any schedule).
        owner_args: The caller's own argument names, used only to suggest a correction for a misspelled one.
        owner: Who got the arguments (e.g. ``"EMAState"``), for the error messages.

    Returns:
        The registry name (for an instance, the name it is registered under or its class name) and the schedule.

    Raises:
        ValueError: If the name is unknown (the message lists the known names), an argument is taken by no one
            (the message names it and suggests the closest known name), or the schedule's constructor misses a
            required argument.
        TypeError: If ``decay_type`` is neither a string nor an :class:`IDecayFunction`.

    Example:
        >>> name, fn = make_schedule("exp", {"beta": 10})
        >>> name, fn.beta
        ('exp', 10.0)
        >>> make_schedule("constant", {"beta": 15.0}, optional=["beta"])[1]
        ConstantDecay()
    """
    optional = set(optional)
    if isinstance(decay_type, IDecayFunction):
        name = next(
            (k for k, v in EMA_DECAY_FUNCTIONS.items() if v is type(decay_type)), type(decay_type).__name__
        )
        extra = sorted(k for k in kwargs if k not in optional)
        if extra:
            raise ValueError(
                f"Unexpected schedule argument(s) {_quoted(extra)} with decay_type={decay_type!r}, an already "
                "built schedule: pass them to its constructor instead"
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
    names, required = _constructor_params(cls)
    accepted = {k: v for k, v in kwargs.items() if names is None or k in names}
    unknown = [k for k in kwargs if k not in accepted and k not in optional]
    what = f"schedule {decay_type!r} ({cls.__name__})"
    if unknown:
        candidates = [*owner_args, *(names or ())]
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, candidates, n=1)
            hints.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
        takes = f"takes {_quoted(names)}" if names else "takes no extra arguments"
        not_owner = f"it is not an option of {owner}, and " if owner else ""
        raise ValueError(f"Unexpected argument {', '.join(hints)}: {not_owner}{what} {takes}")
    missing = [k for k in required if k not in accepted]
    if missing:
        to = f" to {owner}" if owner else ""
        raise ValueError(f"{what} needs the argument(s) {_quoted(missing)}: pass them{to}")
    schedule = cls(**accepted)
    if not hasattr(schedule, "kwargs"):  # its __init__ skipped IDecayFunction's: keep what rebuilds it
        schedule.kwargs = dict(accepted)
    return decay_type, schedule


def build_schedule(decay_type: str | IDecayFunction, **kwargs: Any) -> tuple[str, IDecayFunction]:
    """Resolve ``decay_type`` to a ``(name, schedule)`` pair: :func:`make_schedule` with ``beta`` optional.

    Args:
        decay_type: A name registered in :data:`EMA_DECAY_FUNCTIONS` or an :class:`IDecayFunction` instance.
        **kwargs: Passed to the schedule's constructor when it takes them (e.g. ``beta`` for ``"exp"``);
            ``beta`` is dropped for schedules without it, any other argument they do not take is refused.

    Example:
        >>> name, fn = build_schedule("exp", beta=10)
        >>> name, fn.beta
        ('exp', 10.0)
    """
    return make_schedule(decay_type, kwargs, optional=("beta",))


# ------------------------------------------------------------------------------------------- SuperGradients dicts
#: Keys of a SuperGradients ``ema_params`` dict that are not EMA settings (the top-level ``ema`` flag).
_SG_IGNORED_KEYS = ("ema",)
#: SuperGradients' default ``beta`` when ``decay_type`` is not given (``ModelEMA.from_params``).
_SG_DEFAULT_BETA = 15
_SG_DEFAULT_DECAY = 0.9999


def _uses_decay(decay_type: Any) -> bool:
    """Whether the schedule reads the EMA's ``decay`` (BEMA, for one, has its own arguments)."""
    cls = EMA_DECAY_FUNCTIONS.get(decay_type) if isinstance(decay_type, str) else type(decay_type)
    return bool(getattr(cls, "uses_decay", True))


def supergradients_kwargs(
    ema_params: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Read a SuperGradients ``ema_params`` dict the way its ``ModelEMA.from_params`` does.

    * no ``decay_type`` (or ``None``): ``exp`` with ``beta = 15`` unless given; SuperGradients deprecates this
      default, and so a ``UserWarning`` says so;
    * the legacy ``exp_activation`` flag: ``decay_type = "exp"`` if true else ``"constant"`` (it wins over a
      ``decay_type`` in the same dict, as in SuperGradients); a warning says it is deprecated;
    * no ``decay`` (or ``None``): ``0.9999``, with a warning, as in SuperGradients;
    * a top-level ``"ema"`` flag is ignored when true and refused (``ValueError``) when false: the EMA was switched
      off; every other key is returned as is (EMA options, or schedule arguments such as ``beta``).

    ``overrides`` are applied last, and a ``decay_type`` or ``decay`` among them counts as given.

    Returns:
        Keyword arguments for :class:`~hf_ema.EMAState` / :class:`~hf_ema.EMATrainerCallback`.

    Example:
        >>> supergradients_kwargs({"ema": True, "decay": 0.999, "decay_type": "threshold"})
        {'decay': 0.999, 'decay_type': 'threshold'}
    """
    if not isinstance(ema_params, Mapping):
        raise TypeError(f"`ema_params` must be a dict, got {type(ema_params).__name__}: {ema_params!r}")
    flag = ema_params.get("ema", True)
    if flag is not None and not flag:  # {"ema": False, ...}: the user switched the EMA off
        raise ValueError(
            f"ema_params has ema={flag!r}, which switches the EMA off (SuperGradients' `ema` training flag); "
            "building one from it would average anyway. Drop the callback / EMAState, or set ema=True."
        )
    params = {k: v for k, v in ema_params.items() if k not in _SG_IGNORED_KEYS}
    overrides = dict(overrides or {})
    bad = [k for k in (*params, *overrides) if not isinstance(k, str)]
    if bad:
        raise TypeError(f"`ema_params` keys must be strings, got {bad!r}")
    if "exp_activation" in params:
        flag = bool(params.pop("exp_activation"))
        mapped = "exp" if flag else "constant"
        previous = params.get("decay_type")
        note = (
            f" (it replaces decay_type={previous!r}, as in SuperGradients)"
            if previous not in (None, mapped)
            else ""
        )
        warnings.warn(
            f"ema_params: `exp_activation` is deprecated in SuperGradients; exp_activation={flag} means "
            f"decay_type={mapped!r}{note}. Write decay_type={mapped!r} instead.",
            UserWarning,
            stacklevel=3,
        )
        params["decay_type"] = mapped
    if params.get("decay_type") is None and overrides.get("decay_type") is None:
        warnings.warn(
            "ema_params has no `decay_type`: as in SuperGradients it means decay_type='exp' with beta="
            f"{params.get('beta', _SG_DEFAULT_BETA)!r} (SuperGradients deprecates this default; write "
            "decay_type explicitly).",
            UserWarning,
            stacklevel=3,
        )
        params["decay_type"] = "exp"
        params.setdefault("beta", _SG_DEFAULT_BETA)
    decay_type = overrides.get("decay_type", params.get("decay_type"))
    if params.get("decay") is None and overrides.get("decay") is None and _uses_decay(decay_type):
        warnings.warn(
            f"ema_params has no `decay`: as in SuperGradients it defaults to {_SG_DEFAULT_DECAY} (write it "
            "explicitly).",
            UserWarning,
            stacklevel=3,
        )
        params["decay"] = _SG_DEFAULT_DECAY
    params.update(overrides)
    return params
