"""The EMA engine: shadow tensors, update, swap, copy, state dict and files. It knows nothing of Trainer.

Math. At creation the EMA is a copy of the model's weights, ``ema_0 = theta_0``. After the optimizer step with
0-based index ``t`` the schedule gives ``d_t = schedule(decay, t, total_steps)`` and, with ``N = update_every``,
on every N-th step (``(t + 1) % N == 0``)::

    ema <- ema * d_t**N + theta_t * (1 - d_t**N)        (= lerp(ema, theta_t, 1 - d_t**N))

Raising the decay to the N-th power keeps the averaging horizon, measured in optimizer steps, the same as with
``N = 1``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
import os
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed as dist_utils
from .io import EMAFileError, load_ema_meta, open_ema_net, save_ema_net
from .schedules import IDecayFunction, build_schedule

__all__ = ["EMAState"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_BUFFER_MODES = ("average", "copy", "ignore")


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


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Named persistent buffers (those in ``state_dict``), each object once."""
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        non_persistent = getattr(mod, "_non_persistent_buffers_set", set())
        for b_name, buf in mod._buffers.items():
            if buf is None or b_name in non_persistent or id(buf) in seen:
                continue
            seen.add(id(buf))
            yield (f"{mod_name}.{b_name}" if mod_name else b_name), buf


