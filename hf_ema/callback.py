"""``EMATrainerCallback``: an EMA of the model weights for the Hugging Face ``Trainer``.

The callback holds no EMA math: it drives an :class:`hf_ema.EMAState` from the Trainer's events. After optimizer
step ``t`` (0-based) the EMA becomes ``ema <- ema * d_t + theta_t * (1 - d_t)``, ``d_t = schedule(decay, t, T)``
with ``T`` the Trainer's ``max_steps`` unless ``total_steps`` is given.

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
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import TrainerCallback

from .io import EMA_DIRNAME, STATE_NAME, WEIGHTS_NAME, EMAFileError
from .loading import has_ema
from .schedules import IDecayFunction
from .state import EMAState

if TYPE_CHECKING:
    from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

    from .args import EMAArguments

__all__ = ["EMATrainerCallback"]

logger = logging.getLogger(__name__)

_PREFIX_CHECKPOINT_DIR = "checkpoint"
_TRAINER_STATE_NAME = "trainer_state.json"
_TRAINER_FRAMES = ("_inner_training_loop", "train")
# Keys of a SuperGradients ``ema_params`` dict that are not EMA settings.
_SG_IGNORED_KEYS = ("ema",)


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


def _checkpoint_step(path: str) -> int | None:
    try:
        with open(os.path.join(path, _TRAINER_STATE_NAME), encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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


class EMATrainerCallback(TrainerCallback):
    """Keep an EMA of the model's weights during ``Trainer.train()``; evaluate, checkpoint and finish with it.

    After every optimizer step ``t`` (0-based), ``ema <- ema * d_t + theta_t * (1 - d_t)`` with
    ``d_t = schedule(decay, t, total_steps)`` (``constant``: ``decay``; ``threshold``:
    ``min(decay, (1 + t) / (10 + t))``; ``exp``: ``decay * (1 - exp(-beta * t / total_steps))``). With
    ``update_every = N`` the average runs every N-th step with ``d_t ** N``.

    What it does during ``Trainer.train()``:

    * builds the EMA from the model at the start of training, or restores its state from ``<checkpoint>/ema_net``
      when resuming (the settings stay the ones given here; a difference from the saved ones is logged once); a
      checkpoint without a usable ``ema_net`` stops ``train()`` with an error before any step, unless
      ``allow_ema_restart=True``;
    * updates it once per optimizer step and logs the decay used as ``ema_decay``;
    * evaluates with the EMA weights (``eval_strategy`` steps/epoch and ``eval_on_start``), putting the training
      weights back bitwise before training continues and before the checkpoint's regular weights are written;
      ``eval_both=True`` also reports the training weights' metrics under ``raw_prefix``;
    * writes ``checkpoint-N/ema_net/`` next to every checkpoint (``hf_ema.load_model`` and
      ``AutoModel...from_pretrained(".../ema_net")`` read it);
    * at the end loads the best checkpoint's EMA (``load_best_model_at_end=True``) and, when ``replace_at_end``,
      puts the EMA weights into the model, so ``trainer.save_model()`` / ``trainer.evaluate()`` use them.

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
        allow_ema_restart: bool = False,
        **schedule_kwargs: Any,
    ) -> None:
        for name, value in (
            ("replace_at_end", replace_at_end),
            ("eval_both", eval_both),
            ("trainable_only", trainable_only),
            ("allow_ema_restart", allow_ema_restart),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be True or False, got {type(value).__name__}: {value!r}")
        if not isinstance(raw_prefix, str) or not raw_prefix or raw_prefix == "eval":
            raise ValueError(
                f"`raw_prefix` must be a non-empty metric prefix other than 'eval' (e.g. 'eval_raw'), "
                f"got {raw_prefix!r}"
            )
        if device is not None:
            try:
                torch.device(device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"`device` must be a torch device or None, got {device!r}") from e
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
        # The EMA is built when training starts (it needs the prepared model). Validate every setting now, with
        # EMAState's own checks, on a one-weight stand-in model, so bad input fails before training.
        probe = {**self.ema_kwargs, "device": None, "total_steps": 1 if total_steps is None else total_steps}
        EMAState(nn.Linear(1, 1), **probe)
        self.total_steps = total_steps
        self.replace_at_end = replace_at_end
        self.eval_both = eval_both
        self.raw_prefix = raw_prefix
        self.allow_ema_restart = allow_ema_restart
        #: The :class:`hf_ema.EMAState` driven by this callback (``None`` until training starts).
        self.ema: EMAState | None = None
        self._trainer_ref: Any = None
        self._bound: Any = None
        self._evals_pending = 0
        self._in_raw_eval = False
        self._warned_no_trainer = False
        self._warned_push = False
        self._saved_at_step: int | None = None
        self._training = False

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_params(cls, ema_params: Mapping[str, Any], **overrides: Any) -> EMATrainerCallback:
        """Build from a SuperGradients-style ``ema_params`` dict, e.g. ``{"decay": 0.9999, "decay_type": "exp",
        "beta": 15}``.

        Args:
            ema_params: Keyword arguments of this class; a top-level ``"ema"`` flag is ignored. Keys that are not
                arguments of this class go to the schedule's constructor, as in SuperGradients.
            **overrides: Take precedence over ``ema_params`` (e.g. ``replace_at_end=False``).

        Example:
            >>> cb = EMATrainerCallback.from_params({"decay": 0.999, "decay_type": "threshold"})
            >>> cb.ema_kwargs["decay_type"]
            'threshold'
        """
        if not isinstance(ema_params, Mapping):
            raise TypeError(f"`ema_params` must be a dict, got {type(ema_params).__name__}: {ema_params!r}")
        params = {k: v for k, v in ema_params.items() if k not in _SG_IGNORED_KEYS}
        bad = [k for k in params if not isinstance(k, str)]
        if bad:
            raise TypeError(f"`ema_params` keys must be strings, got {bad!r}")
        params.update(overrides)
        return cls(**params)

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
        # The Trainer's own model, not the callback handler's reference: with `model_init`, train() builds a
        # new model and the handler keeps the one built in __init__.
        model = getattr(self.trainer, "model", None)
        if model is None:
            model = kwargs.get("model")
        if model is None:
            raise ValueError("EMATrainerCallback: the Trainer passed no model to on_train_begin")
        self._evals_pending = 0
        total = self.total_steps
        if total is None and state.max_steps and state.max_steps > 0:
            total = int(state.max_steps)
        self.ema = EMAState(model, **{**self.ema_kwargs, "total_steps": total})
        self._saved_at_step = None
        if state.global_step > 0:
            self._restore_for_resume(args, state, resume)
        self._set_log_hook(installed=True)
        self._training = True
        if getattr(args, "eval_on_start", False):
            self._swap_in_for_eval()

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
        # has_ema also finishes a save of ema_net that a killed process left complete but not renamed into place.
        if checkpoint is not None and has_ema(checkpoint):
            self.ema.load(checkpoint)  # the state from the file, the settings from this callback
            logger.info(
                "EMA restored from %s (EMA step %d)", os.path.join(checkpoint, EMA_DIRNAME), self.ema.step
            )
            return
        # Without a usable ema_net the EMA of the first `step` steps is gone: never continue quietly.
        ema_dir = os.path.join(checkpoint, EMA_DIRNAME) if checkpoint else None
        if checkpoint is None:
            problem = f"its folder was not found (looked for {[c for c in candidates if c]})"
        elif os.path.isdir(ema_dir):
            lacking = [f for f in (WEIGHTS_NAME, STATE_NAME) if not os.path.isfile(os.path.join(ema_dir, f))]
            problem = f"its `{EMA_DIRNAME}` folder is incomplete (it lacks {', '.join(lacking)})"
        else:
            problem = f"it has no `{EMA_DIRNAME}` folder"
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
    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._ensure_training_weights("the next training step")

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._ensure_training_weights("the next epoch")

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.ema is None:
            return
        self._ensure_training_weights("the EMA update")
        optimizer = kwargs.get("optimizer")
        if not getattr(optimizer, "step_was_skipped", False):
            self.ema.update()
        if control.should_evaluate:
            self._swap_in_for_eval()

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if control.should_evaluate:
            self._swap_in_for_eval()

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
        entry; idempotent, as both this callback and its log hook call it."""
        if self.ema is None or self.ema.last_decay is None or not logs or "loss" not in logs:
            return
        logs["ema_decay"] = self.ema.last_decay
        if state.log_history:
            last = state.log_history[-1]
            if last.get("step") == state.global_step and last.get("loss") == logs["loss"]:
                last["ema_decay"] = self.ema.last_decay

    # ------------------------------------------------------------------ evaluation
    def _num_eval_datasets(self) -> int:
        trainer = self.trainer
        eval_dataset = getattr(trainer, "eval_dataset", None) if trainer is not None else None
        return len(eval_dataset) if isinstance(eval_dataset, dict) and eval_dataset else 1

    def _swap_in_for_eval(self) -> None:
        if self.ema is None or self._evals_pending:
            return
        self.ema.swap()
        self._evals_pending = self._num_eval_datasets()

    def _ensure_training_weights(self, before: str) -> None:
        if self._evals_pending and self.ema is not None:
            logger.warning(
                "EMATrainerCallback: an evaluation was due but did not run; training weights restored before %s.",
                before,
            )
            self.ema.swap()
            self._evals_pending = 0

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._in_raw_eval or not self._evals_pending or self.ema is None:
            return  # not an evaluation we prepared (e.g. a user's trainer.evaluate())
        self._evals_pending -= 1
        if self._evals_pending:
            return
        self.ema.swap()  # training weights back, bitwise, before the checkpoint and the next step
        if self.eval_both and metrics is not None:
            self._evaluate_raw(metrics)

    def _evaluate_raw(self, metrics: dict[str, float]) -> None:
        trainer = self.trainer
        if trainer is None:
            if not self._warned_no_trainer:
                logger.warning(
                    "eval_both=True needs the Trainer, which was not found; call callback.bind(trainer)."
                )
                self._warned_no_trainer = True
            return
        self._in_raw_eval = True
        try:
            raw = trainer.evaluate(metric_key_prefix=self.raw_prefix)
        finally:
            self._in_raw_eval = False
        metrics.update({k: v for k, v in raw.items() if k.startswith(self.raw_prefix)})

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
                    EMA_DIRNAME,
                )
                self._warned_push = True
            return
        self.ema.save(path)
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
            self.ema.ema_state_dict()  # still join the gather that other ranks run in save()
            return
        self.ema.save(path or os.path.join(args.output_dir, f"{_PREFIX_CHECKPOINT_DIR}-{state.global_step}"))

    # ------------------------------------------------------------------ end of training
    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._set_log_hook(installed=False)
        self._training = False
        self._saved_at_step = None
        if self.ema is None:
            return
        self._ensure_training_weights("the end of training")
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best:
            if has_ema(best):
                self.ema.load(best)
                logger.info("EMA of the best checkpoint loaded from %s", os.path.join(best, EMA_DIRNAME))
            else:
                logger.warning(
                    "load_best_model_at_end: the best checkpoint %s has no `%s`; keeping the last EMA.",
                    best,
                    EMA_DIRNAME,
                )
        if self.replace_at_end:
            self.ema.copy_to()
