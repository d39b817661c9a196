"""BEMA, the bias-corrected EMA: its decay schedule and the read rule that the engine applies when it is read.

Source: A. Block, C. Zhang, "EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes", arXiv:2508.00180
(2025). The formulas and the step conventions below were read from the authors' code, abblock/bema at commit
``b98e6337c00d435dd1a20ad7a9b8edf7ac6b3622`` (``src/core_offline.py``: ``BEMA.update``, ``get_ema_weights``,
``get_ema_time``, ``get_stabilizer_time``, ``get_bema_correction_weights``; ``src/run_eval.py``, which drives it;
``hydra_configs/stabilizer/bema.yaml``), and from TRL's ``BEMACallback`` (huggingface/trl at
``f2cd57710ae345ea6428ae95363267fcf38a3dc8``, ``trl/trainer/callbacks.py``). No code was taken from either.

The estimate, with ``theta_t`` the training weights after optimizer step ``t`` and ``theta_0`` the weights when
averaging starts::

    BEMA_t = EMA_t + alpha_t * (theta_t - theta_0)
    EMA    <- (1 - beta_t) * EMA + beta_t * theta_t          (on every update_every-th step only)

Paper parameterisation (``parameterisation="paper"``, the default; the authors' offline ``BEMA``, whose results
the paper reports), with ``u = update_after``, ``rho = lag``::

    tau_t   = max(t - u + rho, 1)
    beta_t  = max((1 + gamma * tau_t) ** -kappa, min_ema_multiplier)
    alpha_t = (1 + tau_t) ** -eta

Steps ``t < u`` keep no average: the EMA copies the weights on its averaging steps (the authors' model follows
the checkpoints there) and BEMA is the training weights themselves. ``theta_0`` is the model when the EMA is
built if ``u = 0``, else the weights at the first averaging step ``s >= u``; at ``s`` the EMA (still the weights
of the previous averaging step, or of construction) averages in ``theta_s`` with ``beta_s``, as the authors'
``update`` does on its first call after ``update_after``.

TRL parameterisation (``parameterisation="trl"``: TRL's ``BEMACallback``)::

    beta_t  = max((rho + gamma * t) ** -kappa, min_ema_multiplier)
    alpha_t = (rho + gamma * t) ** -eta

with ``t`` the global step itself (not counted from ``u``); at ``t = u > 0`` the EMA and ``theta_0`` both become
``theta_u`` (no averaging), and the averaging steps are ``u + k * update_every`` (``u`` must be a multiple of
``update_every`` here, so that they are hf_ema's ``k * update_every``). Same arguments, other numbers: with the
defaults the paper's ``beta`` at step ``t`` is TRL's at step ``t + 1``.

Engine side (:class:`BiasCorrection`): the EMA engine keeps ``theta_0`` beside the EMA (same dtype, device and
shard) for the parameters only, and forms ``EMA + alpha * (theta_live - theta_0)`` whenever the EMA weights are
read (swapped in for evaluation, ``copy_to``, ``ema_state_dict`` and the saved ``model.safetensors``), with
``alpha`` at the EMA's current step: BEMA is never stale between averaging steps, and before the first averaging
step it is already a correction of the live weights, never the initial ones. ``update()`` is unchanged: one
averaging with the schedule's decay ``1 - beta_t``. Buffers are not corrected (averaged or copied as in any EMA).

Any schedule with the two methods ``bias_correction(step) -> alpha`` and ``theta0_step(update_every) -> int`` gets
this read rule (see :class:`BEMADecay`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .schedules import EMA_DECAY_FUNCTIONS, IDecayFunction

__all__ = ["PARAMETERISATIONS", "BEMADecay", "BiasCorrection"]

#: The accepted values of ``parameterisation``.
PARAMETERISATIONS = ("paper", "trl")
#: ``min_ema_multiplier`` when not given: the paper's configuration (``bema.yaml``) and TRL's default.
_DEFAULT_MIN_MULT = {"paper": 1e-4, "trl": 0.0}


def _real(name: str, value: Any, *, lower: float, strict: bool, upper: float | None = None) -> float:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(float(value))
        and (float(value) > lower if strict else float(value) >= lower)
        and (upper is None or float(value) <= upper)
    )
    if not ok:
        bound = f"{'>' if strict else '>='} {lower:g}" + (f" and <= {upper:g}" if upper is not None else "")
        raise ValueError(f"BEMADecay: `{name}` must be a finite number {bound}, got {value!r}")
    return float(value)


class BEMADecay(IDecayFunction):
    """BEMA's EMA as a schedule (``decay_type="bema"``); the engine adds the bias correction when it is read.

    The decay of an averaging at step ``t`` is ``1 - beta_t``, also with ``update_every = N > 1`` (no power over the
    interval: the authors and TRL average every ``N`` steps with ``beta`` at that step). See :mod:`hf_ema.bema` for
    both parameterisations. ``decay`` (the EMA's maximum decay) is not used.

    Args:
        ema_power: ``kappa``, the EMA weight's exponent (>= 0; 0: the EMA follows the weights). Default 0.5.
        eta_power: ``eta``, the correction's exponent (>= 0; TRL's ``bias_power``). Default 0.2.
        ema_gamma: ``gamma``, the time scale of the EMA weight (> 0; TRL's ``multiplier``). Default 1.
        lag: ``rho``, the virtual age at the start (>= 0; the authors' ``scaling_lag``). Default 10.
        update_after: ``u``, optimizer steps before averaging starts (>= 0). Default 0.
        min_ema_multiplier: Lower bound of ``beta``, in [0, 1]. Default: 1e-4 for ``"paper"`` (the paper's
            configuration), 0 for ``"trl"`` (TRL's default).
        parameterisation: ``"paper"`` (default) or ``"trl"``.

    Example:
        >>> fn = BEMADecay()
        >>> round(1 - fn(0.0, 1, None), 6) == round((1 + 11) ** -0.5, 6)  # beta at tau = 1 + 10
        True
        >>> round(fn.bias_correction(1), 6) == round(12 ** -0.2, 6)
        True
    """

    #: BEMA's decay comes from its own arguments; the EMA's ``decay`` is not used (no long-horizon warning).
    uses_decay = False

    def __init__(
        self,
        ema_power: float = 0.5,
        eta_power: float = 0.2,
        ema_gamma: float = 1.0,
        lag: float = 10,
        update_after: int = 0,
        min_ema_multiplier: float | None = None,
        parameterisation: str = "paper",
    ) -> None:
        if parameterisation not in PARAMETERISATIONS:
            raise ValueError(
                f"BEMADecay: `parameterisation` must be one of {PARAMETERISATIONS} (the paper's formulas, or TRL "
                f"BEMACallback's), got {parameterisation!r}"
            )
        kappa = _real("ema_power", ema_power, lower=0.0, strict=False)
        eta = _real("eta_power", eta_power, lower=0.0, strict=False)
        gamma = _real("ema_gamma", ema_gamma, lower=0.0, strict=True)
        rho = _real("lag", lag, lower=0.0, strict=False)
        rho_out: float | int = int(lag) if isinstance(lag, numbers.Integral) else rho
        if (
            isinstance(update_after, bool)
            or not isinstance(update_after, numbers.Integral)
            or update_after < 0
        ):
            raise ValueError(f"BEMADecay: `update_after` must be an integer >= 0, got {update_after!r}")
        u = int(update_after)
        if min_ema_multiplier is None:
            min_ema_multiplier = _DEFAULT_MIN_MULT[parameterisation]
        floor = _real("min_ema_multiplier", min_ema_multiplier, lower=0.0, strict=False, upper=1.0)
        if parameterisation == "trl" and rho + gamma * (u + 1) < 1.0:
            raise ValueError(
                f"BEMADecay(parameterisation='trl'): lag + ema_gamma * (update_after + 1) = {rho + gamma * (u + 1):g} "
                "< 1, so the EMA weight (lag + ema_gamma * step) ** -ema_power would exceed 1 at the first "
                "averaging; use a larger `lag` or `ema_gamma`"
            )
        super().__init__(
            ema_power=kappa,
            eta_power=eta,
            ema_gamma=gamma,
            lag=rho_out,
            update_after=u,
            min_ema_multiplier=floor,
            parameterisation=parameterisation,
        )
        self.ema_power, self.eta_power, self.ema_gamma = kappa, eta, gamma
        self.lag, self.update_after, self.min_ema_multiplier = rho, u, floor
        self.parameterisation = parameterisation

    # ------------------------------------------------------------------ the EMA part
    def beta(self, step: int) -> float:
        """The weight of the new weights in an averaging at ``step`` (1 = copy them).

        Example:
            >>> BEMADecay(update_after=5).beta(3), BEMADecay(parameterisation="trl", update_after=4).beta(4)
            (1.0, 1.0)
        """
        u = self.update_after
        if self.parameterisation == "paper":
            if step < u:
                return 1.0
            base = 1.0 + self.ema_gamma * max(step - u + self.lag, 1.0)
        else:
            if step <= u:
                return 1.0
            base = self.lag + self.ema_gamma * step
        return max(base**-self.ema_power, self.min_ema_multiplier)

    def __call__(self, decay: float, step: int, total_steps: int | None) -> float:
        return 1.0 - self.beta(step)

    def interval_decay(self, decay: float, step: int, total_steps: int | None, interval: int) -> float:
        """``1 - beta_step``: one averaging with ``beta`` at this step, whatever the interval (as the authors and TRL
        do with ``update_freq``)."""
        return 1.0 - self.beta(step)

    # ------------------------------------------------------------------ the correction (read) part
    def theta0_step(self, update_every: int) -> int:
        """The optimizer step whose weights become ``theta_0`` (0: the model when the EMA is built).

        Raises:
            ValueError: With ``parameterisation="trl"``, if ``update_after`` is not a multiple of ``update_every``.

        Example:
            >>> BEMADecay(update_after=500).theta0_step(400), BEMADecay().theta0_step(400)
            (800, 0)
        """
        u, n = self.update_after, int(update_every)
        if u == 0:
            return 0
        if self.parameterisation == "trl":
            if u % n:
                raise ValueError(
                    f"BEMADecay(parameterisation='trl'): TRL averages on steps update_after + k * update_freq, "
                    f"hf_ema on multiples of `update_every`; update_after={u} must be a multiple of "
                    f"update_every={n}"
                )
            return u
        return -(-u // n) * n  # the first averaging step >= u

    def bias_correction(self, step: int) -> float:
        """``alpha`` for reading BEMA at ``step`` (the optimizer steps done; once ``theta_0`` is taken).

        Example:
            >>> round(BEMADecay(parameterisation="trl").bias_correction(10), 6) == round(20 ** -0.2, 6)
            True
        """
        if self.parameterisation == "paper":
            return (1.0 + max(step - self.update_after + self.lag, 1.0)) ** -self.eta_power
        base = self.lag + self.ema_gamma * step
        # base 0 only at step 0 with lag 0, where theta = theta_0: nothing to correct, and 0 ** -eta is undefined
        return base**-self.eta_power if base > 0 else 1.0


EMA_DECAY_FUNCTIONS.setdefault("bema", BEMADecay)


def _checked_alpha(value: Any, schedule: Any, step: int) -> float:
    try:
        a = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{schedule!r}.bias_correction({step}) returned {value!r}; expected a float"
        ) from None
    if not (math.isfinite(a) and a >= 0.0):
        raise ValueError(
            f"{schedule!r}.bias_correction({step}) returned {value!r}; expected a finite number >= 0"
        )
    return a


class BiasCorrection:
    """The engine's part of a bias-corrected EMA: when ``theta_0`` is taken, and the read rule.

    :class:`hf_ema.EMAState` builds one when its schedule has ``bias_correction`` and ``theta0_step``; it keeps a
    ``theta_0`` tensor beside the EMA of every averaged parameter, copies the live weights into them at step
    :attr:`start` (at construction when it is 0), and reads ``value = ema + alpha * (live - theta_0)``.

    Attributes:
        start: The step at which ``theta_0`` is taken (0: at construction).
        taken_step: The step at which it was taken, ``None`` before (then BEMA reads the live weights).

    Example:
        >>> bc = BiasCorrection(BEMADecay(update_after=3), update_every=1)
        >>> bc.start, bc.due(2), bc.due(3), bc.alpha(3)
        (3, False, True, None)
    """

    def __init__(self, schedule: Any, update_every: int) -> None:
        self.schedule = schedule
        self.start = int(schedule.theta0_step(update_every))
        self.taken_step: int | None = None

    @classmethod
    def for_schedule(cls, schedule: Any, update_every: int) -> BiasCorrection | None:
        """A :class:`BiasCorrection` when ``schedule`` asks for one (has ``bias_correction``), else ``None``."""
        if not callable(getattr(schedule, "bias_correction", None)):
            return None
        return cls(schedule, update_every)

    def due(self, step: int) -> bool:
        """Whether ``theta_0`` is to be taken now, at optimizer step ``step``."""
        return self.taken_step is None and step >= self.start

    def alpha(self, step: int) -> float | None:
        """``alpha`` for a read at ``step``; ``None`` while ``theta_0`` is not taken (BEMA = the live weights)."""
        if self.taken_step is None:
            return None
        return _checked_alpha(self.schedule.bias_correction(step), self.schedule, step)

    def meta(self) -> dict[str, Any]:
        """The JSON state saved beside the EMA (``ema_state.json`` key ``bias_correction``)."""
        return {"theta0_step": self.taken_step}

    @staticmethod
    def _correction(
        ema: torch.Tensor, live: torch.Tensor, theta0: torch.Tensor, alpha: float
    ) -> torch.Tensor:
        """``alpha * (live - theta0)``, a new tensor of the EMA's dtype and device."""
        c = torch.sub(live.to(ema.device), theta0)
        if c.dtype != ema.dtype:
            c = c.to(ema.dtype)
        return c.mul_(alpha)

    @staticmethod
    @torch.no_grad()
    def read(
        ema: torch.Tensor, live: torch.Tensor, theta0: torch.Tensor, alpha: float | None
    ) -> torch.Tensor:
        """``ema + alpha * (live - theta0)`` as a new tensor of the EMA's dtype and device (``live`` for
        ``alpha=None``).

        Example:
            >>> BiasCorrection.read(torch.zeros(2), torch.ones(2), torch.zeros(2), 0.5).tolist()
            [0.5, 0.5]
        """
        if alpha is None:
            return live.to(device=ema.device, dtype=ema.dtype, copy=True)
        return BiasCorrection._correction(ema, live, theta0, alpha).add_(ema)

    @staticmethod
    @torch.no_grad()
    def write_(
        out: torch.Tensor, ema: torch.Tensor, live: torch.Tensor, theta0: torch.Tensor, alpha: float
    ) -> None:
        """``out <- read(ema, live, theta0, alpha)`` (rounded to ``out``'s dtype); computed in ``out`` itself, with
        no temporary, when it has the EMA's dtype and device (``out`` must not be ``live``)."""
        if out.dtype == ema.dtype and out.device == ema.device and live.device == ema.device:
            torch.sub(live, theta0, out=out)
            out.mul_(alpha).add_(ema)  # the same operations as read(), so the same bits
        else:
            out.copy_(BiasCorrection.read(ema, live, theta0, alpha))

    @staticmethod
    @torch.no_grad()
    def keep_writes_(
        ema: torch.Tensor,
        written: torch.Tensor,
        live: torch.Tensor,
        theta0: torch.Tensor,
        alpha: float | None,
    ) -> None:
        """Fold what a block wrote into a swapped-in BEMA back into the EMA, in place.

        The model held ``round(ema + c)``, ``c = alpha * (live - theta0)`` (``live``: the training weights), and now
        holds ``written``. Where an element is unchanged the EMA keeps its value (no precision lost); where it
        changed the EMA becomes ``written - c``, so that BEMA read again gives what was written (to the EMA's
        rounding). Before ``theta_0`` is taken (``alpha=None``) BEMA is the live weights and nothing is kept.
        """
        if alpha is None:
            return
        c = BiasCorrection._correction(ema, live, theta0, alpha)
        value = ema + c  # what read() gave (c + ema, the same sum), before rounding to the model's dtype
        now = written.to(ema.device)
        unchanged = now == value.to(now.dtype)
        torch.sub(now, c, out=value)
        torch.where(unchanged, ema, value, out=ema)
