"""``EMATrainerCallback``: an EMA of the model weights for the Hugging Face ``Trainer``.

The callback holds no EMA math: it drives an :class:`hf_ema.EMAState` from the Trainer's events. After optimizer
step ``t`` (1-based: ``t = state.global_step``, the steps done including this one, as SuperGradients counts them)
the EMA becomes ``ema <- ema * d_t + theta_t * (1 - d_t)``, ``d_t = schedule(decay, t, T)`` with ``T`` the
Trainer's ``max_steps`` unless ``total_steps`` is given.

Why these hooks (checked against ``transformers`` 5.24; the same order holds in 4.46):

* ``on_train_begin`` fires after the model was loaded from ``resume_from_checkpoint``, after
  ``accelerator.prepare`` (DDP/FSDP wrapping) and after ``state.global_step`` was restored, and before
  ``eval_on_start``. So the EMA is built here, from the (possibly sharded) model as the optimizer sees it; on resume
  it is restored from ``<checkpoint>/ema_net``. The Trainer does not pass ``resume_from_checkpoint`` to callbacks:
  we read it from the ``Trainer.train`` call that is running (the calling frame), and otherwise try
  ``args.resume_from_checkpoint`` and ``args.output_dir/checkpoint-{global_step}``; a candidate is used only when its
  ``trainer_state.json`` has the same ``global_step`` as the resumed state.
* ``on_step_end`` fires exactly once per optimizer step (not per micro-batch: gradient accumulation calls
  ``on_substep_end`` in between), after ``optimizer.step()``. The EMA is updated there unless the optimizer reports
  the step as skipped (fp16 overflow).
* Evaluation: the Trainer has no "before evaluate" event. Evaluation during training runs in
  ``_maybe_log_save_evaluate`` right after ``on_step_end`` / ``on_epoch_end`` when ``control.should_evaluate`` is
  set (by ``DefaultFlowCallback``, which runs before user callbacks), and ``eval_on_start`` runs right after
  ``on_train_begin``. So the EMA weights are swapped in at the end of those three events, when an evaluation
  is due, and swapped back (bitwise) in ``on_evaluate``, which fires at the end of ``Trainer.evaluate`` and so
  before ``_save_checkpoint`` writes the regular weights. With a dict of eval datasets, ``on_evaluate`` fires once
  per dataset; the training weights come back after the last one. If an announced evaluation never comes (another
  callback cleared ``should_evaluate``), the training weights are put back, with a warning, in ``on_step_begin``
  / ``on_epoch_begin`` / ``on_save`` / ``on_train_end``, so EMA weights never reach an optimizer step.
  Consequence for other callbacks: those listed *after* this one that read the weights in ``on_step_end`` /
  ``on_epoch_end`` of a step that is about to be evaluated see the EMA weights; ``on_optimizer_step`` always sees
  the training weights (this callback does nothing there).
* ``on_save`` fires after ``_save_checkpoint`` has written ``output_dir/checkpoint-{global_step}`` (no staging
  folder, rename or rotation after it; rotation runs inside ``_save_checkpoint`` and always keeps the newest
  checkpoint), so ``ema_net/`` is written into that folder, by the main process; ``save_total_limit`` rotation
  later removes it with its folder.
* With ``push_to_hub``, ``_save_checkpoint`` uploads the new checkpoint before ``on_save`` fires, and calls
  ``on_push_begin`` (main process only) just before: ``ema_net/`` is written there, so the pushed checkpoint
  (``last-checkpoint`` with ``hub_strategy="checkpoint"``, the one training resumes from) carries the EMA, and
  ``on_save`` does not write it again. A sharded EMA needs every rank to gather it, so with FSDP2/ZeRO-3 it is left
  to ``on_save`` and the pushed checkpoint has none (a warning says so).
* ``on_train_end`` fires after ``load_best_model_at_end`` loaded the best checkpoint's regular weights, so the best
  checkpoint's ``ema_net`` is loaded there (the metric that chose it was measured on the EMA), then copied into the
  model when ``replace_at_end``.
* ``ema_decay`` goes into the training logs (and ``state.log_history``) in ``on_log``. The Trainer puts its reporting
  integrations (TensorBoard, W&B, MLflow, ...) before user callbacks, and they send the log in their own ``on_log``;
  so ``on_train_begin`` puts a small log-only callback at the head of the Trainer's list (a new list: the handler
  is iterating the old one), and ``on_train_end`` takes it out again. The order of every other event is unchanged.
* Several EMAs (e.g. decays 0.999 and 0.9999) are several callbacks, each with its own ``name``. They find each
  other in ``on_train_begin`` through the Trainer's callback list, which is also where duplicates (the same object
  twice, two callbacks with one name) are refused, before any step. Exactly one, the *primary* (the unnamed one,
  else the first listed), swaps its EMA in for the Trainer's evaluations and applies ``load_best_model_at_end`` /
  ``replace_at_end``; each other one, *secondary*, only updates, saves (``ema_net-<name>``) and resumes its own EMA,
  and is evaluated by the primary right after each of its evaluations, under ``eval_ema_<name>``, inside its own
  ``average_parameters()``. Whatever reads the weights (an update, building an EMA) while the primary holds its
  EMA in the model for a due evaluation swaps it out first and back after, so no EMA ever averages another EMA.
* Evaluations that the Trainer would not run without hf_ema (``eval_both``, secondary EMAs) run with the global
  random states (torch, CUDA, ``random``, NumPy) saved before and put back after, so they do not shift the random
  numbers that training draws next (dropout, ...): the training trajectory is the one of the same run without
  hf_ema.
* Logging: the Trainer hands its ``log_level`` / ``log_level_replica`` to transformers' logging; while it trains,
  the ``hf_ema`` loggers take that verbosity (with ``log_level="passive"`` only if the user set no level on the
  ``hf_ema`` logger), and when no logging is configured at all they print to stderr like transformers' own
  (``[hf_ema] ...``). After training the ``hf_ema`` logger is put back as it was.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import random
import re
import sys
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

from .io import STATE_NAME, WEIGHTS_NAME, EMAFileError, ema_dirname, remove_ema_dir
from .loading import has_ema
from .schedules import IDecayFunction, supergradients_kwargs
from .state import EMAState, _check_device

if TYPE_CHECKING:
    from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

    from .args import EMAArguments

__all__ = ["EMATrainerCallback"]

logger = logging.getLogger(__name__)

_PREFIX_CHECKPOINT_DIR = "checkpoint"
_TRAINER_STATE_NAME = "trainer_state.json"
_TRAINER_FRAMES = ("_inner_training_loop", "train")


def _find_running_trainer() -> tuple[Trainer | None, str | None]:
    """The ``Trainer`` whose ``train()`` is on the call stack, and the checkpoint it resumes from (if any)."""
    try:
        from transformers import Trainer
    except ImportError:  # pragma: no cover
        return None, None
    frame = sys._getframe(1)
    try:
        for _ in range(64):
            if frame is None:
                break
            if frame.f_code.co_name in _TRAINER_FRAMES:
                local = frame.f_locals
                obj = local.get("self")
                if isinstance(obj, Trainer):
                    resume = local.get("resume_from_checkpoint")
                    return obj, os.fspath(resume) if isinstance(resume, (str, os.PathLike)) else None
            frame = frame.f_back
    finally:
        del frame
    return None, None


_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]+")


class _StderrHandler(logging.StreamHandler):
    """Prints to the ``sys.stderr`` of the moment (so captured output, e.g. in notebooks, catches it), formatted like
    transformers' default handler: ``[hf_ema] message``."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("[hf_ema] %(message)s"))

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _TrainerVerbosity:
    """While a Trainer trains, the ``hf_ema`` loggers log at that Trainer's verbosity; afterwards they are put back.

    The Trainer hands ``log_level`` (main process) / ``log_level_replica`` (others) to transformers' logging when it
    is built; each EMA callback calls :meth:`begin` at train start and :meth:`end` at train end, and the state is
    saved by the first and restored by the last one of a run. With ``"passive"`` (the Trainer's default) the
    ``hf_ema`` logger follows transformers' verbosity only when the user has set no level on it. A handler is added
    only while no logging is configured at all (no handler on the root logger): otherwise records reach the user's
    handlers through the root logger, and a handler of ours would print them twice.
    """

    def __init__(self) -> None:
        self._run: Any = None  # weak reference to the Trainer of the run in progress
        self._saved_level: int | None = None
        self._users: set[int] = set()
        self._handler: _StderrHandler | None = None

    def begin(self, callback: EMATrainerCallback, trainer: Any, args: Any) -> None:
        lib = logging.getLogger("hf_ema")
        current = self._run() if self._run is not None else None
        if self._run is None or current is not trainer:  # a new run (an earlier one that raised left no end)
            if self._saved_level is None:
                self._saved_level = lib.level
            self._run = weakref.ref(trainer) if trainer is not None else (lambda: None)
            self._users = set()
        self._users.add(id(callback))
        should_log = getattr(args, "should_log", True)
        chosen = getattr(args, "log_level" if should_log else "log_level_replica", "passive")
        if chosen != "passive" or self._saved_level == logging.NOTSET:
            lib.setLevel(hf_logging.get_verbosity())
        if self._handler is None:
            self._handler = _StderrHandler()
        if logging.getLogger().handlers:
            lib.removeHandler(self._handler)
        elif not lib.handlers:
            lib.addHandler(self._handler)

    def end(self, callback: EMATrainerCallback) -> None:
        self._users.discard(id(callback))
        if self._users:
            return
        lib = logging.getLogger("hf_ema")
        if self._saved_level is not None:
            lib.setLevel(self._saved_level)
        if self._handler is not None:
            lib.removeHandler(self._handler)
        self._run, self._saved_level = None, None


