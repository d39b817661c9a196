"""The EMA engine: shadow tensors, update, swap, copy, state dict and files. It knows nothing of Trainer.

Math. At creation the EMA is a copy of the model's weights, ``ema_0 = theta_0``. Steps are counted from 1: after
optimizer step ``t`` (``t = 1`` for the first; ``t`` = optimizer steps done, including this one, as SuperGradients'
trainer counts them) the schedule gives ``d_t = schedule(decay, t, total_steps)`` and, with ``N = update_every``,
on every N-th step (``t % N == 0``)::

    ema <- ema * D_t + theta_t * (1 - D_t)        (= lerp(ema, theta_t, 1 - D_t))

with ``D_t = d_t`` for ``N = 1`` and ``D_t = schedule.interval_decay(decay, t, total_steps, N)`` otherwise
(``d_t**N`` by default, which keeps the averaging horizon, measured in optimizer steps, the same as with ``N = 1``).
After the update ``EMAState.step == t``.

EMA scaling rule (Busbridge et al. 2023, "How to Scale Your EMA", arXiv:2307.13813). With a
``reference_batch_size`` ``B_ref`` and an effective batch ``B`` (samples per optimizer step), the decay applied is
``D_t ** kappa`` with ``kappa = B / B_ref``: ``kappa`` optimizer steps at ``B_ref`` samples each would have applied
``D_t`` ``kappa`` times, so the EMA's horizon in samples does not depend on ``B``. With ``time_unit="samples"``
the schedule is evaluated at ``samples_seen / B_ref`` (and ``total_steps * B / B_ref``) instead of ``t`` and
``total_steps``, so its warm-up also lasts a fixed number of samples.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
import operator
import os
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed as dist_utils
from .bema import BiasCorrection
from .io import (
    BEMA_EMA_NAME,
    BEMA_THETA0_NAME,
    STATE_NAME,
    EMAFileError,
    check_ema_meta,
    ema_dirname,
    open_ema_file,
    open_ema_net,
    save_ema_net,
    summarize_names,
)
from .schedules import (
    EMA_DECAY_FUNCTIONS,
    IDecayFunction,
    make_schedule,
    supergradients_kwargs,
)

__all__ = ["EMAState"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_BUFFER_MODES = ("average", "copy", "ignore")
#: Who takes the EMA's arguments, and their names (EMAState's and the Trainer callback's that wraps it): for the
#: message, and the suggestions, when an argument is taken by no one.
_OWNER = "EMAState / EMATrainerCallback"
_OWN_ARGS = (
    "decay",
    "decay_type",
    "beta",
    "total_steps",
    "update_every",
    "dtype",
    "buffers",
    "trainable_only",
    "device",
    "accelerator",
    "side_stream",
    "replace_at_end",
    "eval_both",
    "raw_prefix",
    "reference_batch_size",
    "batch_size",
    "time_unit",
    "strict_batch_size",
)


def _library_version() -> str:
    try:
        from . import __version__

        return __version__
    except ImportError:  # pragma: no cover - during partial imports
        return "unknown"


@dataclass
class _Entry:
    """One tracked tensor: ``live`` is the model's local tensor, ``ema`` its shadow."""

    name: str
    kind: str  # "param" | "buffer"
    mode: str  # "average" | "copy"
    source: torch.Tensor  # the parameter / buffer object as the model holds it (maybe DTensor / ZeRO-3)
    live: torch.Tensor  # plain local tensor sharing storage with ``source``
    ema: torch.Tensor
    staging: torch.Tensor | None = field(default=None, repr=False)  # pinned host copy for CPU offload
    # Where the model holds ``source``: ``owner._parameters[attr]`` or ``owner._buffers[attr]`` (see _check_bindings).
    owner: nn.Module | None = field(default=None, repr=False)
    attr: str = ""
    full_shape: tuple[int, ...] = ()
    sharded: bool = False  # whether ``source`` was sharded when bound (ZeRO-3 converts parameters in place)
    # Another entry whose local tensor is this very tensor (two Parameter objects on one storage): this entry
    # shares that entry's ``ema`` and is averaged and swapped through it only.
    alias: _Entry | None = field(default=None, repr=False)
    # Bias-corrected EMA (BEMA): the weights when averaging started, beside ``ema`` (same dtype, device, shard);
    # None for entries that are not corrected (buffers, or no bias correction).
    theta0: torch.Tensor | None = field(default=None, repr=False)


def _check_decay(decay: Any) -> float:
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not (0.0 < float(decay) < 1.0):
        raise ValueError(f"`decay` must be a number strictly between 0 and 1, got {decay!r}")
    return float(decay)


def _check_update_every(update_every: Any) -> int:
    if isinstance(update_every, bool) or not isinstance(update_every, numbers.Integral) or update_every < 1:
        raise ValueError(f"`update_every` must be an integer >= 1, got {update_every!r}")
    return int(update_every)


def _check_total_steps(total_steps: Any) -> int | None:
    if total_steps is None:
        return None
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
        raise ValueError(f"`total_steps` must be a positive integer or None, got {total_steps!r}")
    return int(total_steps)


def _checked_decay(value: Any, schedule: IDecayFunction, step: int, interval: int = 1) -> float:
    """``value`` as a float in [0, 1], else a ValueError naming the schedule, the step (and the interval)."""
    where = f"at step {step}" + (f" (interval_decay over {interval} steps)" if interval > 1 else "")
    try:
        d = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Decay schedule {schedule!r} returned {value!r} {where}; expected a float") from None
    if not (0.0 <= d <= 1.0):  # also rejects NaN
        raise ValueError(f"Decay schedule {schedule!r} returned {value!r} {where}; a decay must lie in [0, 1]")
    return d


_TIME_UNITS = ("steps", "samples")