class EMAState:
    """Exponential Moving Average of a model's weights.

    The EMA starts as a copy of the weights; after each optimizer step, :meth:`update` does
    ``ema = ema * d + param * (1 - d)`` with ``d`` from the decay schedule (see :mod:`hf_ema.schedules`).
    Averaging runs as one ``torch._foreach_*`` call per (device, dtype) group over cached tensor lists, with no
    host-device synchronisation. On sharded models (FSDP2, ZeRO-3) each process averages only its own shard.

    Args:
        model: The model (wrapped or not: DDP, ``torch.compile`` and Accelerate wrappers are removed).
        decay: Maximum decay, strictly in (0, 1).
        decay_type: ``"constant"``, ``"threshold"``, ``"exp"``, a name registered in ``EMA_DECAY_FUNCTIONS``, or
            an :class:`~hf_ema.schedules.IDecayFunction` instance.
        beta: ``exp`` schedule sharpness.
        total_steps: Planned number of optimizer steps (required by ``exp``).
        update_every: Average on every N-th optimizer step only, with the decay raised to the N-th power.
        dtype: Precision of the EMA for floating-point parameters (fp32 by default, also for bf16/fp16 models;
            ``None`` keeps each parameter's dtype). fp64 parameters keep fp64.
        buffers: Floating-point buffers are ``"average"``-d (as SuperGradients does), ``"copy"``-ed, or
            ``"ignore"``-d. Integer buffers (e.g. ``num_batches_tracked``) are always copied, never averaged.
        trainable_only: Track only parameters with ``requires_grad`` (e.g. LoRA adapters), and no buffers.
        device: Keep the EMA on this device (e.g. ``"cpu"`` to offload); default: next to each parameter.
        accelerator: An ``accelerate.Accelerator``: used to unwrap the model, to skip optimizer steps it reports
            as skipped (fp16 overflow), and to save/load the EMA with ``save_state`` / ``load_state``.
        side_stream: On CUDA, run the update on a side stream; it is joined before the next optimizer step
            and before the EMA is read.
        **schedule_kwargs: Passed to the schedule's constructor, so a SuperGradients ``ema_params`` dict works.

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
        **schedule_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
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
        try:
            self.device = torch.device(device) if device is not None else None
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"`device` must be a torch device or None, got {device!r}") from e
        self.schedule_kwargs = {"beta": beta, **schedule_kwargs}
        self.decay_type, self.schedule = build_schedule(decay_type, **self.schedule_kwargs)
        self._check_schedule_needs()

        self.accelerator = accelerator
        self.model = dist_utils.unwrap_model(model, accelerator)
        self.step = 0
        self.num_updates = 0
        self.last_decay: float | None = None
        self._swapped = False
        self._xor_swapped: list[_Entry] = []
        self._xor_ids: set[int] = set()
        self._backups: list[tuple[_Entry, torch.Tensor]] = []
        self._pending_offload: tuple[float, Any] | None = None
        self.side_stream = bool(side_stream)
        self._stream: Any = None
        self._event: Any = None
        self._hook_handle: Any = None

        self._entries = self._collect_entries()
        if not self._entries:
            raise ValueError(
                "The model has nothing to average: no floating-point parameters"
                + (" with requires_grad=True (trainable_only=True)" if self.trainable_only else "")
            )
        self._build_groups()
        self._setup_side_stream()
        if accelerator is not None and hasattr(accelerator, "register_save_state_pre_hook"):
            from .accelerate_hooks import register_with_accelerator

            register_with_accelerator(self, accelerator)

    # ------------------------------------------------------------------ set-up
    def _check_schedule_needs(self) -> None:
        if getattr(self.schedule, "requires_total_steps", False) and self.total_steps is None:
            raise ValueError(
                f"decay_type={self.decay_type!r} needs `total_steps` (the planned number of optimizer steps); "
                "pass total_steps=... (the Trainer callback sets it from max_steps)"
            )

    def _ema_dtype(self, t: torch.Tensor) -> torch.dtype:
        if self.dtype is None or t.dtype == torch.float64:
            return t.dtype
        return self.dtype

    def _collect_entries(self) -> list[_Entry]:
        entries: list[_Entry] = []
        for name, p in self.model.named_parameters():
            if not p.is_floating_point() or (self.trainable_only and not p.requires_grad):
                continue
            entries.append(self._make_entry(name, "param", "average", p))
        if not self.trainable_only:
            for name, b in _persistent_buffers(self.model):
                if not b.is_floating_point():
                    entries.append(self._make_entry(name, "buffer", "copy", b))
                elif self.buffers != "ignore":
                    entries.append(self._make_entry(name, "buffer", self.buffers, b))
        return entries

    def _make_entry(self, name: str, kind: str, mode: str, source: torch.Tensor) -> _Entry:
        live = dist_utils.local_tensor(source)
        dtype = self._ema_dtype(live) if mode == "average" else live.dtype
        device = live.device if self.device is None or _same_device(self.device, live.device) else self.device
        if mode == "copy":  # small buffers: copied beside their tensor, never a blocking cross-device copy
            device = live.device
        if device != live.device and device.type != "cpu":
            raise ValueError(
                f"`device`={str(device)!r}: the EMA can live next to each parameter (device=None) or in host memory "
                f"(device='cpu'), but {name!r} is on {live.device}"
            )
        with torch.no_grad():
            ema = torch.empty(live.shape, dtype=dtype, device=device)
            ema.copy_(live)
        staging = None
        if device != live.device:  # (only a host EMA of a device tensor gets here)
            staging = torch.empty(
                live.shape, dtype=live.dtype, device="cpu", pin_memory=torch.cuda.is_available()
            )
        return _Entry(name, kind, mode, source, live, ema, staging)

    def _build_groups(self) -> None:
        """Cache the tensor lists that :meth:`update` works on, one group per (device, dtypes)."""
        inline = [(e.ema, e.live) for e in self._entries if e.mode == "average" and e.staging is None]
        # CPU offload: averaged on the host from a pinned staged copy of the parameter, see _flush_offload.
        self._offload = [e for e in self._entries if e.staging is not None]
        self._avg_groups = _AveragingGroups(inline)
        self._offload_groups = _AveragingGroups([(e.ema, e.staging) for e in self._offload])
        self._offload_copy = ([e.staging for e in self._offload], [e.live for e in self._offload])
        self._offload_event = torch.cuda.Event() if self._offload else None
        copy: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for e in self._entries:
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
        handle = getattr(self, "_hook_handle", None)
        if handle is not None:
            handle.remove()

    # ------------------------------------------------------------------ properties
    @property
    def names(self) -> list[str]:
        """State-dict names of the tracked tensors, in model order."""
        return list(self._names)

    @property
    def is_sharded(self) -> bool:
        """Whether some tracked tensor is split across processes (FSDP2, ZeRO-3): :meth:`save` and
        :meth:`ema_state_dict` then gather, which every rank must join."""
        return any(dist_utils.is_sharded(e.source) for e in self._entries)

    def num_bytes(self) -> int:
        """Bytes held by this process's EMA tensors (its shards only, on sharded models)."""
        return sum(e.ema.numel() * e.ema.element_size() for e in self._entries)

    # ------------------------------------------------------------------ update
    def decay_at(self, step: int) -> float:
        """The schedule's decay for the optimizer step with 0-based index ``step``, checked to lie in [0, 1]."""
        d = self.schedule(self.decay, step, self.total_steps)
        try:
            d = float(d)
        except (TypeError, ValueError):
            raise ValueError(
                f"Decay schedule {self.schedule!r} returned {d!r} at step {step}; expected a float"
            ) from None
        if not (0.0 <= d <= 1.0):  # also rejects NaN
            raise ValueError(
                f"Decay schedule {self.schedule!r} returned {d!r} at step {step}; a decay must lie in [0, 1]"
            )
        return d

    @torch.no_grad()
    def update(self) -> float | None:
        """Account for one finished optimizer step and, every ``update_every`` steps, average.

        ``d = schedule(decay, step, total_steps)``; on averaging steps ``ema = ema * d**N + param * (1 - d**N)``.

        Returns:
            ``d``, the schedule's decay for this step; ``None`` when the accelerator reports that the optimizer
            skipped the step (fp16 overflow): such a step is neither counted nor averaged.

        Example:
            >>> ema = EMAState(nn.Linear(2, 2), decay=0.5)
            >>> ema.update(), ema.step
            (0.5, 1)
        """
        if self._swapped:
            raise RuntimeError("EMAState.update() called inside average_parameters(): leave the block first")
        if self.accelerator is not None and getattr(self.accelerator, "optimizer_step_was_skipped", False):
            return None
        d = self.decay_at(self.step)
        self.step += 1
        self.last_decay = d
        if self.step % self.update_every == 0:
            weight = 1.0 - d**self.update_every
            if self._stream is not None:
                self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
                with torch.cuda.stream(self._stream):
                    self._apply(weight)
                self._event.record(self._stream)
            else:
                self._apply(weight)
            self.num_updates += 1
        return d

    def skip_to(self, step: int) -> None:
        """Count ``step`` optimizer steps as already taken, without averaging (e.g. resuming from a checkpoint
        that has no saved EMA), so the schedule continues at the right step.

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
        """Where the EMA value of ``e`` lives right now (the model holds it while swapped by XOR)."""
        if self._swapped and id(e) in self._xor_ids:
            return e.live
        return e.ema

    @torch.no_grad()
    def swap(self) -> None:
        """Put the EMA weights into the model, or, if they are in, put the training weights back (bitwise).

        Same-dtype tensors are exchanged in place by XOR of their bit patterns (no extra memory); when the EMA has
        another dtype or device than the parameter, the parameter is backed up and restored from the backup.
        Prefer :meth:`average_parameters`, which restores on exit even when its block raises.
        """
        self.wait()
        if not self._swapped:
            self._xor_swapped, self._backups = [], []
            for e in self._entries:
                if e.ema.dtype == e.live.dtype and e.ema.device == e.live.device and e.live.numel():
                    _xor_swap(e.ema, e.live)
                    self._xor_swapped.append(e)
                else:
                    self._backups.append((e, e.live.clone()))
                    e.live.copy_(e.ema)
            self._xor_ids = {id(e) for e in self._xor_swapped}
            self._swapped = True
        else:
            for e in self._xor_swapped:
                _xor_swap(e.ema, e.live)
            for e, backup in self._backups:
                e.live.copy_(backup)
            self._xor_swapped, self._backups, self._xor_ids = [], [], set()
            self._swapped = False

    @contextlib.contextmanager
    def average_parameters(self) -> Iterator[nn.Module]:
        """Context manager: the model holds the EMA weights inside the block, its own weights (bitwise) after.

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
            self.swap()

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the EMA weights into ``model`` (default: the tracked model) for good.

        Args:
            model: Another module with the same state-dict names (e.g. a fresh copy for export); its tensors must
                have the tracked shapes (local shapes on sharded models).
        """
        self.wait()
        if model is None:
            if self._swapped:  # the model already holds the EMA: keep it there, forget the training weights
                for e in self._xor_swapped:
                    e.ema.copy_(e.live)
                self._xor_swapped, self._backups, self._xor_ids, self._swapped = [], [], set(), False
                return
            for e in self._entries:
                e.live.copy_(e.ema)
            return
        target = dist_utils.unwrap_model(model)
        tensors = dict(target.named_parameters())
        tensors.update(_persistent_buffers(target))
        missing = [e.name for e in self._entries if e.name not in tensors]
        if missing:
            raise ValueError(
                f"copy_to: the target model lacks {len(missing)} tracked tensor(s): {missing[:10]}"
            )
        for e in self._entries:
            dist_utils.local_tensor(tensors[e.name]).copy_(self._current_ema(e))

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
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-exactly: ``{"ema": {name: tensor}, "meta": {...}}``.

        ``ema`` holds this process's EMA tensors (local shards on sharded models) by reference; ``meta`` is
        JSON-serialisable (step, schedule name and arguments, options).
        """
        self.wait()
        return {"ema": {e.name: self._current_ema(e) for e in self._entries}, "meta": self._meta()}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore from :meth:`state_dict` output (tensors shaped like this process's EMA tensors).

        Raises:
            ValueError: If names or shapes differ from the tracked ones (the message lists them), or the state is
                malformed.
        """
        if not isinstance(state_dict, Mapping) or "ema" not in state_dict or "meta" not in state_dict:
            raise ValueError("EMAState.load_state_dict expects a mapping with 'ema' and 'meta' keys")
        self._load(state_dict["ema"], state_dict["meta"], strict=strict)

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
                    wrong.append(f"{e.name}: saved {got} vs model {want}")
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"missing from the saved EMA ({len(missing)}): {missing}")
            if unexpected:
                parts.append(f"not in the model ({len(unexpected)}): {unexpected}")
            if wrong:
                parts.append(f"shape mismatch ({len(wrong)}): {wrong}")
            raise ValueError("The saved EMA does not match the model: " + "; ".join(parts))

    def _load(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], strict: bool) -> None:
        """Check this process's EMA tensors and the settings completely, then apply them."""
        if self._swapped:
            raise RuntimeError("Cannot load an EMA state inside average_parameters()")
        self.wait()
        self._check_names_shapes({k: tuple(v.shape) for k, v in tensors.items()}, full=False, strict=strict)
        self._load_meta(meta)
        for e in self._entries:
            if e.name in tensors:
                e.ema.copy_(tensors[e.name])

    def _load_meta(self, meta: Mapping[str, Any]) -> None:
        """Validate the saved settings completely, then apply them (a refused load changes nothing)."""
        try:
            step = int(meta["step"])
            update_every = _check_update_every(int(meta.get("update_every") or self.update_every))
            num_updates = int(meta.get("num_updates", step // update_every))
            total_steps = _check_total_steps(meta.get("total_steps"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"Malformed EMA meta (needs an integer 'step' and valid options): {e}") from e
        saved_kwargs = meta.get("schedule_kwargs") or {}
        decay = _check_decay(meta["decay"]) if meta.get("decay") is not None else self.decay
        decay_type = meta.get("decay_type", self.decay_type)
        mine = (self.decay, self.decay_type, self.update_every, _jsonable(self.schedule.config()))
        saved = (decay, decay_type, update_every, saved_kwargs)
        schedule = (self.decay_type, self.schedule)
        if (saved[1], saved[3]) != (mine[1], mine[3]):
            try:
                schedule = build_schedule(decay_type, **saved_kwargs)
            except ValueError:
                logger.warning(
                    "Saved decay_type %r is not registered; keeping %r.", decay_type, self.decay_type
                )
        if saved != mine:
            logger.warning(
                "Loaded EMA state was saved with decay=%s, decay_type=%s, update_every=%s, schedule %s; continuing "
                "with the saved settings instead of decay=%s, decay_type=%s, update_every=%s, schedule %s.",
                *saved,
                *mine,
            )
        self.step, self.num_updates, self.last_decay = step, num_updates, meta.get("last_decay")
        self.decay, self.update_every = decay, update_every
        self.decay_type, self.schedule = schedule
        if self.total_steps is None and total_steps is not None:
            self.total_steps = total_steps

    # ------------------------------------------------------------------ full weights and files
    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA as a full state dict under the model's own names (what ``ema_net/model.safetensors`` holds).

        Untracked persistent buffers (``buffers="ignore"``) are taken from the model so that the result loads as
        a complete model; with ``trainable_only=True`` only the tracked tensors are returned. On sharded models
        the shards are gathered (a collective: call it on every rank); tensors are on the CPU. With several
        processes only the main process keeps them (the others get ``{}``), so no rank but the main one ever
        holds a full copy of a sharded EMA, and that one tensor by tensor as they arrive. On an unsharded CPU
        model the tensors share storage with the EMA (no copy): clone them to keep a snapshot.
        """
        self.wait()
        keep = dist_utils.is_main_process()
        out: dict[str, torch.Tensor] = {}
        pairs = [(e.name, e.source, self._current_ema(e)) for e in self._entries]
        if not self.trainable_only and self.buffers == "ignore":
            pairs += [
                (name, b, dist_utils.local_tensor(b))
                for name, b in _persistent_buffers(self.model)
                if name not in self._by_name
            ]
        for name, source, local in pairs:
            if keep:
                out[name] = dist_utils.full_tensor(source, local)
            elif dist_utils.is_sharded(source):  # take part in the gather; the result is the main process's
                dist_utils.full_tensor(source, local, to_cpu=False)
        return out

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/ema_net/`` (``model.safetensors``, ``ema_state.json``, ``config.json``) atomically.

        On several processes every rank must call it (shards are gathered); only the main process writes.

        Example:
            >>> import tempfile
            >>> ema = EMAState(nn.Linear(2, 2), decay=0.5)
            >>> ema.save(tempfile.mkdtemp()).name
            'ema_net'
        """
        tensors = self.ema_state_dict()
        path = Path(directory) / "ema_net"
        if dist_utils.is_main_process():
            path = save_ema_net(directory, tensors, self._meta(), getattr(self.model, "config", None))
        return path

    def _load_dir(self, directory: str | os.PathLike) -> EMAState:
        if self._swapped:
            raise RuntimeError("Cannot load an EMA state inside average_parameters()")
        # `ema_net` also holds the model's untracked persistent buffers (buffers="ignore"), so that it loads as a
        # complete model; they are the model's own values, not EMA state, and are not read back.
        untracked = {name for name, _ in _persistent_buffers(self.model)} - set(self._by_name)
        with open_ema_net(directory) as reader:
            shapes = {k: v for k, v in reader.shapes.items() if k not in untracked}
            try:
                # Names and full shapes from the file's header first; then each rank reads only its own part
                # (its FSDP2 shard / ZeRO-3 partition rows), so no rank holds the whole model's EMA in memory.
                self._check_names_shapes(shapes, full=True, strict=True)
                local = {
                    e.name: dist_utils.read_local(
                        e.source, shapes[e.name], functools.partial(reader.read, e.name)
                    )
                    for e in self._entries
                }
                self._load(local, reader.meta, strict=True)
            except EMAFileError:
                raise
            except ValueError as e:
                raise EMAFileError(f"Cannot load the EMA from {str(directory)!r}: {e}") from e
        return self

    @classmethod
    def _from_dir(cls, directory: str | os.PathLike, model: nn.Module, **overrides: Any) -> EMAState:
        meta = load_ema_meta(directory)
        kwargs: dict[str, Any] = {
            "decay": meta.get("decay", 0.9999),
            "decay_type": meta.get("decay_type", "constant"),
            "total_steps": meta.get("total_steps"),
            "update_every": meta.get("update_every", 1),
            "dtype": meta.get("dtype", "float32"),
            "buffers": meta.get("buffers", "average"),
            "trainable_only": meta.get("trainable_only", False),
            **meta.get("schedule_kwargs", {}),
        }
        kwargs.update(overrides)
        return cls(model, **kwargs)._load_dir(directory)

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
                """Build an :class:`EMAState` for ``model`` from ``directory/ema_net`` (settings from its JSON)."""
                return objtype._from_dir(directory, model, **overrides)

            return load

        def load_into(directory: str | os.PathLike) -> EMAState:
            """Restore this EMA from ``directory/ema_net`` (or an ``ema_net`` folder itself)."""
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
    """Exchange the contents of two same-dtype tensors in place, bit-exactly, without a temporary."""
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    if not (a.is_contiguous() and b.is_contiguous()):
        tmp = a.clone()
        a.copy_(b)
        b.copy_(tmp)
        return
    x, y = a.view(bits), b.view(bits)
    x.bitwise_xor_(y)
    y.bitwise_xor_(x)
    x.bitwise_xor_(y)


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
