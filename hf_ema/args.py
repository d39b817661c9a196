"""Command-line arguments for the EMA, in the style of ``TrainingArguments``.

:class:`EMAArguments` is a dataclass that ``transformers.HfArgumentParser`` turns into ``--ema``,
``--ema_decay``, ``--ema_decay_type``, ``--ema_beta``, ``--ema_update_every``, ... flags. Every value is checked
when the dataclass is built (that is, while the command line is parsed), so a bad flag stops the script before
any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .callback import EMATrainerCallback

__all__ = ["EMAArguments"]


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
        default=False, metadata={"help": "Keep an EMA of the model weights and evaluate with it."}
    )
    ema_decay: float = field(
        default=0.9999, metadata={"help": "Maximum EMA decay, strictly between 0 and 1."}
    )
    ema_decay_type: str = field(
        default="constant",
        metadata={
            "help": "Decay schedule: constant, threshold, exp, or a name in hf_ema.EMA_DECAY_FUNCTIONS."
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
        }

    def callbacks(self) -> list[EMATrainerCallback]:
        """``[EMATrainerCallback(...)]`` when ``--ema`` is set, else ``[]``: pass it to ``Trainer(callbacks=...)``."""
        from .callback import EMATrainerCallback

        return [EMATrainerCallback.from_args(self)] if self.ema else []