_VERBOSITY = _TrainerVerbosity()


@contextlib.contextmanager
def _random_states_kept() -> Iterator[None]:
    """Run the block, then put the global random states (torch CPU and CUDA, ``random``, NumPy) back as they were.

    An evaluation that the Trainer would not run without hf_ema (``eval_both``, secondary EMAs) draws random numbers
    (each DataLoader iterator draws its base seed); without this, dropout masks and the like after it would differ
    from those of the same run without hf_ema.
    """
    py_state = random.getstate()
    try:
        import numpy as np

        np_state: Any = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with transformers
        np, np_state = None, None
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)


def _checkpoint_step(path: str) -> int | None:
    try:
        with open(os.path.join(path, _TRAINER_STATE_NAME), encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def training_weights_in(callbacks: Iterable[EMATrainerCallback | None]) -> Iterator[None]:
    """The training weights in the model for the block: each of ``callbacks`` that holds its EMA in the model for a
    due evaluation (swapped in at ``on_step_end``, evaluated later in the same step) is swapped out, then back in,
    bitwise, in reverse order. Another EMA's update inside the block so averages the training weights, never an
    EMA."""
    out = [c for c in callbacks if c is not None and c._evals_pending and c.ema is not None]
    for c in out:
        c.ema.swap()
    try:
        yield
    finally:
        for c in reversed(out):
            c.ema.swap()


class _EMADecayLog(TrainerCallback):
    """Adds its owner's ``ema_decay`` to each training log; it sits first in the Trainer's callback list, so the
    reporting integrations, which come before user callbacks, send the decay too."""

    def __init__(self, owner: EMATrainerCallback) -> None:
        self._owner = weakref.ref(owner)

    def owned_by(self, owner: EMATrainerCallback) -> bool:
        return self._owner() is owner

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        owner = self._owner()
        if owner is not None:
            owner._add_decay_to_logs(state, logs)


class _EvalSwap(TrainerCallback):
    """The evaluation swap shared by the Trainer callbacks: an EMA (:meth:`_eval_ema`) is swapped into the model
    when an evaluation is due, counted down in ``on_evaluate`` (once per eval dataset), and swapped out again, with
    a warning, if the announced evaluation never came, before anything else touches the weights."""

    _evals_pending: int = 0
    trainer: Any

    def _eval_ema(self) -> EMAState | None:
        """The EMA this callback evaluates with (None: none)."""
        raise NotImplementedError

    def _num_eval_datasets(self) -> int:
        trainer = self.trainer
        eval_dataset = getattr(trainer, "eval_dataset", None) if trainer is not None else None
        return len(eval_dataset) if isinstance(eval_dataset, dict) and eval_dataset else 1

    def _swap_in_for_eval(self) -> None:
        ema = self._eval_ema()
        if ema is None or self._evals_pending:
            return
        ema.swap()
        self._evals_pending = self._num_eval_datasets()

    def _ensure_training_weights(self, before: str) -> None:
        ema = self._eval_ema()
        if self._evals_pending and ema is not None:
            logger.warning(
                "%s: an evaluation was due but did not run; training weights restored before %s.",
                type(self).__name__,
                before,
            )
            ema.swap()
            self._evals_pending = 0

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._ensure_training_weights("the next training step")

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._ensure_training_weights("the next epoch")


class EMATrainerCallback(_EvalSwap):
    """Keep an EMA of the model's weights during ``Trainer.train()``; evaluate, checkpoint and finish with it.

    After every optimizer step ``t`` (1-based: 1 after the first step, as in SuperGradients),
    ``ema <- ema * d_t + theta_t * (1 - d_t)`` with ``d_t = schedule(decay, t, total_steps)`` (``constant``:
    ``decay``; ``threshold``: ``min(decay, (1 + t) / (10 + t))``; ``exp``:
    ``decay * (1 - exp(-beta * t / total_steps))``). With ``update_every = N`` the average runs every N-th step
    with ``d_t ** N`` (the schedule's ``interval_decay``).

    What it does during ``Trainer.train()``:

    * builds the EMA from the model at the start of training, or restores its state from ``<checkpoint>/ema_net``
      when resuming (the settings stay the ones given here; a difference from the saved ones is logged once); a
      checkpoint without a usable ``ema_net`` stops ``train()`` with an error before any step, unless
      ``allow_ema_restart=True``;
    * updates it once per optimizer step and logs the schedule's decay of the last step as ``ema_decay`` and, with
      ``update_every > 1``, the decay the last averaging applied (the schedule's ``interval_decay``:
      ``ema_decay ** update_every`` unless the schedule says otherwise) as ``ema_decay_applied`` (a named EMA:
      ``ema_<name>_decay``, ``ema_<name>_decay_applied``);
    * evaluates with the EMA weights (``eval_strategy`` steps/epoch and ``eval_on_start``), putting the training
      weights back bitwise before training continues and before the checkpoint's regular weights are written;
      ``eval_both=True`` also reports the training weights' metrics under ``raw_prefix``;
    * writes ``checkpoint-N/ema_net/`` next to every checkpoint (``hf_ema.load_model`` and
      ``AutoModel...from_pretrained(".../ema_net")`` read it);
    * at the end loads the best checkpoint's EMA (``load_best_model_at_end=True``) and, when ``replace_at_end``,
      puts the EMA weights into the model, so ``trainer.save_model()`` / ``trainer.evaluate()`` use them. With
      ``replace_at_end=False`` the model keeps the training weights, and so do ``trainer.evaluate()`` /
      ``trainer.predict()`` after training; evaluate the EMA with
      ``with callback.ema.average_parameters(): trainer.evaluate()``;
    * warns once at the start when the averaging horizon ``N / (1 - decay**N)`` (``1 / (1 - decay)`` optimizer
      steps for ``update_every = N = 1``) exceeds ``max_steps``: such an EMA still leans on the early weights at the
      end of training.

    Several EMAs (e.g. decays 0.999 and 0.9999): one callback each, each with its own ``name``. The unnamed one (or,
    if all are named, the first listed) is the *primary*: the Trainer's evaluations (``eval_*``), the best-model
    choice and ``replace_at_end`` use it. Every named one is *secondary*: it keeps, saves (``ema_net-<name>/`` in
    each checkpoint) and resumes its own EMA, ignores ``replace_at_end``, ``eval_both`` and
    ``load_best_model_at_end`` (its last EMA stays; each checkpoint holds its EMA of that step), and, unless
    ``evaluate=False``, is evaluated right after each evaluation of the primary under ``eval_prefix``
    (default ``eval_ema_<name>``, e.g. ``eval_ema_slow_loss``). ``hf_ema.load_model(cls, path, ema=name)`` loads
    one. The same callback object listed twice, or two callbacks with the same name, are refused when training
    starts (``ValueError``, before any step).
    Args:
        decay: Maximum decay, strictly in (0, 1).
        decay_type: ``"constant"``, ``"threshold"``, ``"exp"``, a name registered in
            ``hf_ema.EMA_DECAY_FUNCTIONS``, or an :class:`~hf_ema.IDecayFunction` instance.
        beta: Sharpness of the ``exp`` schedule.
        total_steps: Planned optimizer steps for the schedule; default: the Trainer's ``state.max_steps``.
        update_every: Average every N-th optimizer step only (decay raised to the N-th power).
        dtype: EMA precision for floating-point weights (default fp32; ``None``: each weight's dtype).
        buffers: Floating-point buffers are ``"average"``-d, ``"copy"``-ed or ``"ignore"``-d.
        trainable_only: Average only parameters with ``requires_grad`` (e.g. LoRA adapters); ``ema_net`` then holds
            only them, and ``hf_ema.load_model`` puts them on top of the base model.
        device: Keep the EMA on this device (e.g. ``"cpu"``); default: next to each weight.
        replace_at_end: Put the EMA weights into the model when training ends.
        eval_both: After each EMA evaluation, also evaluate the training weights and report their metrics under
            ``raw_prefix`` (needs the Trainer: found automatically inside ``Trainer.train``, or see :meth:`bind`).
        raw_prefix: Metric prefix of the training weights' evaluation, e.g. ``eval_raw_loss``.
        name: ``None`` for the primary EMA (folder ``ema_net``), or a name of letters, digits, ``_``, ``.``, ``-``
            for another EMA of the same model (folder ``ema_net-<name>``; see above).
        eval_prefix: Metric prefix of a named EMA's evaluation; default ``eval_ema_<name>``.
        evaluate: Whether a named (secondary) EMA is evaluated after each evaluation of the primary.
        reference_batch_size: The effective batch ``B_ref`` that ``decay`` is meant for: each optimizer step then
            applies ``d ** (B / B_ref)`` (the EMA scaling rule of Busbridge et al. 2023, arXiv:2307.13813), with
            ``B`` the Trainer's effective batch (per-device batch x gradient accumulation x data-parallel
            processes), so the horizon in samples survives a change of GPUs or accumulation, also on resume.
        batch_size: Overrides the Trainer's effective batch ``B`` (samples per optimizer step).
        time_unit: ``"samples"``: the schedule counts its steps in samples / ``reference_batch_size``.
        strict_batch_size: Refuse to resume an EMA saved with another effective batch size, instead of rescaling.
        allow_ema_restart: When resuming from a checkpoint that has no usable ``ema_net`` (the process was killed
            while saving it, or the run had no EMA), restart the EMA from the checkpoint's weights with a warning,
            instead of raising. An ``ema_net`` that is there but cannot be read always raises.
        **schedule_kwargs: Passed to the schedule's constructor (as in SuperGradients' ``ema_params``).

    Raises:
        ValueError: If an argument is invalid (the message names it and shows the value); raised here, before
            any training step.
        TypeError: If an argument has the wrong type.

    Example:
        >>> from hf_ema import EMATrainerCallback
        >>> callback = EMATrainerCallback(decay=0.9999, decay_type="exp", beta=15)
        >>> # trainer = Trainer(model, args, train_dataset=..., eval_dataset=..., callbacks=[callback])
        >>> # trainer.train()  -> evaluations use the EMA; checkpoints hold ema_net/; the model ends with the EMA
        >>> callback.ema is None  # built when training starts
        True
        >>> # two EMAs: evaluations use the first; the second is reported as eval_ema_slow_* and saved as ema_net-slow
        >>> callbacks = [EMATrainerCallback(decay=0.999), EMATrainerCallback(decay=0.9999, name="slow")]
    """

    def __init__(
        self,
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
        replace_at_end: bool = True,
        eval_both: bool = False,
        raw_prefix: str = "eval_raw",
        name: str | None = None,
        eval_prefix: str | None = None,
        evaluate: bool = True,
        reference_batch_size: int | None = None,
        batch_size: int | None = None,
        time_unit: str = "steps",
        strict_batch_size: bool = False,
        allow_ema_restart: bool = False,
        **schedule_kwargs: Any,
    ) -> None:
        for arg, value in (
            ("replace_at_end", replace_at_end),
            ("eval_both", eval_both),
            ("trainable_only", trainable_only),
            ("evaluate", evaluate),
            ("allow_ema_restart", allow_ema_restart),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"`{arg}` must be True or False, got {type(value).__name__}: {value!r}")
        if not isinstance(raw_prefix, str) or not raw_prefix or raw_prefix == "eval":
            raise ValueError(
                f"`raw_prefix` must be a non-empty metric prefix other than 'eval' (e.g. 'eval_raw'), "
                f"got {raw_prefix!r}"
            )
        _check_device(device)  # the stand-in model below is built with device=None
        ema_dirname(name)  # validates `name`
        if eval_prefix is not None:
            if name is None:
                raise ValueError(
                    f"`eval_prefix` ({eval_prefix!r}) is for a named EMA, evaluated besides the Trainer's own "
                    "evaluations; the unnamed EMA is what those evaluate (`eval_*`). Pass name=... too, or drop it."
                )
            if (
                not isinstance(eval_prefix, str)
                or not _PREFIX_RE.fullmatch(eval_prefix)
                or eval_prefix == "eval"
            ):
                raise ValueError(
                    "`eval_prefix` must be a metric prefix of letters, digits, '_', '.', '-' other than 'eval' "
                    f"(e.g. 'eval_ema_slow'), got {eval_prefix!r}"
                )
        self.ema_kwargs: dict[str, Any] = {
            "decay": decay,
            "decay_type": decay_type,
            "beta": beta,
            "total_steps": total_steps,
            "update_every": update_every,
            "dtype": dtype,
            "buffers": buffers,
            "trainable_only": trainable_only,
            "device": device,
            **schedule_kwargs,
        }
        # The EMA scaling rule's settings, only when set (a callback without them has the same ema_kwargs).
        if reference_batch_size is not None:
            self.ema_kwargs["reference_batch_size"] = reference_batch_size
        if batch_size is not None:
            self.ema_kwargs["batch_size"] = batch_size
        if time_unit != "steps":
            self.ema_kwargs["time_unit"] = time_unit
        if strict_batch_size is not False:
            self.ema_kwargs["strict_batch_size"] = strict_batch_size
        # The EMA is built when training starts (it needs the prepared model). Validate every setting now, with
        # EMAState's own checks, on a one-weight stand-in model, so bad input fails before training.
        probe = {**self.ema_kwargs, "device": None, "total_steps": 1 if total_steps is None else total_steps}
        if batch_size is None and reference_batch_size is not None:
            probe["batch_size"] = reference_batch_size  # the real one comes from the Trainer at train begin
        EMAState(nn.Linear(1, 1), **probe)
        self.total_steps = total_steps
        self.replace_at_end = replace_at_end
        self.eval_both = eval_both
        self.raw_prefix = raw_prefix
        self.name = name
        self.eval_prefix = eval_prefix if eval_prefix is not None else (f"eval_ema_{name}" if name else None)
        self.evaluate = evaluate
        self.allow_ema_restart = allow_ema_restart
        #: The :class:`hf_ema.EMAState` driven by this callback (``None`` until training starts).
        self.ema: EMAState | None = None
        self._trainer_ref: Any = None
        self._bound: Any = None
        self._evals_pending = 0
        self._in_nested_eval = False
        # The EMA callbacks of this run, self included, in the Trainer's order (set at on_train_begin).
        self._peers: list[weakref.ref[EMATrainerCallback]] = []
        self._is_primary = True
        self._decay_key = "ema_decay" if name is None else f"ema_{name}_decay"
        self._warned_no_trainer = False
        self._warned_push = False
        self._saved_at_step: int | None = None
        self._training = False

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_params(cls, ema_params: Mapping[str, Any], **overrides: Any) -> EMATrainerCallback:
        """Build from a SuperGradients ``ema_params`` dict, e.g. ``{"decay": 0.9999, "decay_type": "exp",
        "beta": 15}``, read as SuperGradients' ``ModelEMA.from_params`` reads it.

        As in SuperGradients: a dict without ``decay_type`` means ``exp`` with ``beta=15`` (SuperGradients
        deprecates that default: a warning says so); the legacy ``exp_activation`` flag means ``exp`` (true) or
        ``constant`` (false); a missing ``decay`` is 0.9999 (with a warning). See
        :func:`hf_ema.schedules.supergradients_kwargs`. Without gradient accumulation the EMA then equals
        SuperGradients' (its trainer's ``total_steps = len(loader) * max_epochs`` is the Trainer's ``max_steps``).

        Args:
            ema_params: Keyword arguments of this class; a top-level ``"ema"`` flag is ignored (``False``: refused). Keys that are not
                arguments of this class go to the schedule's constructor, as in SuperGradients.
            **overrides: Take precedence over ``ema_params`` (e.g. ``replace_at_end=False``).

        Example:
            >>> cb = EMATrainerCallback.from_params({"decay": 0.999, "decay_type": "threshold"})
            >>> cb.ema_kwargs["decay_type"]
            'threshold'
        """
        return cls(**supergradients_kwargs(ema_params, overrides))

    @classmethod
    def from_args(cls, args: EMAArguments) -> EMATrainerCallback:
        """Build from parsed :class:`hf_ema.EMAArguments` (its ``ema`` flag is not consulted here; see
        :meth:`hf_ema.EMAArguments.callbacks`).

        Example:
            >>> from hf_ema import EMAArguments
            >>> cb = EMATrainerCallback.from_args(EMAArguments(ema=True, ema_decay=0.99))
            >>> cb.ema_kwargs["decay"]
            0.99
        """
        if not hasattr(args, "callback_kwargs"):
            raise TypeError(f"`args` must be an hf_ema.EMAArguments, got {type(args).__name__}")
        return cls(**args.callback_kwargs())

    def bind(self, trainer: Trainer) -> EMATrainerCallback:
        """Tell the callback which Trainer runs it (only needed for ``eval_both`` when it cannot find it itself).
        A ``Trainer.train()`` found running when training starts takes precedence (and drops a binding to another
        Trainer), so a callback bound once can be reused by the next Trainer.

        Returns:
            ``self``, so ``Trainer(..., callbacks=[cb])`` followed by ``cb.bind(trainer)`` reads naturally.
        """
        self._bound = weakref.ref(trainer)
        return self

    @property
    def trainer(self) -> Trainer | None:
        """The Trainer running this callback, when known."""
        for ref in (self._bound, self._trainer_ref):
            obj = ref() if ref is not None else None
            if obj is not None:
                return obj
        return None

    # ------------------------------------------------------------------ training start / resume
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        trainer, resume = _find_running_trainer()
        self._trainer_ref = weakref.ref(trainer) if trainer is not None else None
        if trainer is not None and self._bound is not None and self._bound() is not trainer:
            self._bound = None  # bound to another Trainer (a callback reused, e.g. per fold): follow this one
        # The Trainer's own model, not the callback handler's reference: with `model_init`, train() builds a
        # new model and the handler keeps the one built in __init__.
        model = getattr(self.trainer, "model", None)
        if model is None:
            model = kwargs.get("model")
        if model is None:
            raise ValueError("EMATrainerCallback: the Trainer passed no model to on_train_begin")
        self._setup_peers()  # refuses duplicates: before anything is built or changed
        _VERBOSITY.begin(self, self.trainer, args)
        try:
            # An earlier train() that raised during an evaluation (an error, a KeyboardInterrupt) left this EMA in
            # the model and the training weights inside the EMA: put them back before anything reads the model.
            self._ensure_training_weights("a new training run (the last one stopped during an evaluation)")
            self._evals_pending = 0
            total = self.total_steps
            if total is None and state.max_steps and state.max_steps > 0:
                total = int(state.max_steps)
            # A primary listed before this callback may hold its EMA in the model already (eval_on_start).
            with self._training_weights_in():
                batch = self.ema_kwargs.get("batch_size") or self._trainer_batch_size(args)
                self.ema = EMAState(
                    model, **{**self.ema_kwargs, "total_steps": total, "batch_size": batch}, name=self.name
                )
                logger.info(
                    "EMA%s built: decay=%s, decay_type=%s, update_every=%d, %d tensors (%.1f MiB)%s",
                    self._label(),
                    self.ema.decay,
                    self.ema.decay_type,
                    self.ema.update_every,
                    len(self.ema.names),
                    self.ema.num_bytes() / 2**20,
                    self._role(),
                )
                self._saved_at_step = None
                if state.global_step > 0:
                    self._restore_for_resume(args, state, resume)
            self._log_horizon()
            self._warn_long_horizon(state)
            self._set_log_hook(installed=True)
            self._training = True
            if getattr(args, "eval_on_start", False) and self._is_primary:
                self._swap_in_for_eval()
        except BaseException:
            _VERBOSITY.end(self)
            raise

    # ------------------------------------------------------------------ several EMAs
    def _label(self) -> str:
        return "" if self.name is None else f" {self.name!r}"

    def _role(self) -> str:
        if len(self._peers) < 2:
            return ""
        if self._is_primary:
            return "; primary: the Trainer's evaluations use it"
        if self.evaluate:
            return f"; secondary: evaluated after each evaluation as {self.eval_prefix}_*"
        return "; secondary, not evaluated (evaluate=False)"

    def _setup_peers(self) -> None:
        """Find the EMA callbacks of this Trainer, refuse duplicates, and choose the primary."""
        handler = getattr(self.trainer, "callback_handler", None)
        callbacks = getattr(handler, "callbacks", None)
        emas = (
            [c for c in callbacks if isinstance(c, EMATrainerCallback)] if isinstance(callbacks, list) else []
        )
        if not any(c is self for c in emas):  # driven by hand, or bound to a Trainer that does not list it
            emas = [self]
        times = Counter(id(c) for c in emas)[id(self)]
        if times > 1:
            raise ValueError(
                f"The EMATrainerCallback{self._label()} object is listed {times} times in the Trainer's callbacks: "
                f"it would update its EMA {times} times per optimizer step. List each callback once; for several "
                "EMAs use several callbacks, each with its own `name=`."
            )
        names = Counter(c.name for c in emas)
        clash = [n for n, k in names.items() if k > 1]
        if clash:
            which = "without a name" if clash[0] is None else f"named {clash[0]!r}"
            raise ValueError(
                f"{names[clash[0]]} EMATrainerCallbacks {which} in one Trainer: they would write the same "
                f"`{ema_dirname(clash[0])}` folder in each checkpoint. Give each its own `name=` (e.g. "
                "name='slow'); the unnamed one is the primary, which the Trainer's evaluations use."
            )
        primary = next((c for c in emas if c.name is None), emas[0])
        prefixes = ["eval"] + ([primary.raw_prefix] if primary.eval_both else [])
        prefixes += [c.eval_prefix for c in emas if c is not primary and c.evaluate and c.eval_prefix]
        same = sorted(p for p, k in Counter(prefixes).items() if k > 1)
        if same:
            raise ValueError(
                f"Metric prefix {same[0]!r} is used by two evaluations (the Trainer's 'eval', the primary's "
                "`raw_prefix` with eval_both, and each named EMA's `eval_prefix`): their metrics would overwrite "
                "each other. Give each EMATrainerCallback its own `eval_prefix`."
            )
        self._peers = [weakref.ref(c) for c in emas]
        self._is_primary = primary is self
        if not self._is_primary and self.eval_both:
            logger.warning(
                "EMATrainerCallback%s: eval_both=True is ignored; the primary EMA's evaluations (the unnamed "
                "callback's) decide whether the training weights are evaluated too.",
                self._label(),
            )
        if self._is_primary and self.name is not None and len(emas) > 1:
            logger.info(
                "EMATrainerCallback%s is the primary EMA (no unnamed one; it is listed first): the Trainer's "
                "evaluations (eval_*) use it%s.",
                self._label(),
                f"; eval_prefix={self.eval_prefix!r} is not used" if self.eval_prefix else "",
            )

    def _peer_callbacks(self) -> list[EMATrainerCallback]:
        return [c for c in (ref() for ref in self._peers) if c is not None]

    def _training_weights_in(self) -> contextlib.AbstractContextManager[None]:
        """The training weights in the model for the block: another EMA callback holding its EMA in the model
        for a due evaluation (the primary, listed before this one) is swapped out, then back in, bitwise."""
        return training_weights_in(c for c in self._peer_callbacks() if c is not self)

    def _warn_long_horizon(self, state: TrainerState) -> None:
        """Warn once per run when the EMA averages over more optimizer steps than the run has.

        The averaging horizon is ``N / (1 - decay**N)`` optimizer steps (``N = update_every``; ``1 / (1 - decay)``
        for ``N = 1``): the age, in steps, at which a weight's share in the EMA has fallen by the factor e. When it
        exceeds ``max_steps``, a constant-decay EMA still holds more than ``exp(-1)`` (37%) of the initial weights
        at the end; warm-up schedules (threshold, exp) shrink that share but still average over most of the run,
        early weights included, and never reach the decay that was asked for.
        """
        assert self.ema is not None
        if not getattr(self.ema.schedule, "uses_decay", True):  # e.g. BEMA: `decay` is not used
            return
        max_steps = int(getattr(state, "max_steps", 0) or 0)
        n, decay = self.ema.update_every, self.ema.decay
        h = self.ema.horizon()  # with reference_batch_size: at decay ** (B / B_ref) per optimizer step
        horizon = h["steps"]
        if max_steps <= 0 or horizon <= max_steps:
            return
        detail = ""
        if self.ema.decay_type == "constant":
            share = h["applied_decay"] ** (max_steps // n)
            detail = f" (with this constant decay the initial weights keep {share:.0%} of the final EMA)"
        # The decay to ask for, at the reference batch when there is one: (per-step decay) ** (B_ref / B).
        kappa = h["batch_size"] / h["reference_batch_size"] if h["reference_batch_size"] else 1.0
        hint = ""
        if max_steps >= 20:
            hint = f", e.g. decay={(1 - 10 / max_steps) ** (1 / kappa):.4g} (horizon max_steps/10)"
        logger.warning(
            "EMA%s: decay=%s%s averages over about %d optimizer steps, more than this run's max_steps=%d: at the "
            "end the EMA still leans on the early weights%s. Choose a decay whose horizon 1/(1-decay) is well "
            "below max_steps%s.",
            self._label(),
            decay,
            f" with update_every={n}" if n > 1 else "",
            round(horizon),
            max_steps,
            detail,
            hint,
        )

    def _trainer_batch_size(self, args: TrainingArguments) -> int | None:
        """The Trainer's effective batch: samples per optimizer step over all data-parallel processes.

        ``Trainer.get_total_train_batch_size(args)`` where it exists (transformers >= 4.57: it divides out tensor,
        context and sequence parallelism and follows ``auto_find_batch_size``), else
        ``args.train_batch_size x args.gradient_accumulation_steps x args.world_size``.
        """
        trainer = self.trainer
        get_total = getattr(trainer, "get_total_train_batch_size", None)
        try:
            if callable(get_total):
                return int(get_total(args))
            return int(args.train_batch_size * args.gradient_accumulation_steps * args.world_size)
        except (AttributeError, TypeError, ValueError):
            return None

    def _log_horizon(self) -> None:
        """One INFO line at train start: the EMA's horizon at its maximum decay, in optimizer steps and samples."""
        if self.ema is None:
            return
        h = self.ema.horizon()
        parts = [f"decay {h['decay']:.6g}"]
        if h["reference_batch_size"] is not None:
            parts.append(
                f"{h['step_decay']:.6g} per optimizer step at batch {h['batch_size']} "
                f"(reference batch {h['reference_batch_size']})"
            )
        if h["update_every"] > 1:
            parts.append(f"{h['applied_decay']:.6g} applied every {h['update_every']} steps")
        samples = "" if h["samples"] is None else f" = {h['samples']:.6g} samples"
        logger.info(
            "EMA horizon 1/(1 - decay): %.6g optimizer steps%s (%s)", h["steps"], samples, "; ".join(parts)
        )

    def _set_log_hook(self, installed: bool) -> None:
        """Put the ``ema_decay`` log hook at the head of the Trainer's callback list, or take it out."""
        handler = getattr(self.trainer, "callback_handler", None)
        callbacks = getattr(handler, "callbacks", None)
        if not isinstance(callbacks, list):
            return  # no Trainer found: on_log below still adds the decay, for the callbacks after this one
        others = [c for c in callbacks if not (isinstance(c, _EMADecayLog) and c.owned_by(self))]
        # Assign a new list: the handler is iterating over the current one while it calls this event.
        handler.callbacks = [_EMADecayLog(self), *others] if installed else others

    def _restore_for_resume(self, args: TrainingArguments, state: TrainerState, resume: str | None) -> None:
        assert self.ema is not None
        step = int(state.global_step)
        candidates = [
            resume,
            args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None,
            os.path.join(args.output_dir, f"{_PREFIX_CHECKPOINT_DIR}-{step}") if args.output_dir else None,
        ]
        checkpoint = None
        for c in candidates:
            if c and os.path.isdir(c) and _checkpoint_step(c) in (step, None):
                checkpoint = c
                break
        # has_ema also finishes a save that a killed process left complete but not renamed into place.
        if checkpoint is not None and has_ema(checkpoint, self.name):
            self.ema.load(checkpoint)  # its own folder (ema_net / ema_net-<name>): state from the file, settings from here
            logger.info(
                "EMA%s restored from %s (EMA step %d)",
                self._label(),
                os.path.join(checkpoint, ema_dirname(self.name)),
                self.ema.step,
            )
            return
        # Without a usable ema_net the EMA of the first `step` steps is gone: never continue quietly.
        dirname = ema_dirname(self.name)
        ema_dir = os.path.join(checkpoint, dirname) if checkpoint else None
        if checkpoint is None:
            problem = f"its folder was not found (looked for {[c for c in candidates if c]})"
        elif os.path.isdir(ema_dir):
            lacking = [f for f in (WEIGHTS_NAME, STATE_NAME) if not os.path.isfile(os.path.join(ema_dir, f))]
            problem = f"its `{dirname}` folder is incomplete (it lacks {', '.join(lacking)})"
        else:
            problem = f"it has no `{dirname}` folder"
        where = repr(checkpoint) if checkpoint else "the checkpoint"
        if not self.allow_ema_restart:
            raise EMAFileError(
                f"Resuming from {where} at step {step}, but its EMA cannot be restored: {problem}. Most likely the "
                "process was killed while saving that checkpoint (the Trainer writes its own files first, then the "
                "EMA), or the run that wrote it kept no EMA. To keep the exact EMA, delete that checkpoint and resume "
                "from the previous one; to restart the EMA from this checkpoint's weights instead, pass "
                "allow_ema_restart=True to EMATrainerCallback (--ema_allow_restart)."
            )
        logger.warning(
            "Resuming from %s at step %d without its EMA (%s): allow_ema_restart=True, so the EMA restarts from the "
            "loaded weights.",
            where,
            step,
            problem,
        )
        # Keep the schedule aligned with the optimizer steps already taken.
        self.ema.skip_to(step)

    # ------------------------------------------------------------------ per step
    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.ema is None:
            return
        self._ensure_training_weights("the EMA update")
        optimizer = kwargs.get("optimizer")
        if not getattr(optimizer, "step_was_skipped", False):
            if len(self._peers) > 1:
                with self._training_weights_in():
                    self.ema.update()
            else:
                self.ema.update()
        self._drop_stale_ema_net(args, state, control)
        if control.should_evaluate and self._is_primary:
            self._swap_in_for_eval()

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.ema is not None:
            self._drop_stale_ema_net(args, state, control)
        if control.should_evaluate and self._is_primary:
            self._swap_in_for_eval()

    def _drop_stale_ema_net(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        """Before the Trainer writes ``checkpoint-N`` (``should_save`` is set by then), delete this EMA's folder that
        an earlier run left in that folder of a reused ``output_dir``: a process killed after the Trainer rewrote
        its files and before :meth:`on_save` wrote the new EMA would otherwise leave the earlier run's EMA to be
        resumed from, silently. With it gone, such a resume stops with the missing-EMA error instead."""
        if not control.should_save or not state.is_world_process_zero or not args.output_dir:
            return
        if getattr(self.trainer, "hp_search_backend", None) is not None:
            return  # trial folders: on_save finds the right one after the Trainer wrote it
        checkpoint = os.path.join(args.output_dir, f"{_PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(checkpoint):
            remove_ema_dir(checkpoint, ema_dirname(self.name))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        self._add_decay_to_logs(state, logs)

    def _add_decay_to_logs(self, state: TrainerState, logs: dict[str, float] | None) -> None:
        """Add the decay of the last update to a training log (one with ``loss``) and to its ``log_history``
        entry; idempotent, as both this callback and its log hook call it.

        ``ema_decay`` is the schedule's per-step decay ``d`` of the last optimizer step; with ``update_every = N >
        1`` the EMA averages every N-th step with ``D = interval_decay(...)`` (``d**N`` by default), logged as
        ``ema_decay_applied`` (that of the last averaging; absent before the first one). A named EMA logs
        ``ema_<name>_decay`` and ``ema_<name>_decay_applied``.
        """
        if self.ema is None or self.ema.last_decay is None or not logs or "loss" not in logs:
            return
        added = {self._decay_key: self.ema.last_decay}
        applied = getattr(self.ema, "last_applied_decay", None)
        if self.ema.update_every > 1 and applied is not None:
            added[f"{self._decay_key}_applied"] = applied
        logs.update(added)
        if state.log_history:
            last = state.log_history[-1]
            if last.get("step") == state.global_step and last.get("loss") == logs["loss"]:
                last.update(added)

    # ------------------------------------------------------------------ evaluation
    def _eval_ema(self) -> EMAState | None:
        return self.ema

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._in_nested_eval or not self._evals_pending or self.ema is None:
            return  # not an evaluation we prepared (e.g. a user's trainer.evaluate(), or a nested one)
        self._evals_pending -= 1
        if self._evals_pending:
            return
        self.ema.swap()  # training weights back, bitwise, before the checkpoint and the next step
        if metrics is None:
            return
        if self.eval_both:
            self._nested_evaluate(self.raw_prefix, metrics, None)
        for other in self._peer_callbacks():  # the secondary EMAs, each inside its own average_parameters()
            if other is not self and other.evaluate and other.ema is not None and other.eval_prefix:
                self._nested_evaluate(other.eval_prefix, metrics, other.ema)

    def _nested_evaluate(self, prefix: str, metrics: dict[str, float], ema: EMAState | None) -> None:
        """``trainer.evaluate(metric_key_prefix=prefix)`` on the training weights (``ema=None``) or inside
        ``ema.average_parameters()``; its metrics join ``metrics`` (the evaluation logs them itself too)."""
        trainer = self.trainer
        if trainer is None:
            if not self._warned_no_trainer:
                logger.warning(
                    "eval_both=True needs the Trainer, which was not found; call callback.bind(trainer)."
                )
                self._warned_no_trainer = True
            return
        self._in_nested_eval = True
        try:
            with (
                _random_states_kept(),
                ema.average_parameters() if ema is not None else contextlib.nullcontext(),
            ):
                out = trainer.evaluate(metric_key_prefix=prefix)
        finally:
            self._in_nested_eval = False
        metrics.update({k: v for k, v in out.items() if k.startswith(f"{prefix}_")})

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_dir(self, args: TrainingArguments, state: TrainerState) -> str | None:
        """The folder the Trainer has just written for this step: ``output_dir/checkpoint-N``, or during a
        hyper-parameter search ``output_dir/<run-name>/checkpoint-N`` (the newest such folder; a stale
        ``output_dir/checkpoint-N`` of an earlier run is not taken for it)."""
        name = f"{_PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        direct = os.path.join(args.output_dir, name)
        trainer = self.trainer
        searching = trainer is not None and getattr(trainer, "hp_search_backend", None) is not None
        if not searching and (trainer is not None or os.path.isdir(direct)):
            return direct if os.path.isdir(direct) else None
        found = [
            p for p in glob.glob(os.path.join(glob.escape(args.output_dir), "*", name)) if os.path.isdir(p)
        ]
        return max(found, key=os.path.getmtime) if found else None

    def on_push_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # With `push_to_hub`, the Trainer uploads each checkpoint from inside `_save_checkpoint`, after writing it
        # and before `on_save`: write `ema_net` now, so the pushed checkpoint (e.g. `last-checkpoint`, which
        # training resumes from) carries the EMA. Only the main process gets this event. Outside train() (e.g.
        # `trainer.push_to_hub()` afterwards, when the EMA may be the best checkpoint's) nothing is written: the
        # checkpoints already hold their own `ema_net`.
        if self.ema is None or not self._training or self._evals_pending:
            return
        path = self._checkpoint_dir(args, state)
        if path is None:
            return
        if self.ema.is_sharded:  # gathering needs every rank: left to on_save
            if not self._warned_push:
                logger.warning(
                    "EMATrainerCallback: checkpoints pushed to the Hub carry no `%s` with a sharded model (gathering "
                    "it needs every process; the Trainer pushes from the main one); local checkpoints have it.",
                    ema_dirname(self.name),
                )
                self._warned_push = True
            return
        logger.info("EMA%s saved to %s", self._label(), self.ema.save(path))
        self._saved_at_step = state.global_step

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.ema is None:
            return
        if self._saved_at_step == state.global_step:  # written by on_push_begin (main process, unsharded EMA)
            self._saved_at_step = None
            return
        if self._evals_pending:
            logger.warning(
                "EMATrainerCallback: the EMA weights were in the model while checkpoint-%d was written (an "
                "announced evaluation did not run); its regular weights are the EMA's.",
                state.global_step,
            )
            self._ensure_training_weights("saving the EMA")
        path = self._checkpoint_dir(args, state)
        if path is None and state.is_world_process_zero:
            logger.warning(
                "EMATrainerCallback: checkpoint folder for step %d not found under %s; ema_net not written.",
                state.global_step,
                args.output_dir,
            )
            self.ema.ema_state_dict()  # still join the gathers that other ranks run in save()
            self.ema._bias_files()  # (BEMA's uncorrected EMA and theta_0; nothing otherwise)
            return
        saved = self.ema.save(
            path or os.path.join(args.output_dir, f"{_PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        )
        if state.is_world_process_zero:
            logger.info("EMA%s saved to %s", self._label(), saved)

    # ------------------------------------------------------------------ end of training
    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._set_log_hook(installed=False)
        self._training = False
        self._saved_at_step = None
        try:
            self._finish_training(args, state)
        finally:
            _VERBOSITY.end(self)

    def _finish_training(self, args: TrainingArguments, state: TrainerState) -> None:
        if self.ema is None:
            return
        self._ensure_training_weights("the end of training")
        if not self._is_primary:  # a secondary EMA keeps its last value; the model is the primary's business
            return
        best = state.best_model_checkpoint
        dirname = ema_dirname(self.name)
        if args.load_best_model_at_end and best:
            if has_ema(best, self.name):
                self.ema.load(best)
                logger.info(
                    "EMA%s of the best checkpoint loaded from %s", self._label(), os.path.join(best, dirname)
                )
            else:
                logger.warning(
                    "load_best_model_at_end: the best checkpoint %s has no `%s`; keeping the last EMA.",
                    best,
                    dirname,
                )
        if self.replace_at_end:
            self.ema.copy_to()