def _check_batch_size(name: str, value: Any) -> int | None:
    """``None`` or a positive integer (a number of samples), else a ValueError naming the argument."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer (samples) or None, got {value!r}")
    return int(value)


def _check_time_unit(time_unit: Any, reference_batch_size: int | None) -> str:
    if time_unit not in _TIME_UNITS:
        raise ValueError(f"`time_unit` must be one of {_TIME_UNITS}, got {time_unit!r}")
    if time_unit == "samples" and reference_batch_size is None:
        raise ValueError(
            "time_unit='samples' counts the schedule's steps in samples / reference_batch_size: "
            "pass reference_batch_size=... too"
        )
    return time_unit


def _reference_steps(samples: int, reference_batch_size: int) -> int | float:
    """``samples / reference_batch_size``: an int when it divides exactly, else a float."""
    q, r = divmod(samples, reference_batch_size)
    return q if r == 0 else samples / reference_batch_size


def _samples_horizon(decay: float, batch_size: int, reference_batch_size: int, update_every: int) -> float:
    """``N * B / (1 - decay ** (N * B / B_ref))``: the horizon in samples (as :meth:`EMAState.horizon`)."""
    applied = decay ** (update_every * batch_size / reference_batch_size)
    return math.inf if applied >= 1.0 else update_every * batch_size / (1.0 - applied)


def _batch_size_from_accelerator(accelerator: Any) -> tuple[int | None, str]:
    """The effective batch (samples per optimizer step) of the accelerator's prepared dataloaders:
    ``total_batch_size`` (all processes) x ``gradient_accumulation_steps``; ``(None, why)`` when it is unknown or
    ambiguous (dataloaders with different batch sizes, e.g. training and evaluation)."""
    loaders = list(getattr(accelerator, "_dataloaders", None) or ())
    sizes = set()
    for loader in loaders:
        try:
            size = loader.total_batch_size
        except (AttributeError, TypeError):
            size = None
        if not isinstance(size, numbers.Integral) or size < 1:
            return None, f"a prepared dataloader has no usable total_batch_size ({size!r})"
        sizes.add(int(size))
    if not sizes:
        return None, "the accelerator has prepared no dataloader yet"
    if len(sizes) > 1:
        return None, f"its prepared dataloaders have different batch sizes {sorted(sizes)}"
    accumulation = getattr(accelerator, "gradient_accumulation_steps", 1) or 1
    return sizes.pop() * int(accumulation), ""


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(
                f"`dtype` must be a floating torch.dtype (e.g. torch.float32) or None, got {dtype!r}"
            )
        dtype = resolved
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"`dtype` must be a floating torch.dtype (e.g. torch.float32) or None, got {dtype!r}"
        )
    return dtype


def _check_device(device: Any) -> torch.device | None:
    """Parse the ``device=`` option and refuse a device this machine does not have (e.g. ``"cuda"`` without CUDA),
    so that the mistake shows when the EMA (or the Trainer callback) is created, not when training starts.

    Example:
        >>> _check_device("cpu")
        device(type='cpu')
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"`device` must be a torch device or None, got {device!r}") from e
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if callable(available) and not available():
        raise ValueError(
            f"`device`={device!r}, but this machine has no {dev.type} device (torch.{dev.type}.is_available() is "
            "False); use device=None (the EMA lives next to each parameter) or device='cpu'"
        )
    count = getattr(backend, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise ValueError(f"`device`={device!r}, but only {count()} {dev.type} device(s) are visible")
    return dev


def _param_slots(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """``(name, owning module, attribute, parameter)`` in ``named_parameters()`` order, each parameter once."""
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        for attr, p in mod._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            yield (f"{mod_name}.{attr}" if mod_name else attr), mod, attr, p


def _buffer_slots(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """``(name, owning module, attribute, buffer)`` of the persistent buffers (those in ``state_dict``), each
    object once."""
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        non_persistent = getattr(mod, "_non_persistent_buffers_set", set())
        for b_name, buf in mod._buffers.items():
            if buf is None or b_name in non_persistent or id(buf) in seen:
                continue
            seen.add(id(buf))
            yield (f"{mod_name}.{b_name}" if mod_name else b_name), mod, b_name, buf


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Named persistent buffers (those in ``state_dict``), each object once."""
    for name, _, _, buf in _buffer_slots(model):
        yield name, buf


def _fsdp2_sharded(model: nn.Module) -> dict[int, torch.Tensor]:
    """``id(t) -> sharded parameter`` for every form ``t`` in which FSDP2 may register one of its parameters on the
    module (the sharded ``DTensor`` itself, the unsharded tensor between all-gather and reshard, the post-forward
    reshard). Empty without FSDP2. Uses FSDP2's internals, on the slow path of :meth:`EMAState._check_bindings`.
    """
    out: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        get_state = getattr(mod, "_get_fsdp_state", None)
        if get_state is None:
            continue
        try:
            state = get_state()
        except Exception:  # pragma: no cover - not an FSDP2 module after all
            continue
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        for group in groups:
            for fp in getattr(group, "fsdp_params", ()):
                sharded = getattr(fp, "sharded_param", None)
                if sharded is None:
                    continue
                forms = (
                    sharded,
                    getattr(fp, "_unsharded_param", None),
                    getattr(fp, "_sharded_post_forward_param", None),
                )
                for form in forms:
                    if form is not None:
                        out[id(form)] = sharded
    return out


class EMAState:
    """Exponential Moving Average of a model's weights.

    The EMA starts as a copy of the weights; after each optimizer step, :meth:`update` does
    ``ema = ema * d + param * (1 - d)`` with ``d`` from the decay schedule (see :mod:`hf_ema.schedules`).
    Averaging runs as one ``torch._foreach_*`` call per (device, dtype) group over cached tensor lists, with no
    host-device synchronisation. On sharded models (FSDP2, ZeRO-3) each process averages only its own shard.

    The EMA follows the model's tensors: when they are moved, cast, re-assigned or sharded after it was built
    (``model.to(...)``, ``param.data = ...``, ``accelerator.prepare`` on a GPU, ``fully_shard``, ZeRO-3), the next
    call re-binds to them, keeping the EMA's values (a cheap check on every call, one INFO log line per re-bind).
    Tracked names or shapes that change (``resize_token_embeddings``, ``get_peft_model`` after building the EMA)
    raise a ``ValueError`` naming them.

    Args:
        model: The model (wrapped or not: DDP, ``torch.compile`` and Accelerate wrappers are removed).
        decay: Maximum decay, strictly in (0, 1).
        decay_type: ``"constant"``, ``"threshold"``, ``"exp"``, ``"warmup"`` (timm / diffusers warm-up), a name
            registered in ``EMA_DECAY_FUNCTIONS``, or an :class:`~hf_ema.schedules.IDecayFunction` instance.
            ``"bema"`` (:mod:`hf_ema.bema`) is the bias-corrected EMA: every read of the EMA weights (swap,
            ``copy_to``, ``ema_state_dict``, ``save``) gives ``EMA + alpha * (live - theta_0)``, and ``theta_0`` is
            kept beside the EMA.
        beta: ``exp`` schedule sharpness.
        total_steps: Planned number of optimizer steps (required by ``exp``).
        update_every: Average on every N-th optimizer step only, with the decay raised to the N-th power.
        dtype: Precision of the EMA for floating-point parameters (fp32 by default, also for bf16/fp16 models;
            ``None`` keeps each parameter's dtype). fp64 parameters keep fp64.
        buffers: Floating-point buffers are ``"average"``-d (as SuperGradients does), ``"copy"``-ed, or
            ``"ignore"``-d. Integer buffers (e.g. ``num_batches_tracked``) are always copied, never averaged.
        trainable_only: Track only parameters with ``requires_grad`` (e.g. LoRA adapters), and no buffers.
        device: Keep the EMA on this device (e.g. ``"cpu"`` to offload); default: next to each parameter. A device
            this machine lacks (``"cuda"`` without CUDA) is refused here.
        accelerator: An ``accelerate.Accelerator``: used to unwrap the model, to skip optimizer steps it reports
            as skipped (fp16 overflow), and to save/load the EMA with ``save_state`` / ``load_state``.
        side_stream: On CUDA, run the update on a side stream; it is joined before the next optimizer step
            and before the EMA is read.
        name: ``None`` (folder ``ema_net``) or a name of letters, digits, ``_``, ``.``, ``-`` (folder
            ``ema_net-<name>``): several EMAs of one model save, load and resume side by side. Two EMAs with the
            same name on one ``accelerator`` are refused (they would write the same folder).
        reference_batch_size: ``B_ref``: the effective batch that ``decay`` (and the schedule) is meant for. The
            decay applied per optimizer step is then ``d ** (B / B_ref)``, with ``B`` = ``batch_size``: the EMA
            scaling rule of Busbridge et al. 2023 (arXiv:2307.13813), which keeps the horizon in samples when the
            batch, the number of processes or the gradient accumulation changes. ``None`` (default): no scaling.
        batch_size: ``B``: samples per optimizer step, all processes and accumulated micro-batches included
            (per-device batch x gradient accumulation x data-parallel processes). Default: with an
            ``accelerator``, its prepared dataloaders' ``total_batch_size`` x ``gradient_accumulation_steps``;
            required with ``reference_batch_size`` otherwise. Change it with :meth:`set_batch_size`.
        time_unit: ``"steps"`` (default): the schedule gets the optimizer step count; ``"samples"`` (needs
            ``reference_batch_size``): it gets ``samples_seen / B_ref`` and ``total_steps * B / B_ref``, the
            training progress in reference-batch steps (a float when not a whole number: custom schedules must
            accept floats in this mode).
        strict_batch_size: Refuse (``ValueError``) to load an EMA saved with another effective batch size,
            instead of rescaling the decay (and logging it).
        **schedule_kwargs: Arguments of the schedule's constructor (each passed only to a schedule that declares
            it; ``beta`` only where accepted); an argument that no one takes is refused, naming it. For a
            SuperGradients ``ema_params`` dict use :meth:`from_params`, which also reads its defaults.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> ema = EMAState(model, decay=0.9, decay_type="constant")
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)
        >>> ema.update()
        0.9
        >>> with ema.average_parameters():
        ...     pass  # evaluate with the EMA weights here
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        decay_type: str | IDecayFunction = "constant",
        *,
        beta: float = 15.0,
        total_steps: int | None = None,
        update_every: int = 1,
        dtype: torch.dtype | str | None = torch.float32,
        buffers: str = "average",
        trainable_only: bool = False,
        device: str | torch.device | None = None,
        accelerator: Any = None,
        side_stream: bool = False,
        name: str | None = None,
        reference_batch_size: int | None = None,
        batch_size: int | None = None,
        time_unit: str = "steps",
        strict_batch_size: bool = False,
        **schedule_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        ema_dirname(name)  # validates the name
        self.name = name
        self.decay = _check_decay(decay)
        self.update_every = _check_update_every(update_every)
        self.total_steps = _check_total_steps(total_steps)
        self.dtype = _resolve_dtype(dtype)
        if buffers not in _BUFFER_MODES:
            raise ValueError(f"`buffers` must be one of {_BUFFER_MODES}, got {buffers!r}")
        self.buffers = buffers
        if not isinstance(trainable_only, bool):
            raise TypeError(
                f"`trainable_only` must be True or False, got {type(trainable_only).__name__}: {trainable_only!r}"
            )
        if not isinstance(side_stream, bool):
            raise TypeError(
                f"`side_stream` must be True or False, got {type(side_stream).__name__}: {side_stream!r}"
            )
        self.trainable_only = trainable_only
        self.device = _check_device(device)
        self.schedule_kwargs = {"beta": beta, **schedule_kwargs}
        self.decay_type, self.schedule = make_schedule(
            decay_type, self.schedule_kwargs, optional=("beta",), owner_args=_OWN_ARGS, owner=_OWNER
        )
        self._check_schedule_needs()
        self._init_batch_scaling(reference_batch_size, batch_size, time_unit, strict_batch_size, accelerator)
        if self.reference_batch_size is not None and getattr(self.schedule, "batch_size_invariant", False):
            raise ValueError(
                f"reference_batch_size={self.reference_batch_size} with decay_type={self.decay_type!r}: this "
                "schedule's averaging profile is relative to the training time already, the same for any batch "
                "size, and the scaling rule's d ** (batch_size / reference_batch_size) would change it (for "
                "'power', to another gamma). Drop reference_batch_size (and time_unit)."
            )

        self.accelerator = accelerator
        self.model = dist_utils.unwrap_model(model, accelerator)
        self.step = 0
        self.num_updates = 0
        self.last_decay: float | None = None
        self.last_applied_decay: float | None = None  # decay applied by the last averaging
        self._swapped = False
        # While swapped: (entry, None) for an XOR exchange, (entry, backup of the model's tensor) otherwise, in the
        # order they were done; undone in reverse order (tensors may share storage).
        self._swap_ops: list[tuple[_Entry, torch.Tensor | None]] = []
        self._xor_ids: set[int] = set()
        self._pending_offload: tuple[float, Any] | None = None
        self.side_stream = bool(side_stream)
        self._side_stream_requested = self.side_stream
        self._stream: Any = None
        self._event: Any = None
        self._hook_handle: Any = None

        self._entries = self._collect_entries()
        #: trainable_only: the floating-point parameters frozen when the EMA was built, watched in update() so that
        #: one unfrozen later (gradual unfreezing), which is not averaged, is reported (once) instead of ignored.
        self._frozen: list[tuple[str, torch.Tensor]] = (
            [(n, p) for n, p in self.model.named_parameters() if p.is_floating_point() and not p.requires_grad]
            if self.trainable_only
            else []
        )
        if not self._entries:
            raise ValueError(
                "The model has nothing to average: no floating-point parameters"
                + (" with requires_grad=True (trainable_only=True)" if self.trainable_only else "")
            )
        self._dedupe_aliases()
        self._build_groups()
        self._cache_bindings()
        self._setup_side_stream()
        self._init_bias_correction()
        self._setup_start_refresh()
        if accelerator is not None and hasattr(accelerator, "register_save_state_pre_hook"):
            from .accelerate_hooks import register_with_accelerator

            register_with_accelerator(self, accelerator)

    @classmethod
    def from_params(cls, model: nn.Module, ema_params: Mapping[str, Any], **overrides: Any) -> EMAState:
        """Build from a SuperGradients ``ema_params`` dict, read as SuperGradients' ``ModelEMA.from_params`` reads
        it (see :func:`hf_ema.schedules.supergradients_kwargs`: no ``decay_type`` means ``exp`` with
        ``beta=15``, with a warning; ``exp_activation`` maps to ``exp`` / ``constant``).

        SuperGradients' trainer uses ``total_steps = len(train_loader) * max_epochs``: pass it as an override for
        ``exp``. Driven once per optimizer step without gradient accumulation, the EMA then equals
        SuperGradients' (to fp32 rounding).

        Example:
            >>> ema = EMAState.from_params(nn.Linear(2, 2), {"decay": 0.999, "decay_type": "threshold"})
            >>> ema.decay_type
            'threshold'
        """
        return cls(model, **supergradients_kwargs(ema_params, overrides))

    # ------------------------------------------------------------------ set-up
    def _check_schedule_needs(self) -> None:
        validate = getattr(self.schedule, "validate", None)
        if validate is not None:
            validate(self.decay)
        if getattr(self.schedule, "requires_total_steps", False) and self.total_steps is None:
            raise ValueError(
                f"decay_type={self.decay_type!r} needs `total_steps` (the planned number of optimizer steps); "
                "pass total_steps=... (the Trainer callback sets it from max_steps)"
            )

    def _init_batch_scaling(
        self,
        reference_batch_size: Any,
        batch_size: Any,
        time_unit: Any,
        strict_batch_size: Any,
        accelerator: Any,
    ) -> None:
        """Check and set the EMA scaling rule's settings (see :meth:`set_batch_size`)."""
        self.reference_batch_size = _check_batch_size("reference_batch_size", reference_batch_size)
        self.time_unit = _check_time_unit(time_unit, self.reference_batch_size)
        if not isinstance(strict_batch_size, bool):
            raise TypeError(
                f"`strict_batch_size` must be True or False, got {type(strict_batch_size).__name__}: "
                f"{strict_batch_size!r}"
            )
        self.strict_batch_size = strict_batch_size
        self._batch_size = _check_batch_size("batch_size", batch_size)
        why = "no accelerator was given"
        if self._batch_size is None and accelerator is not None:
            self._batch_size, why = _batch_size_from_accelerator(accelerator)
        if self._batch_size is None and self.reference_batch_size is not None:
            raise ValueError(
                f"reference_batch_size={self.reference_batch_size} needs the effective batch size B (samples per "
                f"optimizer step) to scale the decay by B / reference_batch_size, and it is unknown ({why}): pass "
                "batch_size=<per-device batch x gradient accumulation x processes>"
            )
        #: Samples averaged over so far (the sum of the effective batch over counted steps); None when unknown.
        self.samples_seen: int | None = 0 if self._batch_size is not None else None

    @torch.no_grad()
    def _init_bias_correction(self) -> None:
        """A schedule with a bias correction (BEMA, :mod:`hf_ema.bema`) gets ``theta_0`` beside the EMA of every
        averaged parameter (same dtype, device and shard: one more EMA-sized copy), taken now when the schedule
        starts at step 0, else by :meth:`update` at the schedule's start step."""
        self._bias = BiasCorrection.for_schedule(self.schedule, self.update_every)
        self._swap_alpha: float | None = None  # alpha of the BEMA swapped in (fixed while swapped)
        if self._bias is None:
            return
        for e in self._primaries:
            if e.kind == "param" and e.mode == "average":
                e.theta0 = e.ema.clone()
        for e in self._entries:
            if e.alias is not None:
                e.theta0 = e.alias.theta0
        if self._bias.start == 0:
            self._bias.taken_step = 0

    def _read_alpha(self) -> float | None:
        """``alpha`` of the bias correction for a read now (None: none, or ``theta_0`` not taken yet)."""
        return None if self._bias is None else self._bias.alpha(self.step)

    def _ema_dtype(self, t: torch.Tensor) -> torch.dtype:
        if self.dtype is None or t.dtype == torch.float64:
            return t.dtype
        return self.dtype

    def _scan(self) -> list[tuple[str, str, str, nn.Module, str, torch.Tensor]]:
        """What the construction rules track in the model as it is now: ``(name, kind, mode, owner, attr, tensor)``
        in model order."""
        out: list[tuple[str, str, str, nn.Module, str, torch.Tensor]] = []
        for name, mod, attr, p in _param_slots(self.model):
            if not p.is_floating_point() or (self.trainable_only and not p.requires_grad):
                continue
            out.append((name, "param", "average", mod, attr, p))
        if not self.trainable_only:
            for name, mod, attr, b in _buffer_slots(self.model):
                if not b.is_floating_point():
                    out.append((name, "buffer", "copy", mod, attr, b))
                elif self.buffers != "ignore":
                    out.append((name, "buffer", self.buffers, mod, attr, b))
        return out

    def _collect_entries(self) -> list[_Entry]:
        # every parameter / persistent buffer name of the model now: a name that appears later is a new tensor
        self._built_names = {n for n, *_ in _param_slots(self.model)}
        self._built_names |= {n for n, *_ in _buffer_slots(self.model)}
        return [self._make_entry(*slot) for slot in self._scan()]

    def _placement(self, name: str, live: torch.Tensor, mode: str) -> tuple[torch.dtype, torch.device]:
        """dtype and device of the EMA of the local tensor ``live`` (at creation and when re-binding)."""
        dtype = self._ema_dtype(live) if mode == "average" else live.dtype
        device = live.device if self.device is None or _same_device(self.device, live.device) else self.device
        if mode == "copy":  # small buffers: copied beside their tensor, never a blocking cross-device copy
            device = live.device
        if device != live.device and device.type != "cpu":
            raise ValueError(
                f"`device`={str(device)!r}: the EMA can live next to each parameter (device=None) or in host memory "
                f"(device='cpu'), but {name!r} is on {live.device}"
            )
        return dtype, device

    @staticmethod
    def _staging_for(live: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        if device == live.device:
            return None
        # (only a host EMA of a device tensor gets here)
        return torch.empty(live.shape, dtype=live.dtype, device="cpu", pin_memory=torch.cuda.is_available())

    def _make_entry(
        self, name: str, kind: str, mode: str, owner: nn.Module, attr: str, source: torch.Tensor
    ) -> _Entry:
        live = dist_utils.local_tensor(source)
        dtype, device = self._placement(name, live, mode)
        with torch.no_grad():
            ema = torch.empty(live.shape, dtype=dtype, device=device)
            ema.copy_(live)
        full = tuple(dist_utils.full_shape(source))
        staging = self._staging_for(live, device)
        return _Entry(
            name, kind, mode, source, live, ema, staging, owner, attr, full, dist_utils.is_sharded(source)
        )

    def _dedupe_aliases(self) -> None:
        """Entries whose local tensors are one and the same tensor (two ``Parameter`` objects on one storage, same
        offset, shape, strides and dtype) share one EMA tensor and are averaged and swapped once, through the first
        of them; swapping them one after the other would exchange the same memory twice."""
        first: dict[tuple, _Entry] = {}
        owned: set[int] = set()
        for e in self._entries:
            e.alias = None
            t = e.live
            if t.numel():
                key = (
                    t.device,
                    t.dtype,
                    t.untyped_storage().data_ptr(),
                    t.storage_offset(),
                    t.shape,
                    t.stride(),
                    e.mode,
                    e.ema.dtype,
                    e.ema.device,
                )
                primary = first.setdefault(key, e)
                if primary is not e:
                    e.alias, e.ema, e.staging = primary, primary.ema, None
                    e.theta0 = primary.theta0
                    continue
            if id(e.ema) in owned:  # it was an alias before a re-bind separated the two tensors
                e.ema = e.ema.clone()
                e.theta0 = None if e.theta0 is None else e.theta0.clone()
            owned.add(id(e.ema))
        self._primaries = [e for e in self._entries if e.alias is None]

    def _build_groups(self) -> None:
        """Cache the tensor lists that :meth:`update` works on, one group per (device, dtypes)."""
        prim = self._primaries
        inline = [(e.ema, e.live) for e in prim if e.mode == "average" and e.staging is None]
        # CPU offload: averaged on the host from a pinned staged copy of the parameter, see _flush_offload.
        self._offload = [e for e in prim if e.staging is not None]
        self._avg_groups = _AveragingGroups(inline)
        self._offload_groups = _AveragingGroups([(e.ema, e.staging) for e in self._offload])
        self._offload_copy = ([e.staging for e in self._offload], [e.live for e in self._offload])
        self._offload_event = torch.cuda.Event() if self._offload else None
        copy: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for e in prim:
            if e.mode == "copy":
                lists = copy.setdefault((e.ema.device, e.ema.dtype, e.live.device, e.live.dtype), ([], []))
                lists[0].append(e.ema)
                lists[1].append(e.live)
        self._copy_groups = list(copy.values())
        self._names = [e.name for e in self._entries]
        self._by_name = {e.name: e for e in self._entries}

    def _setup_side_stream(self) -> None:
        if not self.side_stream:
            return
        devices = {e.live.device for e in self._entries}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            logger.warning("side_stream=True needs all tracked tensors on one CUDA device; updating inline.")
            self.side_stream = False
            return
        dev = next(iter(devices))
        self._stream = torch.cuda.Stream(device=dev)
        self._event = torch.cuda.Event()
        ref = weakref.ref(self)

        def _join_before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
            obj = ref()
            if obj is not None:
                obj.wait()

        # `torch.optim.optimizer` is not an attribute of `torch.optim` (its __init__ deletes the submodule names)
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._hook_handle = register_optimizer_step_pre_hook(_join_before_step)

    def __del__(self) -> None:
        for attr in ("_hook_handle", "_start_handle"):
            handle = getattr(self, attr, None)
            if handle is not None:
                handle.remove()

    def _setup_start_refresh(self) -> None:
        """With several processes, take the EMA's start again right before the first optimizer step.

        An EMA built before ``accelerator.prepare`` / ``DistributedDataParallel(model)`` copied each rank's own
        initial weights, and DDP then overwrites every rank's weights with rank 0's: the ranks' EMAs would differ
        for good, silently. Right before the first optimizer step (a global ``torch.optim`` step pre-hook; it does
        nothing afterwards) the averaged parameters' EMA is copied again from the weights, which are by then the
        synchronised ones (and, for one built in ``on_train_begin``, the same weights as at construction). Not
        when the EMA was loaded, updated or is swapped in before that step; buffers are left as they are (a
        forward may have changed them already).
        """
        self._start_pending = bool(
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        )
        self._start_handle: Any = None
        if not self._start_pending:
            return
        ref = weakref.ref(self)

        def _refresh_before_first_step(optimizer: Any, args: Any, kwargs: Any) -> None:
            obj = ref()
            if obj is not None and obj._start_pending:
                obj._refresh_start()

        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._start_handle = register_optimizer_step_pre_hook(_refresh_before_first_step)

    @torch.no_grad()
    def _refresh_start(self) -> None:
        self._start_pending = False
        if self._swapped or self.step or self.num_updates:
            return
        self.wait()
        self._check_bindings()
        for e in self._primaries:
            if e.kind == "param" and e.mode == "average":
                e.ema.copy_(e.live)
                if e.theta0 is not None:
                    e.theta0.copy_(e.live)

    def _end_start_refresh(self) -> None:
        """No refresh of the EMA's start any more (it was updated or loaded); the hook is removed here, not inside
        itself (torch iterates the hooks while calling them)."""
        self._start_pending = False
        if self._start_handle is not None:
            self._start_handle.remove()
            self._start_handle = None

    # ------------------------------------------------------------------ bindings to the model's tensors
    def _cache_bindings(self) -> None:
        """Remember, for :meth:`_check_bindings`, what the model holds now: every ``module._modules[name]`` child,
        every tracked ``owner._parameters[attr]`` / ``owner._buffers[attr]`` object, and the address of each
        tracked local tensor."""
        dicts: list[dict] = []
        keys: list[str] = []
        for mod in self.model.modules():
            for k, child in mod._modules.items():
                if child is not None:
                    dicts.append(mod._modules)
                    keys.append(k)
        for e in self._entries:
            dicts.append(e.owner._parameters if e.kind == "param" else e.owner._buffers)
            keys.append(e.attr)
        objs = [d.get(k) for d, k in zip(dicts, keys, strict=True)]
        # the local tensor's address, read the cheapest way per kind (``local_tensor`` costs ~1 us a call)
        dts = [e.source for e in self._entries if dist_utils.is_dtensor(e.source)]
        z3s = [e.source for e in self._entries if dist_utils.is_zero3_param(e.source)]
        plain = [e.source for e in self._entries if not dist_utils.is_sharded(e.source)]
        self._bound = (
            dicts,
            keys,
            objs,
            plain,
            [t.data_ptr() for t in plain],
            dts,
            [t._local_tensor.data_ptr() for t in dts],
            z3s,
            [t.ds_tensor.data_ptr() for t in z3s],
        )

    def _check_bindings(self) -> None:
        """Follow the model if its tensors were replaced since the EMA was built or last checked.

        ``model.to(device/dtype)``, ``param.data = ...``, ``accelerator.prepare`` on a GPU, ``fully_shard``,
        DeepSpeed ZeRO-3 or a replaced sub-module leave the EMA holding tensors the model no longer uses. Checked
        cheaply on every call (object identity of each module child and tracked tensor, and the address of each
        local tensor: no host-device sync; the old storage stays alive through ``_Entry.live``, so a new tensor
        never gets its address); on a difference, :meth:`_rebind` re-binds or raises.
        """
        dicts, keys, objs, plain, plain_ptrs, dts, dt_ptrs, z3s, z3_ptrs = self._bound
        if (
            all(map(operator.is_, map(dict.get, dicts, keys), objs))
            and list(map(_data_ptr, plain)) == plain_ptrs
            and (not dts or [t._local_tensor.data_ptr() for t in dts] == dt_ptrs)
            and (not z3s or [t.ds_tensor.data_ptr() for t in z3s] == z3_ptrs)
        ):
            return
        self._rebind()

    def _rebind(self) -> None:
        """The slow path of :meth:`_check_bindings`: find each tracked name in the model again and re-bind.

        Same name and full shape, other object / storage / device / dtype: the EMA keeps its values and follows the
        new tensor (moved next to it unless ``device=`` pins it; its dtype by the ``dtype=`` rule, so an fp32 EMA
        stays fp32). A tensor that became sharded (``fully_shard`` / ZeRO-3 after the EMA was built) keeps this
        process's part of the EMA (:func:`hf_ema.distributed.shard_like`). Names or shapes that changed: a
        ``ValueError`` naming them.
        """
        self.wait()
        # every name the model's state_dict has, also a second name of a shared tensor or module (a tracked name
        # may have become one: weights tied after the EMA was built)
        slots: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
        for mod_name, mod in self.model.named_modules(remove_duplicate=False):
            prefix = f"{mod_name}." if mod_name else ""
            non_persistent = getattr(mod, "_non_persistent_buffers_set", set())
            for attr, t in [*mod._parameters.items(), *mod._buffers.items()]:
                if t is not None and attr not in non_persistent:
                    slots.setdefault(prefix + attr, (mod, attr, t))
        fsdp = _fsdp2_sharded(self.model)
        tracked = set(self._names)
        missing = [e.name for e in self._entries if e.name not in slots]
        added = [n for n, *_ in self._scan() if n not in tracked and n not in self._built_names]
        resized = []
        changes: list[tuple[_Entry, nn.Module, str, torch.Tensor, torch.Tensor]] = []
        for e in self._entries:
            if e.name not in slots:
                continue
            mod, attr, t = slots[e.name]
            # FSDP2 may hold the unsharded parameter right now: the sharded one is ours
            t = fsdp.get(id(t), t)
            shape = tuple(dist_utils.full_shape(t))
            if shape != e.full_shape:
                resized.append(f"{e.name}: {e.full_shape} -> {shape}")
                continue
            live = dist_utils.local_tensor(t)
            same = t is e.source and live.data_ptr() == e.live.data_ptr() and live.shape == e.live.shape
            if same and live.dtype == e.live.dtype and live.device == e.live.device:
                e.owner, e.attr = mod, attr
            else:
                changes.append((e, mod, attr, t, live))
        if missing or added or resized:
            parts = []
            if resized:
                parts.append(f"shape changed: {summarize_names(resized)}")
            if missing:
                parts.append(f"no longer in the model: {summarize_names(missing)}")
            if added:
                parts.append(f"new in the model: {summarize_names(added)}")
            raise ValueError(
                "The model's tensors changed after the EMA was built: "
                + "; ".join(parts)
                + ". The EMA follows a tensor that is moved, cast, re-assigned or sharded under the same name and "
                "shape, but not a change of names or shapes (resize_token_embeddings, get_peft_model, a replaced "
                "sub-module). Build the EMAState once the model is final, after such changes and after "
                "accelerator.prepare(model), or build a new EMAState now."
            )
        if changes:
            self._apply_rebind(changes)
        self._cache_bindings()

    def _apply_rebind(self, changes: list[tuple[_Entry, nn.Module, str, torch.Tensor, torch.Tensor]]) -> None:
        layouts = []
        for e, _, _, t, live in changes:
            was, now = e.sharded, dist_utils.is_sharded(t)
            if was and (
                not now or live.shape != e.live.shape or _dtensor_layout(e.source) != _dtensor_layout(t)
            ):
                raise ValueError(
                    f"{e.name!r} was sharded when the EMA was built and is now laid out differently (local shape "
                    f"{tuple(e.live.shape)} -> {tuple(live.shape)}); the EMA cannot follow without gathering it. "
                    "Build the EMAState after the model is sharded (after fully_shard / accelerator.prepare)."
                )
            layouts.append(now and not was)
        # where each EMA goes (may refuse: device= pins another accelerator), before anything is changed
        places = [self._placement(e.name, live, e.mode) for e, _, _, _, live in changes]
        swapped = self._swapped
        if swapped:
            # Replaced inside average_parameters(): the model's new tensors hold the EMA (and whatever the block wrote
            # into them since). Give those values to the tensors that the swap record points at, put the training
            # weights back there, re-bind, carry the training weights over to the new tensors, swap in again.
            if any(layouts):
                raise RuntimeError(
                    "The model was sharded inside average_parameters(): leave the block first, then shard it"
                )
            for e, _, _, _, live in changes:
                _merge_into(e.live, live)
            self._swap_out()
        moved = []
        for (e, mod, attr, t, live), cut, (dtype, device) in zip(changes, layouts, places, strict=True):
            values = dist_utils.shard_like(t, e.ema) if cut else e.ema
            if values is e.ema and e.ema.dtype == dtype and e.ema.device == device and e.alias is None:
                ema = e.ema
            else:
                ema = torch.empty(live.shape, dtype=dtype, device=device)
                ema.copy_(values)
            theta0 = e.theta0  # BEMA's theta_0 follows exactly as the EMA does
            if theta0 is not None and (cut or theta0.dtype != dtype or theta0.device != device or e.alias):
                theta0 = torch.empty(live.shape, dtype=dtype, device=device)
                theta0.copy_(dist_utils.shard_like(t, e.theta0) if cut else e.theta0)
            if swapped:
                live.copy_(e.live)
            if len(moved) < 3:
                moved.append(
                    f"{e.name} ({_describe(e.live)} -> {_describe(live)}{', sharded' if cut else ''}; "
                    f"EMA {_describe(ema)})"
                )
            e.source, e.live, e.ema, e.owner, e.attr = t, live, ema, mod, attr
            e.theta0 = theta0
            e.sharded = dist_utils.is_sharded(t)
            e.staging = self._staging_for(live, device)
        self._dedupe_aliases()
        self._build_groups()
        if self._side_stream_requested:
            self._reset_side_stream()
        logger.info(
            "hf_ema: the model's tensors were replaced after the EMA was built (moved, cast, re-assigned or "
            "sharded); the EMA now follows the new ones, %d re-bound, e.g. %s",
            len(changes),
            ", ".join(moved),
        )
        if swapped:
            self._swap_in()

    def _reset_side_stream(self) -> None:
        """Set the side stream up again for the devices the tracked tensors are on now."""
        if self._hook_handle is not None:
            self._hook_handle.remove()
        self._stream = self._event = self._hook_handle = None
        self.side_stream = True
        self._setup_side_stream()

    # ------------------------------------------------------------------ properties
    @property
    def names(self) -> list[str]:
        """State-dict names of the tracked tensors, in model order."""
        return list(self._names)

    @property
    def is_sharded(self) -> bool:
        """Whether some tracked tensor is split across processes (FSDP2, ZeRO-3): :meth:`save` and
        :meth:`ema_state_dict` then gather, which every rank must join."""
        self._check_bindings()
        return any(dist_utils.is_sharded(e.source) for e in self._entries)

    def num_bytes(self) -> int:
        """Bytes held by this process's EMA tensors (its shards only, on sharded models), BEMA's ``theta_0``
        included."""
        return sum(
            t.numel() * t.element_size() for e in self._primaries for t in (e.ema, e.theta0) if t is not None
        )

    # ------------------------------------------------------------------ batch size (EMA scaling rule)
    @property
    def batch_size(self) -> int | None:
        """The effective batch ``B``: samples per optimizer step (None: unknown). Set it with
        :meth:`set_batch_size`."""
        return self._batch_size

    def set_batch_size(self, batch_size: int) -> None:
        """Tell the EMA that optimizer steps from now on see ``batch_size`` samples (all processes and accumulated
        micro-batches together), e.g. after a batch-size ramp. With ``reference_batch_size`` the following updates
        apply ``d ** (batch_size / reference_batch_size)``; ``samples_seen`` counts the new size from here on.

        Example:
            >>> ema = EMAState(nn.Linear(2, 2), decay=0.9, reference_batch_size=32, batch_size=32)
            >>> ema.set_batch_size(64)
            >>> round(ema.update(), 12)  # 0.9 ** (64 / 32)
            0.81
        """
        size = _check_batch_size("batch_size", batch_size)
        if size is None:
            raise ValueError("`batch_size` must be a positive integer (samples), got None")
        if self.samples_seen is None and self._batch_size is None and self.step == 0:
            self.samples_seen = 0
        self._batch_size = size

    def horizon(self, decay: float | None = None) -> dict[str, Any]:
        """The EMA's averaging horizon, ``1 / (1 - decay)``, in optimizer steps and in samples.

        With ``kappa = batch_size / reference_batch_size`` (1 without a reference batch) and ``N = update_every``:
        ``step_decay = decay ** kappa`` (per optimizer step), ``applied_decay = decay ** (kappa * N)`` (per
        averaging, every N steps), ``steps = N / (1 - applied_decay)`` (``1 / (1 - step_decay)`` for ``N = 1``:
        the age, in optimizer steps, at which a weight's share has fallen by about ``e``) and
        ``samples = steps * batch_size``. With the scaling rule ``samples`` stays ~``B_ref / (1 - decay)`` whatever
        the batch size.

        Args:
            decay: A decay of the schedule at the reference batch; default: the maximum ``decay``, which the
                schedule approaches (``constant``: the decay used at every step).

        Returns:
            ``{"decay", "step_decay", "applied_decay", "update_every", "steps", "samples", "batch_size",
            "reference_batch_size"}``; ``samples`` is None when the batch size is unknown, ``steps`` is ``inf``
            for a decay of 1.

        Example:
            >>> ema = EMAState(nn.Linear(2, 2), decay=0.99, batch_size=64, reference_batch_size=32)
            >>> h = ema.horizon()
            >>> round(h["step_decay"], 6), round(h["steps"], 2), round(h["samples"], 1)
            (0.9801, 50.25, 3216.1)
        """
        d = self.decay if decay is None else _checked_decay(decay, self.schedule, self.step)
        b, b_ref = self._batch_size, self.reference_batch_size
        kappa = 1.0 if b_ref is None or b is None else b / b_ref
        n = self.update_every
        applied = d ** (kappa * n)
        steps = math.inf if applied >= 1.0 else n / (1.0 - applied)
        return {
            "decay": d,
            "step_decay": d**kappa,
            "applied_decay": applied,
            "update_every": self.update_every,
            "steps": steps,
            "samples": None if b is None else steps * b,
            "batch_size": b,
            "reference_batch_size": b_ref,
        }

    def _scaled_decays(self, step: int, averaging: bool) -> tuple[float, float]:
        """``(d ** kappa, D ** kappa)`` for optimizer step ``step``, ``kappa = B / B_ref``, with the schedule on
        optimizer steps or (``time_unit="samples"``) on samples / ``B_ref``."""
        b, b_ref, n = self._batch_size, self.reference_batch_size, self.update_every
        assert b is not None and b_ref is not None
        if self.time_unit == "samples":
            t: int | float = _reference_steps((self.samples_seen or 0) + b, b_ref)
            total = None if self.total_steps is None else _reference_steps(self.total_steps * b, b_ref)
        else:
            t, total = step, self.total_steps
        d = _checked_decay(self.schedule(self.decay, t, total), self.schedule, step)
        if averaging and n > 1:
            dn = _checked_decay(self.schedule.interval_decay(self.decay, t, total, n), self.schedule, step, n)
        else:
            dn = d
        if b == b_ref:
            return d, dn
        kappa = b / b_ref
        return d**kappa, dn**kappa

    # ------------------------------------------------------------------ update
    def decay_at(self, step: int) -> float:
        """The schedule's decay for optimizer step ``step`` (1-based: the steps done, including that one),
        checked to lie in [0, 1].

        Example:
            >>> EMAState(nn.Linear(2, 2), decay=0.999, decay_type="threshold").decay_at(1) == 2 / 11
            True
        """
        return _checked_decay(self.schedule(self.decay, step, self.total_steps), self.schedule, step)

    @torch.no_grad()
    def update(self) -> float | None:
        """Account for one finished optimizer step and, every ``update_every`` steps, average.

        With ``t = self.step + 1`` (optimizer steps done, this one included: 1 at the first call),
        ``d = schedule(decay, t, total_steps)``; when ``t % N == 0`` (``N = update_every``),
        ``ema = ema * D + param * (1 - D)`` with ``D = d`` for ``N = 1``, else
        ``D = schedule.interval_decay(decay, t, total_steps, N)`` (``d**N`` by default). Afterwards
        ``self.step == t``. With ``reference_batch_size`` both become ``d ** kappa`` and ``D ** kappa``,
        ``kappa = batch_size / reference_batch_size`` (and with ``time_unit="samples"`` the schedule sees
        ``samples_seen / reference_batch_size`` instead of ``t``); ``samples_seen`` grows by ``batch_size``.

        Returns:
            ``d``, the decay per optimizer step for this step (``d ** kappa`` with a reference batch size);
            ``None`` when the accelerator reports that the optimizer skipped the step (fp16 overflow) or did not
            step (``sync_gradients`` False: a micro-batch inside ``accelerator.accumulate``, where a prepared
            optimizer's ``step()`` does nothing): such a call is neither counted nor averaged.

        Raises:
            ValueError: If the schedule gives a value outside [0, 1]; nothing is counted or averaged then.

        Example:
            >>> ema = EMAState(nn.Linear(2, 2), decay=0.5)
            >>> ema.update(), ema.step
            (0.5, 1)
        """
        if self._swapped:
            raise RuntimeError("EMAState.update() called inside average_parameters(): leave the block first")
        if self.accelerator is not None and (
            getattr(self.accelerator, "optimizer_step_was_skipped", False)
            # a micro-batch of `accelerator.accumulate`: the prepared optimizer did not step
            or not getattr(self.accelerator, "sync_gradients", True)
        ):
            return None
        self._check_bindings()
        if self._start_handle is not None:
            self._end_start_refresh()
        if self._frozen:
            self._report_unfrozen()
        step = self.step + 1
        n = self.update_every
        averaging = step % n == 0
        if self.reference_batch_size is not None:
            d, dn = self._scaled_decays(step, averaging)
        else:
            d = self.decay_at(step)
            if averaging and n > 1:
                dn = _checked_decay(
                    self.schedule.interval_decay(self.decay, step, self.total_steps, n), self.schedule, step, n
                )
            else:
                dn = d
        self.step = step
        if self.samples_seen is not None:
            self.samples_seen += self._batch_size
        self.last_decay = d
        if self._bias is not None and self._bias.due(step):
            self._take_theta0(step)
        if averaging:
            weight = 1.0 - dn
            self.last_applied_decay = dn
            if self._stream is not None:
                self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
                with torch.cuda.stream(self._stream):
                    self._apply(weight)
                self._event.record(self._stream)
            else:
                self._apply(weight)
            self.num_updates += 1
        return d

    def _take_theta0(self, step: int) -> None:
        """BEMA's ``theta_0``: the live weights now (once per run, at the schedule's start step)."""
        for e in self._primaries:
            if e.theta0 is not None:
                e.theta0.copy_(e.live)
        self._bias.taken_step = step

    def _report_unfrozen(self) -> None:
        """Warn once when a parameter frozen at construction (``trainable_only=True``) now requires grad: it is not
        averaged (the tracked set is fixed when the EMA is built), which would otherwise go unnoticed."""
        unfrozen = [n for n, p in self._frozen if p.requires_grad]
        if not unfrozen:
            return
        self._frozen = []  # once
        logger.warning(
            "trainable_only=True: %s now require grad but were frozen when the EMA was built, so the EMA does not "
            "average them (it keeps their values at construction). Build the EMAState after the last unfreezing, "
            "or use trainable_only=False.",
            summarize_names(unfrozen),
        )

    def skip_to(self, step: int) -> None:
        """Count ``step`` optimizer steps as already taken, without averaging (e.g. resuming from a checkpoint
        that has no saved EMA), so the schedule continues at the right step: the next :meth:`update` uses step
        ``step + 1``.

        Example:
            >>> ema = EMAState(nn.Linear(2, 2), decay=0.5, decay_type="threshold", update_every=2)
            >>> ema.skip_to(10); ema.step, ema.num_updates
            (10, 5)
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"`step` must be an integer >= 0, got {step!r}")
        step = int(step)
        self.step = step
        self.num_updates = step // self.update_every
        if self._batch_size is not None:  # as if every step had the current batch size
            self.samples_seen = step * self._batch_size

    def _apply(self, weight: float) -> None:
        self._flush_offload()
        self._avg_groups.lerp_(weight)
        for ema, live in self._copy_groups:
            torch._foreach_copy_(ema, live)
        if self._offload:
            torch._foreach_copy_(*self._offload_copy, non_blocking=True)
            self._offload_event.record()
            self._pending_offload = (weight, self._offload_event)

    def _flush_offload(self) -> None:
        """Finish a pending CPU-offloaded update: wait for its device-to-host copies, then average on the host."""
        if self._pending_offload is None:
            return
        weight, event = self._pending_offload
        self._pending_offload = None
        if event is not None:
            event.synchronize()
        self._offload_groups.lerp_(weight)

    def wait(self) -> None:
        """Make the EMA current: join a side-stream update and finish a pending offloaded one."""
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_event(self._event)
        self._flush_offload()

    # ------------------------------------------------------------------ swap / copy
    def _current_ema(self, e: _Entry) -> torch.Tensor:
        """The EMA value of ``e`` right now. While swapped, the model holds it (plus what the block wrote into the
        model, which swapping out keeps): the model's tensor itself after an XOR exchange, else the merge of the
        EMA and the model's values that swapping out will store (see :func:`_merge_into`)."""
        p = e.alias or e
        if not self._swapped:
            return p.ema
        if id(p) in self._xor_ids:
            return p.live
        merged = p.ema.clone()
        if p.theta0 is not None:  # the model holds BEMA: fold its writes back through the correction
            BiasCorrection.keep_writes_(merged, p.live, self._backup_of(p), p.theta0, self._swap_alpha)
            return merged
        _merge_into(merged, p.live)
        return merged

    def _backup_of(self, p: _Entry) -> torch.Tensor:
        """The training weights of ``p`` saved by the swap in progress."""
        return next(backup for e, backup in self._swap_ops if e is p)

    def _read_value(self, e: _Entry) -> torch.Tensor:
        """The EMA weights as readers get them: the EMA itself, or for a bias-corrected entry (BEMA)
        ``ema + alpha * (live - theta_0)`` formed now from the training weights (the live weights themselves before
        ``theta_0`` is taken)."""
        p = e.alias or e
        if p.theta0 is None:
            return self._current_ema(e)
        if self._swapped:
            return BiasCorrection.read(self._current_ema(e), self._backup_of(p), p.theta0, self._swap_alpha)
        return BiasCorrection.read(p.ema, p.live, p.theta0, self._read_alpha())

    def _swap_in(self) -> None:
        ops: list[tuple[_Entry, torch.Tensor | None]] = []
        alpha = self._swap_alpha = self._read_alpha()
        for e in self._primaries:
            if e.theta0 is not None:  # BEMA is formed from the live weights: back them up (no XOR exchange)
                backup = e.live.clone()
                if alpha is not None:
                    BiasCorrection.write_(e.live, e.ema, backup, e.theta0, alpha)
                ops.append((e, backup))
            elif e.ema.dtype == e.live.dtype and e.ema.device == e.live.device and e.live.numel():
                _xor_swap(e.ema, e.live)
                ops.append((e, None))
            else:
                ops.append((e, e.live.clone()))
                e.live.copy_(e.ema)
        self._swap_ops = ops
        self._xor_ids = {id(e) for e, backup in ops if backup is None}
        self._swapped = True

    def _swap_out(self) -> None:
        # Reverse order: tensors may overlap in memory, and each step must see what its swap-in left.
        for e, backup in reversed(self._swap_ops):
            if backup is None:
                _xor_swap(e.ema, e.live)  # the EMA takes the model's bits: writes made in between are kept
            elif e.theta0 is not None:
                BiasCorrection.keep_writes_(e.ema, e.live, backup, e.theta0, self._swap_alpha)
                e.live.copy_(backup)
            else:
                _merge_into(e.ema, e.live)
                e.live.copy_(backup)
        self._forget_swap()

    def _forget_swap(self) -> None:
        self._swap_ops, self._xor_ids, self._swapped = [], set(), False

    @torch.no_grad()
    def swap(self) -> None:
        """Put the EMA weights into the model, or, if they are in, put the training weights back (bitwise).

        Same-dtype tensors are exchanged in place by XOR of their bit patterns (no extra memory); when the EMA has
        another dtype or device than the parameter, the parameter is backed up and restored from the backup.
        Writes made to the model while the EMA is in (a train-mode forward updating BatchNorm statistics,
        ``update_bn``, an optimizer step) are kept in the EMA when swapping back; see :meth:`average_parameters`.
        Prefer :meth:`average_parameters`, which restores on exit even when its block raises.
        """
        self.wait()
        self._before_write()
        self._check_bindings()
        if not self._swapped:
            self._swap_in()
        else:
            self._swap_out()
        self._after_write()

    def _before_write(self, model: nn.Module | None = None) -> None:
        """Before writing the local tensors of ``model`` (default: the tracked one): FSDP2 modules resharded, so that
        their unsharded copies are dropped and the module holds its sharded parameters (see
        :func:`hf_ema.distributed.before_local_write`). Runs before anything looks at the model's parameters."""
        dist_utils.before_local_write(self.model if model is None else model)

    def _after_write(self, sources: list[torch.Tensor] | None = None) -> None:
        """After writing local tensors (default: the tracked ones): the full copies a forward reads (gathered ZeRO-3
        parameters) rebuilt from them (see :func:`hf_ema.distributed.after_local_write`); a collective on ZeRO-3."""
        dist_utils.after_local_write([e.source for e in self._entries] if sources is None else sources)

    @contextlib.contextmanager
    def average_parameters(self) -> Iterator[nn.Module]:
        """Context manager: the model holds the EMA weights inside the block, its own weights (bitwise) after.

        Writes to the model inside the block are kept in the EMA: the EMA afterwards holds what the model held at
        the end of the block, e.g. BatchNorm statistics recomputed for the EMA weights by a train-mode forward
        (precise-BN). Where the EMA has a higher precision than the model (fp32 EMA of bf16 weights), an element
        the block did not change keeps its full-precision EMA value, and a changed one takes the model's value
        exactly. :meth:`copy_to` inside the block keeps the EMA weights in the model for good: the block then
        restores nothing on exit.

        Example:
            >>> model = nn.Linear(2, 2)
            >>> ema = EMAState(model, decay=0.5)
            >>> with ema.average_parameters() as m:
            ...     _ = m(torch.ones(1, 2))
        """
        if self._swapped:
            raise RuntimeError("average_parameters() blocks cannot be nested")
        self.swap()
        try:
            yield self.model
        finally:
            if self._swapped:  # not if copy_to() kept the EMA weights in the model
                self.swap()

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the EMA weights into ``model`` (default: the tracked model) for good.

        Inside :meth:`average_parameters` (or after :meth:`swap`), ``copy_to()`` keeps the EMA weights the model
        holds, with what the block wrote into them, as both the model's weights and the EMA; the training weights
        are dropped, and leaving the block restores nothing. ``copy_to(other)`` there writes the EMA as it stands
        (the same values) into ``other`` and leaves the swap as it is.

        Args:
            model: Another module with the same state-dict names (e.g. a fresh copy for export); its tensors must
                have the tracked shapes (local shapes on sharded models).

        Example:
            >>> model, export = nn.Linear(2, 2), nn.Linear(2, 2)
            >>> ema = EMAState(model, decay=0.5)
            >>> ema.copy_to(export)
            >>> bool(torch.equal(export.weight, model.weight))
            True
        """
        self.wait()
        self._check_bindings()
        if model is not None and dist_utils.unwrap_model(model) is self.model:
            model = None
        if model is None:
            if self._swapped:  # the model already holds the EMA: keep it there, forget the training weights
                for e, backup in self._swap_ops:
                    if backup is None:
                        e.ema.copy_(e.live)
                    elif e.theta0 is not None:
                        BiasCorrection.keep_writes_(e.ema, e.live, backup, e.theta0, self._swap_alpha)
                    else:
                        _merge_into(e.ema, e.live)
                self._forget_swap()
                return
            self._before_write()
            for e in self._primaries:
                e.live.copy_(e.ema if e.theta0 is None else self._read_value(e))
            self._after_write()
            return
        target = dist_utils.unwrap_model(model)
        self._before_write(target)
        tensors = dict(target.named_parameters())
        tensors.update(_persistent_buffers(target))
        missing = [e.name for e in self._entries if e.name not in tensors]
        if missing:
            raise ValueError(
                f"copy_to: the target model lacks tracked tensor(s): {summarize_names(missing)}"
            )
        for e in self._entries:
            dist_utils.local_tensor(tensors[e.name]).copy_(self._read_value(e))
        self._after_write([tensors[e.name] for e in self._entries])

    # ------------------------------------------------------------------ state dict
    def _meta(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "library": "hf_ema",
            "library_version": _library_version(),
            "step": self.step,
            "num_updates": self.num_updates,
            "last_decay": self.last_decay,
            "decay": self.decay,
            "decay_type": self.decay_type,
            "schedule_kwargs": _jsonable(self.schedule.config()),
            "total_steps": self.total_steps,
            "update_every": self.update_every,
            "dtype": str(self.dtype).replace("torch.", "") if self.dtype is not None else None,
            "buffers": self.buffers,
            "trainable_only": self.trainable_only,
            "names": list(self._names),
            **self._batch_meta(),
            **({"bias_correction": self._bias.meta()} if self._bias is not None else {}),
        }

    def _batch_meta(self) -> dict[str, Any]:
        return {
            "batch_size": self._batch_size,
            "reference_batch_size": self.reference_batch_size,
            "time_unit": self.time_unit,
            "samples_seen": self.samples_seen,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-exactly: ``{"ema": {name: tensor}, "meta": {...}}``.

        ``ema`` holds this process's EMA tensors (local shards on sharded models) by reference; ``meta`` is
        JSON-serialisable (step, schedule name and arguments, options). A bias-corrected EMA (BEMA) also has
        ``theta0`` (``theta_0`` of its parameters); its ``ema`` is the uncorrected EMA.
        """
        self.wait()
        self._check_bindings()
        out = {"ema": {e.name: self._current_ema(e) for e in self._entries}, "meta": self._meta()}
        if self._bias is not None:
            out["theta0"] = {e.name: self._theta0(e) for e in self._entries if self._theta0(e) is not None}
        return out

    @staticmethod
    def _theta0(e: _Entry) -> torch.Tensor | None:
        return (e.alias or e).theta0

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore from :meth:`state_dict` output (tensors shaped like this process's EMA tensors).

        The state (tensors, step, number of averages, last decay) comes from ``state_dict``; the settings (decay,
        schedule, update_every, ...) stay this EMAState's, with one warning listing those that differ.

        Raises:
            ValueError: If names or shapes differ from the tracked ones (the message lists them), or the state is
                malformed.
        """
        if not isinstance(state_dict, Mapping) or "ema" not in state_dict or "meta" not in state_dict:
            raise ValueError("EMAState.load_state_dict expects a mapping with 'ema' and 'meta' keys")
        if not self._swapped:
            self._check_bindings()
        self._load(state_dict["ema"], state_dict["meta"], strict=strict, theta0=state_dict.get("theta0"))

    def _check_names_shapes(self, shapes: Mapping[str, tuple[int, ...]], full: bool, strict: bool) -> None:
        names = set(self._names)
        missing = sorted(names - set(shapes)) if strict else []
        unexpected = sorted(set(shapes) - names)
        wrong = []
        for e in self._entries:
            if e.name in shapes:
                want = tuple(dist_utils.full_shape(e.source)) if full else tuple(e.ema.shape)
                got = tuple(shapes[e.name])
                if want != got:
                    wrong.append((e.name, got, want))
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"missing from the saved EMA: {summarize_names(missing)}")
            if unexpected:
                parts.append(f"not in the model: {summarize_names(unexpected)}")
            if wrong:
                name, got, want = wrong[0]
                parts.append(
                    f"other shapes: {summarize_names(w[0] for w in wrong)} "
                    f"(e.g. {name!r}: saved {got} vs model {want})"
                )
            raise ValueError("The saved EMA does not match the model: " + "; ".join(parts))

    def _load(
        self,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
        strict: bool,
        source: str = "the state dict's 'meta'",
        theta0: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Check this process's EMA tensors and the settings completely, then apply them."""
        if self._swapped:
            raise RuntimeError("Cannot load an EMA state inside average_parameters()")
        self.wait()
        self._check_names_shapes({k: tuple(v.shape) for k, v in tensors.items()}, full=False, strict=strict)
        taken = self._check_bias_state(meta, theta0)
        self._load_meta(meta, source)
        for e in self._entries:
            if e.name in tensors:
                e.ema.copy_(tensors[e.name])
        self._end_start_refresh()  # a loaded EMA is never replaced by the weights
        if self._bias is not None:
            self._bias = BiasCorrection(self.schedule, self.update_every)  # the saved schedule's arguments
            self._bias.taken_step = taken
            if taken is not None:
                for e in self._primaries:
                    if e.theta0 is not None:
                        e.theta0.copy_(theta0[e.name])

    def _check_bias_state(
        self, meta: Mapping[str, Any], theta0: Mapping[str, torch.Tensor] | None
    ) -> int | None:
        """Validate a saved bias-correction state (BEMA) against this EMA; return the saved ``theta0_step``."""
        taken = self._saved_theta0_step(meta)
        if taken is not None:
            theta0 = theta0 or {}
            need = {e.name: tuple(e.theta0.shape) for e in self._primaries if e.theta0 is not None}
            bad = [n for n, shape in need.items() if n not in theta0 or tuple(theta0[n].shape) != shape]
            if bad:
                raise ValueError(
                    "The saved BEMA state lacks theta_0 (the weights when averaging started) of the right shape "
                    f"for {len(bad)} tensor(s): {bad[:10]}"
                )
        return taken

    def _saved_theta0_step(self, meta: Mapping[str, Any]) -> int | None:
        """The saved ``bias_correction.theta0_step`` (None: not taken, or no bias correction); a ValueError when
        the saved EMA and this one differ in having a bias correction."""
        saved = meta.get("bias_correction")
        if (saved is not None) != (self._bias is not None):
            raise ValueError(
                f"The saved EMA (decay_type={meta.get('decay_type')!r}) is {'' if saved is not None else 'not '}"
                f"bias-corrected and this one (decay_type={self.decay_type!r}) is "
                f"{'' if self._bias is not None else 'not'}: its tensors mean something else here. Build the EMA "
                "with the saved decay_type (EMAState.load(directory, model) does)."
            )
        if saved is None:
            return None
        taken = saved.get("theta0_step") if isinstance(saved, Mapping) else saved
        if taken is not None and (isinstance(taken, bool) or not isinstance(taken, int) or taken < 0):
            raise ValueError(
                f"Malformed EMA meta: bias_correction.theta0_step must be null or an integer >= 0, got {taken!r}"
            )
        return taken

    def _load_meta(self, meta: Mapping[str, Any], source: str = "the state dict's 'meta'") -> None:
        """Take the saved *state* and keep this EMAState's *settings* (a refused load changes nothing).

        The rule, for every load into an existing EMAState (``ema.load(dir)``, ``load_state_dict``, Accelerate's
        ``load_state``, the Trainer callback's resume): the object the user built decides the settings (decay,
        schedule and its arguments, update_every, dtype, buffers, and total_steps when it has one); the saved
        state gives the EMA tensors, ``step``, ``num_updates`` and the last decay, so the schedule continues at
        the saved step. Settings that differ from the saved ones are listed in one warning (a schedule name that
        is not registered here is only listed: it is not used). ``EMAState.load(dir, model)`` builds an
        EMAState from the saved settings instead.
        """
        check_ema_meta(meta, source)
        if "step" not in meta:
            raise ValueError(f"Invalid EMA state in {source}: 'step' is missing")
        step = int(meta["step"])
        num_updates = int(meta.get("num_updates", step // int(meta.get("update_every", self.update_every))))
        total_steps = self.total_steps if self.total_steps is not None else meta.get("total_steps")
        current = {
            "decay": self.decay,
            "decay_type": self.decay_type,
            "schedule_kwargs": _jsonable(self.schedule.config()),
            "update_every": self.update_every,
            "total_steps": total_steps,
            "dtype": str(self.dtype).replace("torch.", "") if self.dtype is not None else None,
            "buffers": self.buffers,
            "reference_batch_size": self.reference_batch_size,
            "time_unit": self.time_unit,
        }
        batch = self._read_batch_meta(meta, step, self.decay, self.update_every)
        differ = [f"{k} {meta[k]!r} -> {v!r}" for k, v in current.items() if k in meta and meta[k] != v]
        if differ:
            logger.warning(
                "The EMA settings differ from those saved in %s (saved -> current): %s. Continuing from the saved "
                "state (step %d) with the current settings; EMAState.load(dir, model) would use the saved ones.",
                source,
                ", ".join(differ),
                step,
            )
        self.step, self.num_updates, self.last_decay = step, num_updates, meta.get("last_decay")
        self.total_steps = total_steps
        self.reference_batch_size, self.time_unit, self._batch_size, self.samples_seen = batch

    def _read_batch_meta(
        self, meta: Mapping[str, Any], step: int, decay: float, update_every: int
    ) -> tuple[int | None, str, int | None, int | None]:
        """Check the saved batch settings against this run's (nothing is changed here); log the rescaling.

        Returns ``(reference_batch_size, time_unit, batch_size, samples_seen)`` to continue with: this EMA's
        reference batch and time unit (the saved ones are checked, and listed by :meth:`_load_meta` when they
        differ), this run's batch size (unknown: the saved one), and the saved sample count (files without it: ``step`` x the saved or current batch size).

        Raises:
            ValueError: If the settings are malformed, or ``strict_batch_size`` and the batch size differs.
        """
        try:
            saved_b = _check_batch_size("batch_size", meta.get("batch_size"))
            if "reference_batch_size" in meta:  # checked, not used: this EMA's own settings win (see _load_meta)
                saved_ref = _check_batch_size("reference_batch_size", meta["reference_batch_size"])
                _check_time_unit(meta.get("time_unit") or "steps", saved_ref)
            ref, unit = self.reference_batch_size, self.time_unit
            samples = meta.get("samples_seen")
            if samples is not None and (
                isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or samples < 0
            ):
                raise ValueError(f"`samples_seen` must be an integer >= 0 or None, got {samples!r}")
        except (TypeError, ValueError) as e:
            raise ValueError(f"Malformed EMA meta (batch-size settings): {e}") from e
        now = self._batch_size if self._batch_size is not None else saved_b
        if self.strict_batch_size and None not in (saved_b, now) and saved_b != now:
            raise ValueError(
                f"strict_batch_size=True: the EMA was saved with effective batch size {saved_b} and this run has "
                f"{now} (samples per optimizer step); use the same batch size, or strict_batch_size=False to "
                "rescale the decay"
            )
        if samples is None and (saved_b or now) is not None:
            samples = step * (saved_b or now)
            if unit == "samples":
                logger.warning(
                    "The saved EMA state has no sample count: assuming %d samples (%d steps x batch size %d).",
                    samples,
                    step,
                    saved_b or now,
                )
        if saved_b is not None and now is not None and saved_b != now:
            if ref is not None:
                logger.warning(
                    "EMA: effective batch %d (saved) -> %d (now): per-step decay rescaled to d**(%d/%d) = d**%.6g, "
                    "so the horizon stays ~%.6g samples (at decay=%s; it was ~%.6g).",
                    saved_b,
                    now,
                    now,
                    ref,
                    now / ref,
                    _samples_horizon(decay, now, ref, update_every),
                    decay,
                    _samples_horizon(decay, saved_b, ref, update_every),
                )
            else:
                logger.info(
                    "EMA: effective batch %d (saved) -> %d (now): without reference_batch_size the decay per "
                    "optimizer step is unchanged, so the EMA's horizon in samples changes by %.6gx (pass "
                    "reference_batch_size to keep it).",
                    saved_b,
                    now,
                    now / saved_b,
                )
        return ref, unit, now, samples

    # ------------------------------------------------------------------ full weights and files
    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA as a full state dict under the model's own names (what ``ema_net/model.safetensors`` holds).

        Untracked persistent buffers (``buffers="ignore"``) are taken from the model so that the result loads as
        a complete model; with ``trainable_only=True`` only the tracked tensors are returned. On sharded models
        the shards are gathered (a collective: call it on every rank); tensors are on the CPU. With several
        processes only the main process keeps them (the others get ``{}``), so no rank but the main one ever
        holds a full copy of a sharded EMA, and that one tensor by tensor as they arrive. On an unsharded CPU
        model the tensors share storage with the EMA (no copy): clone them to keep a snapshot. A bias-corrected EMA
        (BEMA) returns ``ema + alpha * (live - theta_0)`` for its parameters, formed now.
        """
        self.wait()
        self._check_bindings()
        pairs = [(e.name, e.source, self._read_value(e)) for e in self._entries]
        if not self.trainable_only and self.buffers == "ignore":
            pairs += [
                (name, b, dist_utils.local_tensor(b))
                for name, b in _persistent_buffers(self.model)
                if name not in self._by_name
            ]
        return self._gathered(pairs)

    def _gathered(self, pairs: list[tuple[str, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Full CPU tensors of ``(name, source, local value)`` on the main process (a gather for sharded ones, which
        every rank joins); ``{}`` on the other processes."""
        keep = dist_utils.is_main_process()
        out: dict[str, torch.Tensor] = {}
        for name, source, local in pairs:
            if keep:
                out[name] = dist_utils.full_tensor(source, local)
            elif dist_utils.is_sharded(source):  # take part in the gather; the result is the main process's
                dist_utils.full_tensor(source, local, to_cpu=False)
        return out

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/ema_net/`` (``model.safetensors``, ``ema_state.json``, ``config.json``) atomically;
        a named EMA writes ``directory/ema_net-<name>/``.

        For a ``peft.PeftModel`` it also holds the EMA adapter as PEFT writes one (``adapter_model.safetensors``,
        ``adapter_config.json``: see :mod:`hf_ema.adapters`). On several processes every rank must call it (shards
        are gathered); only the main process writes.

        Example:
            >>> import tempfile
            >>> ema = EMAState(nn.Linear(2, 2), decay=0.5)
            >>> ema.save(tempfile.mkdtemp()).name
            'ema_net'
        """
        tensors = self.ema_state_dict()
        extra = self._bias_files()
        dirname = ema_dirname(self.name)
        path = Path(directory) / dirname
        if dist_utils.is_main_process():
            from .adapters import peft_adapter_files

            files = {**peft_adapter_files(self.model, tensors), **extra}
            path = save_ema_net(
                directory,
                tensors,
                {**self._meta(), "name": self.name},
                getattr(self.model, "config", None),
                files=files,
                dirname=dirname,
            )
        return path

    def _bias_files(self) -> dict[str, dict[str, torch.Tensor]]:
        """A bias-corrected EMA's own state for ``ema_net``, beside the corrected weights of ``model.safetensors``:
        the uncorrected EMA of its parameters and, once taken, their ``theta_0`` (gathered: every rank calls it)."""
        if self._bias is None:
            return {}
        corrected = [e for e in self._entries if self._theta0(e) is not None]
        files = {BEMA_EMA_NAME: self._gathered([(e.name, e.source, self._current_ema(e)) for e in corrected])}
        if self._bias.taken_step is not None:
            files[BEMA_THETA0_NAME] = self._gathered([(e.name, e.source, self._theta0(e)) for e in corrected])
        return files

    def _read_bias_files(self, reader: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """This process's parts of the uncorrected EMA and ``theta_0`` of a bias-corrected EMA's parameters, read
        from the files beside ``reader``'s ``model.safetensors`` (``({}, None)`` without bias correction)."""
        if self._bias is None:
            return {}, None
        taken = self._saved_theta0_step(reader.meta)
        corrected = [e for e in self._entries if self._theta0(e) is not None]
        names = {e.name for e in corrected}
        out: list[dict[str, torch.Tensor]] = []
        for fname in (BEMA_EMA_NAME, BEMA_THETA0_NAME) if taken is not None else (BEMA_EMA_NAME,):
            with open_ema_file(reader.path, fname, reader.meta) as r:
                lacking = sorted(names - set(r.shapes))
                if lacking:
                    raise EMAFileError(
                        f"{str(r.path / fname)!r} lacks {len(lacking)} tensor(s) of the BEMA state: {lacking[:10]}"
                    )
                self._check_names_shapes(
                    {k: v for k, v in r.shapes.items() if k in names}, full=True, strict=False
                )
                out.append(
                    {
                        e.name: dist_utils.read_local(
                            e.source, r.shapes[e.name], functools.partial(r.read, e.name)
                        )
                        for e in corrected
                    }
                )
        return out[0], (out[1] if len(out) > 1 else None)

    def _load_dir(self, directory: str | os.PathLike) -> EMAState:
        """Restore the saved state into this EMAState, keeping its settings (see :meth:`_load_meta`)."""
        if self._swapped:
            raise RuntimeError("Cannot load an EMA state inside average_parameters()")
        self._check_bindings()  # the file is read by the layout of the model's tensors as they are now
        # `ema_net` also holds the model's untracked persistent buffers (buffers="ignore"), so that it loads as a
        # complete model; they are the model's own values, not EMA state, and are not read back.
        untracked = {name for name, _ in _persistent_buffers(self.model)} - set(self._by_name)
        with open_ema_net(directory, self.name) as reader:
            shapes = {k: v for k, v in reader.shapes.items() if k not in untracked}
            try:
                # Names and full shapes from the file's header first; then each rank reads only its own part
                # (its FSDP2 shard / ZeRO-3 partition rows), so no rank holds the whole model's EMA in memory.
                self._check_names_shapes(shapes, full=True, strict=True)
                raw, theta0 = self._read_bias_files(reader)  # BEMA: its uncorrected EMA and theta_0
                local = {
                    e.name: dist_utils.read_local(
                        e.source, shapes[e.name], functools.partial(reader.read, e.name)
                    )
                    for e in self._entries
                    if e.name not in raw
                }
                local.update(raw)
                source = repr(str(reader.path / STATE_NAME))
                self._load(local, reader.meta, strict=True, source=source, theta0=theta0)
            except EMAFileError:
                raise
            except ValueError as e:
                raise EMAFileError(f"Cannot load the EMA from {str(reader.path)!r}: {e}") from e
        return self

    @classmethod
    def _from_dir(cls, directory: str | os.PathLike, model: nn.Module, **overrides: Any) -> EMAState:
        """An EMAState built with the saved settings, each overridable by keyword, then loaded."""
        with open_ema_net(directory, overrides.get("name")) as reader:  # the JSON is checked here (the error names the file)
            meta, state_file = reader.meta, str(reader.path / STATE_NAME)
        kwargs: dict[str, Any] = {
            "name": meta.get("name"),
            "decay": meta.get("decay", 0.9999),
            "decay_type": meta.get("decay_type", "constant"),
            "total_steps": meta.get("total_steps"),
            "update_every": meta.get("update_every", 1),
            "dtype": meta.get("dtype", "float32"),
            "buffers": meta.get("buffers", "average"),
            "trainable_only": meta.get("trainable_only", False),
        }
        if "decay_type" not in overrides:  # the saved arguments belong to the saved schedule
            kwargs.update(meta.get("schedule_kwargs", {}))
        kwargs["reference_batch_size"] = meta.get("reference_batch_size")
        kwargs["time_unit"] = meta.get("time_unit") or "steps"
        if "batch_size" not in overrides and "accelerator" not in overrides:  # else: this run's batch size
            kwargs["batch_size"] = meta.get("batch_size")
        kwargs.update(overrides)
        try:
            ema = cls(model, **kwargs)
        except (ValueError, TypeError) as e:
            hint = ""
            if isinstance(kwargs["decay_type"], str) and kwargs["decay_type"] not in EMA_DECAY_FUNCTIONS:
                hint = (
                    "; register that schedule in hf_ema.EMA_DECAY_FUNCTIONS before loading, or pass decay_type=... "
                    "to EMAState.load to continue with another one"
                )
            given = f" and the arguments {sorted(overrides)}" if overrides else ""
            raise EMAFileError(
                f"Cannot build the EMA from the settings saved in {state_file!r}{given}: {e}{hint}"
            ) from e
        return ema._load_dir(directory)

    load = None  # replaced below by a method usable on the class and on instances

    def __repr__(self) -> str:
        return (
            f"EMAState(decay={self.decay}, decay_type={self.decay_type!r}, step={self.step}, "
            f"tensors={len(self._entries)}, bytes={self.num_bytes()})"
        )


class _InstanceOrClassLoad:
    """``ema.load(dir)`` restores this EMA; ``EMAState.load(dir, model, **overrides)`` builds one."""

    def __get__(self, obj: EMAState | None, objtype: type | None = None) -> Any:
        if obj is None:

            def load(directory: str | os.PathLike, model: nn.Module, **overrides: Any) -> EMAState:
                """Build an :class:`EMAState` for ``model`` from ``directory/ema_net`` (``ema_net-<name>`` with
                ``name=...``): the settings saved in its
                ``ema_state.json`` (each overridable by keyword, e.g. ``device="cpu"``), then its state."""
                return objtype._from_dir(directory, model, **overrides)

            return load

        def load_into(directory: str | os.PathLike) -> EMAState:
            """Restore this EMA's state (tensors, step) from ``directory/ema_net`` (``ema_net-<name>`` for a
            named EMA, or an EMA folder itself), keeping its own settings; a difference from the saved ones is logged once."""
            return obj._load_dir(directory)

        return load_into


EMAState.load = _InstanceOrClassLoad()  # type: ignore[assignment]


class _AveragingGroups:
    """``ema <- lerp(ema, src, weight)`` over many (ema, src) pairs, planned once, run with foreach ops.

    Pairs are grouped by (device, dtype) of both sides: same-dtype groups take one ``torch._foreach_lerp_``;
    low-precision sources with a higher-precision EMA on the CPU go through a small reusable scratch buffer (see
    :func:`_plan_batches`); any other mix takes a promoting ``_foreach_mul_`` + ``_foreach_add_`` (on CUDA the cast
    happens inside the kernel).
    """

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for ema, src in pairs:
            lists = groups.setdefault((ema.device, ema.dtype, src.device, src.dtype), ([], []))
            lists[0].append(ema)
            lists[1].append(src)
        self.same: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self.batched: list[tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] = []
        self.mixed: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        for (ema_dev, ema_dtype, src_dev, src_dtype), (emas, srcs) in groups.items():
            if ema_dev == src_dev and ema_dtype == src_dtype:
                self.same.append((emas, srcs))
            elif ema_dev == src_dev and ema_dev.type == "cpu" and all(t.is_contiguous() for t in srcs):
                self.batched.extend(_plan_batches(emas, srcs, _SCRATCH_ELEMS))
            else:
                self.mixed.append((emas, srcs))

    def lerp_(self, weight: float) -> None:
        for emas, srcs in self.same:
            torch._foreach_lerp_(emas, srcs, weight)
        for emas, srcs, scratch in self.batched:
            # Widen a batch of parameter slices into the scratch, then one exact lerp: a single pass over the EMA.
            torch._foreach_copy_(scratch, srcs)
            torch._foreach_lerp_(emas, scratch, weight)
        for emas, srcs in self.mixed:
            torch._foreach_mul_(emas, 1.0 - weight)
            torch._foreach_add_(emas, srcs, alpha=weight)


#: Elements of the fp32 scratch buffer used to widen bf16/fp16 parameters on the CPU (4 MiB; 2**18..2**22 measured,
#: see benchmarks/). Big enough to amortise the per-call overhead, small enough to stay in cache.
_SCRATCH_ELEMS = 1 << 20


def _plan_batches(
    emas: list[torch.Tensor], lives: list[torch.Tensor], elems: int
) -> list[tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]]:
    """Cut EMA/parameter pairs into flat slices packed in batches of at most ``elems`` elements.

    Each batch is ``(ema_slices, live_slices, scratch_slices)``; all scratch slices are views into one buffer of
    ``min(elems, total)`` elements of the EMA's dtype, shared by all batches (batches run one after the other).
    """
    total = sum(t.numel() for t in emas)
    scratch = torch.empty(min(elems, max(total, 1)), dtype=emas[0].dtype, device=emas[0].device)
    batches: list[tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] = []
    cur: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] = ([], [], [])
    used = 0
    for ema, live in zip(emas, lives, strict=True):
        ef, lf = ema.view(-1), live.view(-1)
        start, n = 0, ef.numel()
        while start < n:
            if used == scratch.numel():
                batches.append(cur)
                cur, used = ([], [], []), 0
            m = min(scratch.numel() - used, n - start)
            cur[0].append(ef[start : start + m])
            cur[1].append(lf[start : start + m])
            cur[2].append(scratch[used : used + m])
            used += m
            start += m
    if cur[0]:
        batches.append(cur)
    return batches


def _same_device(wanted: torch.device, actual: torch.device) -> bool:
    """``torch.device("cuda")`` names the current CUDA device, so it matches ``cuda:<current>``."""
    if wanted.type != actual.type:
        return False
    if wanted.index is None and actual.type == "cuda":
        return actual.index == torch.cuda.current_device()
    return wanted.index is None or wanted.index == actual.index


def _xor_swap(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchange the contents of two same-dtype tensors in place, bit-exactly, without a temporary.

    Reinterpreting as a same-size integer dtype works for any strides, so non-contiguous tensors (a transposed
    parameter) take the same path. ``a`` and ``b`` must not overlap in memory.
    """
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    x, y = a.view(bits), b.view(bits)
    x.bitwise_xor_(y)
    y.bitwise_xor_(x)
    x.bitwise_xor_(y)


def _merge_into(exact: torch.Tensor, model: torch.Tensor) -> None:
    """``exact <- the model's values``, keeping ``exact``'s precision where the model holds it unchanged.

    Same dtype: a plain copy. ``model`` of lower precision (a bf16 parameter of an fp32 EMA): an element equal to
    ``exact`` rounded to ``model.dtype`` (what swapping in wrote, or would have written) is left as it is, any
    other element takes the model's value, exactly (widening is exact). So writing back loses no EMA precision
    where nothing was written, needs no host-device sync, and keeps every write.
    """
    cur = model if model.device == exact.device else model.to(exact.device)
    if cur.dtype == exact.dtype:
        exact.copy_(cur)
        return
    unchanged = cur == exact.to(cur.dtype)
    torch.where(unchanged, exact, cur.to(exact.dtype), out=exact)


def _dtensor_layout(t: torch.Tensor) -> Any:
    """The mesh and placements of a ``DTensor`` (None for other tensors)."""
    return (t.device_mesh, tuple(t.placements)) if dist_utils.is_dtensor(t) else None


def _describe(t: torch.Tensor) -> str:
    return f"{t.device} {str(t.dtype).replace('torch.', '')}"


_data_ptr = torch.Tensor.data_ptr


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)
