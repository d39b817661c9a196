"""``PostHocEMACallback``: post-hoc EMA (EDM2) for the Hugging Face ``Trainer``.

The callback holds no EMA math: it drives a :class:`hf_ema.PostHocEMA` from the Trainer's events, and the EMA length
is chosen after training with :func:`hf_ema.synthesize`. Why these events (the same analysis as
:mod:`hf_ema.callback`, whose notes on the Trainer's event order apply here too):

* ``on_train_begin`` fires after ``accelerator.prepare`` (DDP/FSDP wrapping) and after a resumed checkpoint was
  loaded: the profiles are built here, from the model the optimizer updates. When resuming, they are restored from
  ``<checkpoint>/posthoc_ema/``, and the run folder's manifest is cut back to that checkpoint's step (snapshots the
  interrupted run wrote later are deleted), so the resumed run writes no duplicate or stale snapshot.
* ``on_step_end`` fires once per optimizer step (gradient accumulation included): one update of every profile, and
  a snapshot every ``snapshot_every`` steps. Steps the optimizer reports as skipped (fp16 overflow) are not counted.
* ``on_save`` fires after ``checkpoint-N`` is written: the profiles' state goes into ``checkpoint-N/posthoc_ema/``
  (pending snapshot files are written first, so the manifest then lists every snapshot up to step ``N``).
* ``on_train_end``: a last snapshot when the run stopped between snapshots (early stopping), then the writer is
  flushed and stopped.

Evaluation: by default the Trainer evaluates the training weights (or, with an :class:`~hf_ema.EMATrainerCallback`
in the same Trainer, that callback's EMA). ``evaluate_sigma_rel`` makes one of the tracked profiles the weights the
Trainer evaluates (swapped in after the update of a step that is evaluated, swapped back bitwise in
``on_evaluate``), which costs nothing beyond the profiles already kept.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import tempfile
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .callback import (
    _PREFIX_CHECKPOINT_DIR,
    _VERBOSITY,
    EMATrainerCallback,
    _checkpoint_step,
    _EvalSwap,
    _find_running_trainer,
    training_weights_in,
)
from .posthoc import STATE_DIRNAME, STATE_NAME, PostHocEMA, PostHocError

if TYPE_CHECKING:
    from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

    from .args import EMAArguments
    from .state import EMAState

__all__ = ["PostHocEMACallback"]

logger = logging.getLogger(__name__)

DEFAULT_RUN_DIRNAME = "posthoc"


class PostHocEMACallback(_EvalSwap):
    """Post-hoc EMA during ``Trainer.train()``: track power-function EMA profiles, write snapshots of them, and
    choose the EMA length afterwards with :func:`hf_ema.synthesize`.

    Each profile ``i`` (``gamma_i`` from ``sigma_rels[i]``, EDM2 Eq. 126) is an fp32 EMA next to the parameters (per
    shard under FSDP2/ZeRO-3, with no collective per step) updated after optimizer step ``t`` (1-based) with
    ``ema <- beta * ema + (1 - beta) * theta_t``, ``beta = (1 - 1/t)**(gamma_i + 1)``: the EMA at step ``t`` weighs
    the weights seen at time ``tau`` by ``p_t(tau) = (gamma_i + 1) tau**gamma_i / t**(gamma_i + 1)``. Every
    ``snapshot_every`` optimizer steps (and at the last step) each profile is written, in ``snapshot_dtype``, by a
    background thread to ``run_dir/snapshots/`` and listed in ``run_dir/manifest.json``. Afterwards
    ``synthesize(run_dir, sigma_rel=[...])`` rebuilds the EMA of any width (least-squares fit of its profile by the
    snapshots' profiles, EDM2 Algorithm 3).

    Disk: ``len(sigma_rels) * (max_steps / snapshot_every) * bytes per snapshot`` (``bytes per snapshot`` = the
    model's parameter count times 2 for bfloat16, 4 for float32).

    Checkpoints: ``checkpoint-N/posthoc_ema/`` holds each profile (``profile-<i>/ema_net``, loadable with
    ``hf_ema.load_model(cls, "checkpoint-N/posthoc_ema/profile-1")``) and ``posthoc_state.json``; resuming from
    ``checkpoint-N`` restores them exactly and removes the snapshots of the interrupted run after step ``N``. A
    resumed run needs that folder: a checkpoint without it is refused (``PostHocError``) before any step, since the
    profiles cannot be rebuilt from one set of weights. A new (not resumed) run into a ``run_dir`` that already lists
    snapshots is refused too: use a new ``run_dir`` or delete the old one.

    With an :class:`~hf_ema.EMATrainerCallback` in the same Trainer both work side by side: the EMA callback drives
    the evaluations, and the profiles always average the training weights (an EMA swapped in for an evaluation is
    swapped out around the profiles' update). ``evaluate_sigma_rel`` instead lets one profile drive the evaluations;
    then no ``EMATrainerCallback`` may be in the Trainer (both would put their weights in the model). The model keeps
    the training weights at the end of training either way (choose and load the EMA after synthesis).

    Args:
        sigma_rels: Relative widths of the tracked profiles, at least two, each in (0, 1/sqrt(12)) (default EDM2's
            0.05 and 0.10).
        snapshot_every: An int: every that many optimizer steps; or a float in (0, 1): that fraction of
            ``max_steps`` (default 0.05: 20 snapshots per profile). ``1.0`` means one snapshot, at the end.
        snapshot_dtype: Floating dtype of the snapshot files: ``"bfloat16"`` (default), ``"float16"`` or
            ``"float32"`` (the profiles themselves are always fp32).
        run_dir: Folder of the snapshots and manifest; default ``<output_dir>/posthoc``.
        total_steps: Planned optimizer steps; default the Trainer's ``max_steps``.
        evaluate_sigma_rel: One of ``sigma_rels``: the Trainer's evaluations use that profile (metrics ``eval_*``).
        update_every: Average every N-th optimizer step only (the profile stays the same, ``dt = N``);
            ``snapshot_every`` must be a multiple of it.
        layout: Sharded models: ``"gathered"`` (the main process writes full tensors; a gather every snapshot) or
            ``"per_rank"`` (each rank writes its shard; no communication).
        buffers: Floating-point buffers are ``"average"``-d, ``"copy"``-ed or ``"ignore"``-d.
        trainable_only: Track only parameters with ``requires_grad``.
        run_id: Identifier of the run stored in the manifest and every snapshot (default: a random one; a resumed
            run keeps its own).
        max_pending: Snapshots that may wait in host memory for the writer before training waits.

    Raises:
        ValueError: A bad argument (named in the message), here, before any training step.

    Example:
        >>> from hf_ema import PostHocEMACallback, synthesize
        >>> cb = PostHocEMACallback(sigma_rels=(0.05, 0.10), snapshot_every=0.05)
        >>> # trainer = Trainer(model, args, train_dataset=..., callbacks=[cb]); trainer.train()
        >>> # results = synthesize(f"{args.output_dir}/posthoc", sigma_rel=[0.03, 0.08, 0.15])
        >>> cb.posthoc is None  # built when training starts
        True
    """

    def __init__(
        self,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        *,
        snapshot_every: int | float = 0.05,
        snapshot_dtype: torch.dtype | str = "bfloat16",
        run_dir: str | os.PathLike | None = None,
        total_steps: int | None = None,
        evaluate_sigma_rel: float | None = None,
        update_every: int = 1,
        layout: str = "gathered",
        buffers: str = "average",
        trainable_only: bool = False,
        run_id: str | None = None,
        max_pending: int = 2,
    ) -> None:
        if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence):
            raise ValueError(
                f"`sigma_rels` must be a sequence of numbers, e.g. (0.05, 0.10), got {sigma_rels!r}"
            )
        sigma_rels = tuple(sigma_rels)
        if run_dir is not None and not isinstance(run_dir, (str, os.PathLike)):
            raise TypeError(f"`run_dir` must be a path or None, got {type(run_dir).__name__}: {run_dir!r}")
        if not isinstance(trainable_only, bool):
            raise TypeError(f"`trainable_only` must be True or False, got {trainable_only!r}")
        self.posthoc_kwargs: dict[str, Any] = {
            "sigma_rels": sigma_rels,
            "snapshot_every": snapshot_every,
            "snapshot_dtype": snapshot_dtype,
            "update_every": update_every,
            "layout": layout,
            "buffers": buffers,
            "trainable_only": trainable_only,
            "run_id": run_id,
            "max_pending": max_pending,
        }
        # PostHocEMA's own checks on a one-weight stand-in (the model only exists at train start); its run folder
        # is a fresh temporary path that nothing is written to (files appear only with the first snapshot).
        probe_dir = Path(tempfile.gettempdir()) / f"hf_ema-probe-{uuid.uuid4().hex}"
        probe = PostHocEMA(
            nn.Linear(1, 1),
            probe_dir,
            **{
                **self.posthoc_kwargs,
                "total_steps": 1000 if total_steps is None else total_steps,
                # no collective here: a drawn run id would be broadcast across processes
                "run_id": "probe" if run_id is None else run_id,
            },
        )
        self.sigma_rels: list[float] = [float(x) for x in sigma_rels]
        del probe
        self._eval_index: int | None = None
        if evaluate_sigma_rel is not None:
            matches = [
                i
                for i, s in enumerate(sigma_rels)
                if isinstance(evaluate_sigma_rel, (int, float))
                and not isinstance(evaluate_sigma_rel, bool)
                and math.isclose(float(s), float(evaluate_sigma_rel), rel_tol=1e-9)
            ]
            if not matches:
                raise ValueError(
                    f"`evaluate_sigma_rel` must be one of the tracked `sigma_rels` {list(sigma_rels)}, got "
                    f"{evaluate_sigma_rel!r}"
                )
            self._eval_index = matches[0]
        self.run_dir_arg = run_dir
        self.total_steps = total_steps
        self.evaluate_sigma_rel = evaluate_sigma_rel
        #: The :class:`hf_ema.PostHocEMA` driven by this callback (``None`` until training starts).
        self.posthoc: PostHocEMA | None = None
        #: The run folder in use (known at train start).
        self.run_dir: Path | None = None
        self._trainer_ref: Any = None
        self._ema_callbacks: list[weakref.ref[EMATrainerCallback]] = []
        self._evals_pending = 0

    @classmethod
    def from_args(cls, args: EMAArguments) -> PostHocEMACallback:
        """Build from parsed :class:`hf_ema.EMAArguments` (``--ema_sigma_rels``, ``--ema_snapshot_every``,
        ``--ema_snapshot_dtype``, ``--ema_posthoc_dir``); its ``ema_posthoc`` flag is not consulted here.

        Example:
            >>> from hf_ema import EMAArguments
            >>> cb = PostHocEMACallback.from_args(EMAArguments(ema_posthoc=True, ema_snapshot_every=500))
            >>> cb.posthoc_kwargs["snapshot_every"]
            500
        """
        if not hasattr(args, "posthoc_callback_kwargs"):
            raise TypeError(f"`args` must be an hf_ema.EMAArguments, got {type(args).__name__}")
        return cls(**args.posthoc_callback_kwargs())

    @property
    def trainer(self) -> Trainer | None:
        """The Trainer running this callback, when known."""
        return self._trainer_ref() if self._trainer_ref is not None else None

    @property
    def eval_profile(self) -> int | None:
        """Index of the profile the Trainer's evaluations use (``evaluate_sigma_rel``), else ``None``."""
        return self._eval_index

    # ------------------------------------------------------------------ training start / resume
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        trainer, resume = _find_running_trainer()
        self._trainer_ref = weakref.ref(trainer) if trainer is not None else None
        model = getattr(trainer, "model", None)
        if model is None:
            model = kwargs.get("model")
        if model is None:
            raise ValueError("PostHocEMACallback: the Trainer passed no model to on_train_begin")
        self._check_peers()  # refuses duplicates before anything is built
        _VERBOSITY.begin(self, trainer, args)  # type: ignore[arg-type]
        try:
            self._evals_pending = 0
            if self.posthoc is not None:
                self.posthoc.close()  # an earlier train() of this callback
            total = self.total_steps
            if total is None and state.max_steps and state.max_steps > 0:
                total = int(state.max_steps)
            if self.run_dir_arg is not None:
                self.run_dir = Path(self.run_dir_arg)
            elif args.output_dir:
                self.run_dir = Path(args.output_dir) / DEFAULT_RUN_DIRNAME
            else:
                raise ValueError("PostHocEMACallback: pass `run_dir=` (the Trainer has no output_dir)")
            # an EMA callback listed before this one may hold its EMA in the model already (eval_on_start)
            with self._training_weights_in():
                self.posthoc = PostHocEMA(
                    model, self.run_dir, **{**self.posthoc_kwargs, "total_steps": total}
                )
            if state.global_step > 0:
                self._restore_for_resume(args, state, resume)
            else:
                self._refuse_used_run_dir()
            ph = self.posthoc
            logger.info(
                "Post-hoc EMA: profiles sigma_rel=%s, a snapshot every %s optimizer steps (%s) to %s%s",
                [round(s, 4) for s in ph.sigma_rels],
                ph.snapshot_every,
                str(ph.snapshot_dtype).replace("torch.", ""),
                ph.run_dir,
                ""
                if self._eval_index is None
                else f"; evaluations use sigma_rel={self.sigma_rels[self._eval_index]}",
            )
            if getattr(args, "eval_on_start", False):
                self._swap_in_for_eval()
        except BaseException:
            _VERBOSITY.end(self)  # type: ignore[arg-type]
            raise

    def _check_peers(self) -> None:
        """Refuse the same callback listed twice and a second post-hoc callback; with ``evaluate_sigma_rel``, an
        EMA callback (both would swap their weights in for the evaluations); remember the EMA callbacks."""
        handler = getattr(self.trainer, "callback_handler", None)
        callbacks = getattr(handler, "callbacks", None)
        callbacks = callbacks if isinstance(callbacks, list) else [self]
        mine = [c for c in callbacks if isinstance(c, PostHocEMACallback)]
        times = sum(c is self for c in mine)
        if times > 1:
            raise ValueError(
                f"The PostHocEMACallback object is listed {times} times in the Trainer's callbacks: it would update "
                f"its profiles {times} times per optimizer step. List it once."
            )
        if len(mine) > 1:
            raise ValueError(
                f"{len(mine)} PostHocEMACallbacks in one Trainer: they would write the same "
                f"`{STATE_DIRNAME}` folder in each checkpoint (and, by default, the same run folder). One callback "
                "tracks any number of profiles: pass all of them as sigma_rels=(...)."
            )
        emas = [c for c in callbacks if isinstance(c, EMATrainerCallback)]
        if emas and self._eval_index is not None:
            raise ValueError(
                f"PostHocEMACallback(evaluate_sigma_rel={self.evaluate_sigma_rel}) and an EMATrainerCallback in one "
                "Trainer: both would put their EMA into the model for the Trainer's evaluations. Drop "
                "`evaluate_sigma_rel` (the EMATrainerCallback's EMA is evaluated) or the EMATrainerCallback."
            )
        self._ema_callbacks = [weakref.ref(c) for c in emas]

    def _refuse_used_run_dir(self) -> None:
        ph = self.posthoc
        assert ph is not None
        manifest = ph._manifest
        if manifest is not None and manifest.entries:
            steps = sorted({e["step"] for e in manifest.entries})
            raise PostHocError(
                f"PostHocEMACallback: {str(manifest.path)!r} already lists {len(manifest.entries)} snapshot(s) "
                f"(steps {steps[:5]}{'...' if len(steps) > 5 else ''}) of run {manifest.data.get('run_id')}, and "
                "this training starts from step 0: a new run would mix its snapshots with those. Delete that "
                "folder, pass another `run_dir`, or resume the run (Trainer.train(resume_from_checkpoint=...))."
            )

    def _restore_for_resume(self, args: TrainingArguments, state: TrainerState, resume: str | None) -> None:
        ph = self.posthoc
        assert ph is not None
        step = int(state.global_step)
        candidates = [
            resume,
            args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None,
            os.path.join(args.output_dir, f"{_PREFIX_CHECKPOINT_DIR}-{step}") if args.output_dir else None,
        ]
        checkpoint = next(
            (c for c in candidates if c and os.path.isdir(c) and _checkpoint_step(c) in (step, None)), None
        )
        if checkpoint is None or not os.path.isfile(os.path.join(checkpoint, STATE_DIRNAME, STATE_NAME)):
            where = repr(checkpoint) if checkpoint else f"any of {[c for c in candidates if c]}"
            raise PostHocError(
                f"PostHocEMACallback: resuming at step {step}, but no `{STATE_DIRNAME}/{STATE_NAME}` was found in "
                f"{where}. The post-hoc profiles average the whole run and cannot be rebuilt from one set of "
                "weights: resume from a checkpoint written with this callback, or start a new run (new run_dir, "
                "no resume)."
            )
        ph.load(checkpoint)
        if ph.step != step:
            logger.warning(
                "Post-hoc EMA restored from %s at its step %d, the Trainer's global_step is %d (skipped optimizer "
                "steps are not counted)",
                checkpoint,
                ph.step,
                step,
            )
        logger.info(
            "Post-hoc EMA restored from %s (step %d)", os.path.join(checkpoint, STATE_DIRNAME), ph.step
        )

    # ------------------------------------------------------------------ per step
    def _training_weights_in(self) -> contextlib.AbstractContextManager[None]:
        """The training weights in the model for the block: an EMA callback holding its EMA in the model for a due
        evaluation (listed before this one) is swapped out, then back in, bitwise."""
        return training_weights_in(ref() for ref in self._ema_callbacks)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.posthoc is None:
            return
        self._ensure_training_weights("the post-hoc EMA update")
        optimizer = kwargs.get("optimizer")
        if not getattr(optimizer, "step_was_skipped", False):
            if self._ema_callbacks:
                with self._training_weights_in():
                    self.posthoc.update()
            else:
                self.posthoc.update()
        if control.should_evaluate:
            self._swap_in_for_eval()

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if control.should_evaluate:
            self._swap_in_for_eval()

    # ------------------------------------------------------------------ evaluation (evaluate_sigma_rel)
    def _eval_ema(self) -> EMAState | None:
        """The profile that ``evaluate_sigma_rel`` picked (None: the Trainer evaluates the training weights)."""
        if self._eval_index is None or self.posthoc is None:
            return None
        return self.posthoc.profiles[self._eval_index]

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self._evals_pending or self.posthoc is None or self._eval_index is None:
            return  # not an evaluation we prepared (e.g. a user's trainer.evaluate())
        self._evals_pending -= 1
        if not self._evals_pending:
            self.posthoc.profiles[self._eval_index].swap()  # training weights back, bitwise

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def _checkpoint_dir(args: TrainingArguments, state: TrainerState) -> str | None:
        """``output_dir/checkpoint-N`` just written, or during a hyper-parameter search the newest
        ``output_dir/<run>/checkpoint-N``."""
        name = f"{_PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        direct = os.path.join(args.output_dir, name)
        if os.path.isdir(direct):
            return direct
        found = [
            p for p in glob.glob(os.path.join(glob.escape(args.output_dir), "*", name)) if os.path.isdir(p)
        ]
        return max(found, key=os.path.getmtime) if found else None

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        ph = self.posthoc
        if ph is None:
            return
        self._ensure_training_weights("saving the post-hoc EMA")
        path = self._checkpoint_dir(args, state)
        if path is None:
            if state.is_world_process_zero:
                logger.warning(
                    "PostHocEMACallback: checkpoint folder for step %d not found under %s; %s not written.",
                    state.global_step,
                    args.output_dir,
                    STATE_DIRNAME,
                )
            for p in ph.profiles:  # still join the gathers that the other ranks run in save()
                if p.is_sharded:
                    p.ema_state_dict()
            return
        saved = ph.save(path)
        if state.is_world_process_zero:
            logger.info("Post-hoc EMA state saved to %s", saved)

    # ------------------------------------------------------------------ end of training
    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        try:
            ph = self.posthoc
            if ph is None:
                return
            self._ensure_training_weights("the end of training")
            if ph._last_avg_step > ph._last_snapshot_step:  # stopped between snapshots (e.g. early stopping)
                ph.snapshot()
            ph.close()
            if state.is_world_process_zero:
                logger.info(
                    "Post-hoc EMA: %d snapshot(s) in %s; choose the EMA length with "
                    "hf_ema.synthesize(%r, sigma_rel=[...])",
                    ph.snapshots_taken,
                    ph.run_dir,
                    str(ph.run_dir),
                )
        finally:
            _VERBOSITY.end(self)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (
            f"PostHocEMACallback(sigma_rels={self.sigma_rels}, "
            f"snapshot_every={self.posthoc_kwargs['snapshot_every']}, run_dir={self.run_dir_arg!r})"
        )
