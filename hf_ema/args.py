"""Command-line arguments for the EMA, in the style of ``TrainingArguments``.

:class:`EMAArguments` is a dataclass that ``transformers.HfArgumentParser`` turns into ``--ema`` / ``--no_ema``,
``--ema_decay``, ``--ema_decay_type``, ``--ema_beta``, ``--ema_update_every``, ... flags. Every value is checked
when the dataclass is built (that is, while the command line is parsed), so a bad flag stops the script before
any model is loaded.

``--no_ema`` (also ``--no-ema``) is a real flag, so it can switch off an EMA that a script turned on with
``parser.set_defaults(ema=True)``; it is never read as a prefix of ``--no_ema_replace_at_end``. argparse still
accepts unambiguous prefixes of other flags (``--ema_dec`` for ``--ema_decay``); a script that wants to refuse
them passes ``HfArgumentParser(..., allow_abbrev=False)``, as ``examples/train_accelerate.py`` does.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import TrainerCallback

__all__ = ["EMAArguments"]


class _EmaSwitch(argparse.Action):
    """``--ema [BOOL]`` plus its negations ``--no_ema`` / ``--no-ema``, as ONE argparse action.

    HfArgumentParser adds a ``--no_<field>`` flag only to bool fields whose default is True; ``ema`` defaults to
    False, so without this there would be no ``--no_ema`` and argparse's prefix matching would read ``--no_ema``
    as ``--no_ema_replace_at_end`` (the only option starting with it), silently. Passed through the field's
    metadata (HfArgumentParser hands metadata to ``add_argument``), this action registers the negations as option
    strings of the same argument, so they are exact matches and work with any HfArgumentParser, whatever its
    ``allow_abbrev``. HfArgumentParser still supplies ``nargs="?"``, ``const=True`` and its string-to-bool
    ``type``: ``--ema`` -> True, ``--ema false`` -> False, ``--no_ema`` -> False (a value after a negation is
    negated too: ``--no_ema false`` -> True). The last of them on the command line wins.
    """

    NEGATIONS = ("--no_ema", "--no-ema")

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__([*option_strings, *self.NEGATIONS], dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        value = bool(values)  # HfArgumentParser's type already turned "false"/"no"/"0"/... into a bool
        setattr(namespace, self.dest, not value if option_string in self.NEGATIONS else value)


@dataclass
class EMAArguments:
    """EMA options for training scripts; parse them with ``HfArgumentParser((TrainingArguments, EMAArguments))``.

    The EMA after optimizer step ``t`` (1-based: the steps done, including this one) is
    ``ema <- ema * d_t + theta_t * (1 - d_t)`` with ``d_t = schedule(ema_decay, t, total_steps)``; see
    :class:`hf_ema.EMAState`.

    Example:
        >>> from transformers import HfArgumentParser
        >>> (ema_args,) = HfArgumentParser(EMAArguments).parse_args_into_dataclasses(
        ...     ["--ema", "--ema_decay", "0.999", "--ema_decay_type", "exp", "--ema_beta", "10"]
        ... )
        >>> ema_args.ema, ema_args.ema_decay, ema_args.ema_decay_type
        (True, 0.999, 'exp')
        >>> callbacks = ema_args.callbacks()  # [EMATrainerCallback(...)], or [] without --ema
    """

    ema: bool = field(
        default=False,
        metadata={
            "help": "Keep an EMA of the model weights and evaluate with it (--ema / --no_ema, --ema false).",
            "action": _EmaSwitch,
        },
    )
    ema_decay: float = field(
        default=0.9999, metadata={"help": "Maximum EMA decay, strictly between 0 and 1."}
    )
    ema_decay_type: str = field(
        default="constant",
        metadata={
            "help": "Decay schedule: constant, threshold, exp, warmup, power, bema, or a name in hf_ema.EMA_DECAY_FUNCTIONS."
        },
    )
    ema_beta: float = field(default=15.0, metadata={"help": "Sharpness of the `exp` schedule (> 0)."})
    ema_update_every: int = field(
        default=1, metadata={"help": "Average every N optimizer steps (decay raised to the N-th power)."}
    )
    ema_total_steps: int | None = field(
        default=None,
        metadata={"help": "Planned optimizer steps for the schedule; default: the Trainer's max_steps."},
    )
    ema_dtype: str = field(
        default="float32",
        metadata={"help": "EMA precision: float32, float64, bfloat16, float16, or `none` (parameter dtype)."},
    )
    ema_buffers: str = field(
        default="average", metadata={"help": "Floating-point buffers: average, copy or ignore."}
    )
    ema_trainable_only: bool = field(
        default=False, metadata={"help": "Average only parameters with requires_grad (e.g. LoRA adapters)."}
    )
    ema_device: str | None = field(
        default=None,
        metadata={"help": "Keep the EMA on this device (e.g. `cpu`); default: next to the weights."},
    )
    ema_replace_at_end: bool = field(
        default=True, metadata={"help": "Put the EMA weights into the model when training ends."}
    )
    ema_eval_both: bool = field(
        default=False,
        metadata={"help": "Also evaluate the training weights, reported under `ema_raw_prefix`."},
    )
    ema_raw_prefix: str = field(
        default="eval_raw",
        metadata={"help": "Metric prefix of the training weights' evaluation (eval_both)."},
    )
    # Arguments of the `warmup` schedule (timm / diffusers warm-up); None: not passed (the schedule's default).
    ema_warmup_power: float | None = field(
        default=None,
        metadata={
            "help": "`warmup` schedule: warm-up exponent (timm warmup_power, diffusers power); default 2/3."
        },
    )
    ema_inv_gamma: float | None = field(
        default=None,
        metadata={
            "help": "`warmup` schedule: warm-up step scale (timm warmup_gamma, diffusers inv_gamma); default 1."
        },
    )
    ema_min_decay: float | None = field(
        default=None,
        metadata={"help": "`warmup` schedule: lowest decay once averaging has started; default 0."},
    )
    ema_update_after_step: int | None = field(
        default=None,
        metadata={
            "help": "`warmup` schedule: updates after the first that still copy the weights; default 0."
        },
    )
    ema_name: str | None = field(
        default=None,
        metadata={
            "help": "Name of this EMA: its checkpoint folder becomes ema_net-<name> (default: ema_net)."
        },
    )
    # The EMA scaling rule (Busbridge et al. 2023); passed only when set.
    ema_reference_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Effective batch the decay is meant for: each optimizer step applies decay ** (B / this), B = "
            "per-device batch x gradient accumulation x processes, so the horizon in samples is kept."
        },
    )
    ema_time_unit: str = field(
        default="steps",
        metadata={
            "help": "steps: the schedule counts optimizer steps; samples: samples / ema_reference_batch_size."
        },
    )
    ema_strict_batch_size: bool = field(
        default=False,
        metadata={"help": "Refuse to resume an EMA saved with another effective batch size (else: rescale)."},
    )
    ema_allow_restart: bool = field(
        default=False,
        metadata={
            "help": "On resume from a checkpoint without a usable ema_net, restart the EMA (with a warning) "
            "instead of stopping with an error."
        },
    )
    # Arguments of the `power` schedule (decay_type="power"); None: not passed.
    ema_sigma_rel: float | None = field(
        default=None,
        metadata={"help": "`power` schedule: the EMA's width relative to training time, in (0, 0.2887)."},
    )
    ema_gamma: float | None = field(
        default=None,
        metadata={"help": "`power` schedule: its exponent (> 0), instead of --ema_sigma_rel."},
    )
    # Post-hoc EMA (PostHocEMACallback): profiles + snapshots, EMA length chosen after training.
    ema_posthoc: bool = field(
        default=False,
        metadata={"help": "Track post-hoc EMA profiles and write snapshots (choose sigma_rel later)."},
    )
    ema_sigma_rels: list[float] = field(
        default_factory=lambda: [0.05, 0.10],
        metadata={"help": "Post-hoc EMA: widths of the tracked profiles (at least two)."},
    )
    ema_snapshot_every: float = field(
        default=0.05,
        metadata={
            "help": "Post-hoc EMA: snapshot every N optimizer steps (>= 1), or a fraction of training (< 1)."
        },
    )
    ema_snapshot_dtype: str = field(
        default="bfloat16",
        metadata={"help": "Post-hoc EMA: dtype of the snapshot files: bfloat16, float16 or float32."},
    )
    ema_posthoc_dir: str | None = field(
        default=None,
        metadata={"help": "Post-hoc EMA: folder of snapshots and manifest (default: <output_dir>/posthoc)."},
    )
    # Arguments of the `bema` schedule (bias-corrected EMA, hf_ema.bema); None: not passed (the schedule's default).
    ema_ema_power: float | None = field(
        default=None,
        metadata={
            "help": "`bema` schedule: kappa, exponent of the EMA weight (authors' and TRL's ema_power); 0.5."
        },
    )
    ema_eta_power: float | None = field(
        default=None,
        metadata={
            "help": "`bema` schedule: eta, exponent of the bias correction (TRL's bias_power); default 0.2."
        },
    )
    ema_ema_gamma: float | None = field(
        default=None,
        metadata={
            "help": "`bema` schedule: gamma, time scale of the EMA weight (TRL's multiplier); default 1."
        },
    )
    ema_lag: float | None = field(
        default=None,
        metadata={
            "help": "`bema` schedule: rho, virtual age at the start (authors' scaling_lag); default 10."
        },
    )
    ema_update_after: int | None = field(
        default=None,
        metadata={"help": "`bema` schedule: optimizer steps before averaging starts; default 0."},
    )
    ema_min_ema_multiplier: float | None = field(
        default=None,
        metadata={"help": "`bema` schedule: lower bound of the EMA weight; default 1e-4 (paper), 0 (trl)."},
    )
    ema_parameterisation: str | None = field(
        default=None,
        metadata={"help": "`bema` schedule: `paper` (default) or `trl` (TRL BEMACallback's formulas)."},
    )

    def __post_init__(self) -> None:
        # Validation is the callback's own (one place for the rules); it raises ValueError / TypeError with the
        # offending flag's value in the message.
        from .callback import EMATrainerCallback

        try:
            EMATrainerCallback(**self.callback_kwargs())
        except (ValueError, TypeError) as e:
            raise type(e)(f"Invalid EMA arguments: {e}") from e
        if self.ema_posthoc:
            from .posthoc_callback import PostHocEMACallback

            try:
                PostHocEMACallback(**self.posthoc_callback_kwargs())
            except (ValueError, TypeError) as e:
                raise type(e)(f"Invalid post-hoc EMA arguments: {e}") from e

    def callback_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~hf_ema.EMATrainerCallback` these flags stand for."""
        dtype: str | None = self.ema_dtype
        if isinstance(dtype, str) and dtype.lower() in ("none", "null", ""):
            dtype = None
        return {
            "decay": self.ema_decay,
            "decay_type": self.ema_decay_type,
            "beta": self.ema_beta,
            "total_steps": self.ema_total_steps,
            "update_every": self.ema_update_every,
            "dtype": dtype,
            "buffers": self.ema_buffers,
            "trainable_only": self.ema_trainable_only,
            "device": self.ema_device,
            "replace_at_end": self.ema_replace_at_end,
            "eval_both": self.ema_eval_both,
            "raw_prefix": self.ema_raw_prefix,
            **{
                name: value
                for name, value in (
                    ("warmup_power", self.ema_warmup_power),
                    ("inv_gamma", self.ema_inv_gamma),
                    ("min_decay", self.ema_min_decay),
                    ("update_after_step", self.ema_update_after_step),
                    ("name", self.ema_name),
                    ("sigma_rel", self.ema_sigma_rel),
                    ("gamma", self.ema_gamma),
                    ("ema_power", self.ema_ema_power),
                    ("eta_power", self.ema_eta_power),
                    ("ema_gamma", self.ema_ema_gamma),
                    ("lag", self.ema_lag),
                    ("update_after", self.ema_update_after),
                    ("min_ema_multiplier", self.ema_min_ema_multiplier),
                    ("parameterisation", self.ema_parameterisation),
                )
                if value is not None  # given only when set: other schedules refuse these arguments
            },
            **{
                name: value
                for name, value, default in (
                    ("reference_batch_size", self.ema_reference_batch_size, None),
                    ("time_unit", self.ema_time_unit, "steps"),
                    ("strict_batch_size", self.ema_strict_batch_size, False),
                )
                if value is not default and value != default  # given only when set, as the callback's own
            },
            "allow_ema_restart": self.ema_allow_restart,
        }

    def posthoc_callback_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~hf_ema.PostHocEMACallback` these flags stand for.

        ``--ema_snapshot_every`` below 1 is a fraction of training; from 1 on it is a whole number of optimizer
        steps (``500`` or ``500.0``; ``2.5`` is refused).
        """
        every: Any = self.ema_snapshot_every
        if isinstance(every, bool) or not isinstance(every, (int, float)) or not (every > 0):
            raise ValueError(
                f"--ema_snapshot_every must be a number of optimizer steps (>= 1) or a fraction of training in "
                f"(0, 1), got {every!r}"
            )
        if every >= 1:
            if float(every) != int(every):
                raise ValueError(
                    f"--ema_snapshot_every={every!r}: from 1 on it counts optimizer steps and must be a whole "
                    "number (below 1 it is a fraction of training)"
                )
            every = int(every)
        sigma_rels = self.ema_sigma_rels
        if isinstance(sigma_rels, (int, float)):
            sigma_rels = [sigma_rels]
        return {
            "sigma_rels": tuple(sigma_rels),
            "snapshot_every": every,
            "snapshot_dtype": self.ema_snapshot_dtype,
            "run_dir": self.ema_posthoc_dir,
            "total_steps": self.ema_total_steps,
            # not --ema_update_every: it would have to divide --ema_snapshot_every; profiles update every step
            "buffers": self.ema_buffers,
            "trainable_only": self.ema_trainable_only,
        }

    def callbacks(self) -> list[TrainerCallback]:
        """The callbacks these flags ask for, to pass to ``Trainer(callbacks=...)``: ``EMATrainerCallback`` with
        ``--ema`` (it drives the evaluations), ``PostHocEMACallback`` with ``--ema_posthoc``; ``[]`` without either.
        """
        from .callback import EMATrainerCallback

        out: list[TrainerCallback] = [EMATrainerCallback.from_args(self)] if self.ema else []
        if self.ema_posthoc:
            from .posthoc_callback import PostHocEMACallback

            out.append(PostHocEMACallback.from_args(self))
        return out
