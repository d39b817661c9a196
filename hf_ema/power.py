"""Power-function EMA and the maths of post-hoc EMA synthesis (pure functions, float64).

Source: T. Karras, M. Aittala, J. Lehtinen, J. Hellsten, T. Aila, S. Laine, "Analyzing and Improving the Training
Dynamics of Diffusion Models" (EDM2), CVPR 2024, arXiv:2312.02696, Section 3 and Appendix C; the equation and
algorithm numbers below are that paper's (as also cited in NVlabs/edm2 ``training/phema.py``, which was read to
check each formula; no code was taken from it).

Power-function EMA profile (Eq. 121). With exponent ``gamma > 0``, the EMA at time ``t`` averages the weights seen at
times ``tau`` in ``[0, t]`` with the density::

    p_t(tau) = (gamma + 1) * tau**gamma / t**(gamma + 1)            (integrates to 1 over [0, t])

Its width relative to ``t`` (Eq. 123), the standard deviation of ``tau / t`` under ``p_t``::

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 * (gamma + 3)))

which decreases from ``1/sqrt(12)`` (``gamma -> 0``, a flat average) to 0 (``gamma -> inf``). Conversely (Eq. 126,
Algorithm 2) ``gamma`` is the largest real root of ``gamma**3 + 7 gamma**2 + (16 - s) gamma + (12 - s) = 0`` with
``s = sigma_rel**-2``.

Online tracking (Eq. 127). After an interval ``dt``, with ``t`` the time *after* it::

    beta = (1 - dt / t)**(gamma + 1),      ema <- lerp(ema, theta_t, 1 - beta)

The first update (``t = dt``) has ``beta = 0``: it copies. Unrolled, the weight that the EMA at time ``t`` gives to
the value ``theta_s`` seen at update time ``s`` is ``(s**(gamma+1) - (s - dt)**(gamma+1)) / t**(gamma+1)``: exactly
the integral of ``p_t`` over ``(s - dt, s]``. So the discrete EMA *is* the continuous profile applied to the
piecewise-constant trajectory that holds ``theta_s`` on ``(s - dt, s]``, for any constant or varying ``dt``.

Synthesis (Eq. 151, Algorithm 3). The inner product of two profiles ``a = (t_a, gamma_a)``, ``b = (t_b, gamma_b)``
with ``t_a <= t_b`` is::

    <p_a, p_b> = (gamma_a + 1) (gamma_b + 1) (t_a / t_b)**gamma_b / ((gamma_a + gamma_b + 1) t_b)

(symmetric otherwise). For stored snapshots ``i`` and targets ``r`` the least-squares fit of ``p_r`` by
``sum_i x_ir p_i`` solves ``A X = B`` with ``A_ij = <p_i, p_j>`` and ``B_ir = <p_i, p_r>``; each column of ``X`` is
then normalised to sum to 1 and the synthesised EMA is ``sum_i x_ir * snapshot_i``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .schedules import EMA_DECAY_FUNCTIONS, IDecayFunction

__all__ = [
    "MAX_SIGMA_REL",
    "PowerDecay",
    "PowerFit",
    "gamma_to_sigma_rel",
    "power_beta",
    "profile_inner",
    "sigma_rel_to_gamma",
    "solve_weights",
]

#: Upper bound (exclusive) of ``sigma_rel``: the width of the flat average ``gamma -> 0``, ``1 / sqrt(12)``.
MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)

#: Condition number of ``A`` above which :func:`solve_weights` flags the fit (``cond * eps`` ~ 1e-6: the weights
#: may have lost ten of their sixteen digits; the residual still measures the fit that was obtained).
ILL_CONDITIONED = 1e10


def _real(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"`{what}` must be a finite real number, got {value!r}")
    return float(value)


def check_gamma(gamma: Any, what: str = "gamma") -> float:
    """``gamma`` as a float, or a ValueError naming ``what`` unless it is a finite number > 0."""
    g = _real(gamma, what)
    if g <= 0:
        raise ValueError(f"`{what}` (the power-function EMA exponent) must be > 0, got {gamma!r}")
    return g


def check_sigma_rel(sigma_rel: Any, what: str = "sigma_rel") -> float:
    """``sigma_rel`` as a float, or a ValueError naming ``what`` unless ``0 < sigma_rel < 1/sqrt(12)``."""
    s = _real(sigma_rel, what)
    if not (0.0 < s < MAX_SIGMA_REL):
        raise ValueError(
            f"`{what}` (the EMA's width relative to training time) must lie strictly between 0 and "
            f"1/sqrt(12) = {MAX_SIGMA_REL:.6f}, got {sigma_rel!r} (e.g. 0.05 or 0.10; the EDM2 paper uses 0.01-0.25)"
        )
    return s


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative width of the power-function EMA with exponent ``gamma`` (EDM2 Eq. 123).

    ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3)))``.

    Example:
        >>> round(gamma_to_sigma_rel(6.94), 4)
        0.1
    """
    g = check_gamma(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent ``gamma`` of the power-function EMA of relative width ``sigma_rel`` (EDM2 Eq. 126, Algorithm 2).

    ``gamma`` is the largest real root of ``gamma**3 + 7 gamma**2 + (16 - s) gamma + (12 - s)`` with
    ``s = sigma_rel**-2``. Written as ``(gamma + 2)**2 (gamma + 3) / (gamma + 1) = s``, the left side increases
    strictly on ``gamma >= 0`` from 12, so for ``s > 12`` (``sigma_rel < 1/sqrt(12)``) there is exactly one positive
    root, and it is the largest one; it is found by bisection, then polished by Newton steps.

    Raises:
        ValueError: Unless ``0 < sigma_rel < 1/sqrt(12)``.

    Example:
        >>> round(sigma_rel_to_gamma(0.05), 2), round(sigma_rel_to_gamma(0.10), 2)
        (16.97, 6.94)
    """
    s = check_sigma_rel(sigma_rel) ** -2

    def f(g: float) -> float:
        return ((g + 7.0) * g + (16.0 - s)) * g + (12.0 - s)

    lo, hi = 0.0, 1.0
    while f(hi) <= 0.0:  # f(0) = 12 - s < 0; f grows like g**3
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if f(mid) > 0.0:
            hi = mid
        else:
            lo = mid
    g = hi
    for _ in range(3):  # f is convex right of its inflection (g > -7/3): Newton from the right stays right
        df = (3.0 * g + 14.0) * g + (16.0 - s)
        if df <= 0.0:
            break
        g_new = g - f(g) / df
        if not (lo <= g_new <= hi):
            break
        g = g_new
    return g


def power_beta(gamma: float, t: float, dt: float) -> float:
    """The decay ``beta = (1 - dt / t)**(gamma + 1)`` of one power-function EMA update (EDM2 Eq. 127).

    Args:
        gamma: The exponent (> 0).
        t: Time *after* the update (optimizer steps or samples seen), > 0.
        dt: Time since the previous update (> 0). ``t <= dt`` (the first update) gives 0: the EMA copies.

    Example:
        >>> power_beta(1.0, 4, 1)
        0.5625
        >>> power_beta(6.94, 100, 100)
        0.0
    """
    if not (dt > 0 and t > 0):
        raise ValueError(f"power_beta needs t > 0 and dt > 0, got t={t!r}, dt={dt!r}")
    if t <= dt:
        return 0.0
    return math.exp((gamma + 1.0) * math.log1p(-dt / t))


class PowerDecay(IDecayFunction):
    """The power-function EMA as a decay schedule: ``decay_type="power"`` with ``gamma=`` or ``sigma_rel=``.

    With ``step`` the number of optimizer steps done (this one included, 1-based) the decay of one step is
    ``(1 - 1/step)**(gamma + 1)`` and, with ``update_every = k``, the decay applied on an averaging step is
    ``(1 - k/step)**(gamma + 1)`` (:meth:`interval_decay`), 0 on the first one: the EMA copies, then averages the
    past ``step`` optimizer steps with the weights ``p_t(tau) = (gamma + 1) tau**gamma / t**(gamma + 1)``
    (EDM2 Eq. 121, 127; see :mod:`hf_ema.power`). Time counts optimizer steps here; the profile relative to
    training time is the same for any batch size as long as it stays constant (see :class:`hf_ema.posthoc.PostHocEMA`
    for time counted in samples).

    ``decay`` (the EMA's maximum decay) is ignored: the profile is fixed by ``gamma`` alone.

    Args:
        gamma: The exponent, > 0 (EDM2 uses ~6.9 and ~17 for sigma_rel 0.10 and 0.05).
        sigma_rel: Or the relative width, in (0, 1/sqrt(12)); exactly one of the two is needed (both are accepted
            when they agree, as the saved configuration holds both).

    Example:
        >>> from hf_ema import EMAState
        >>> import torch
        >>> ema = EMAState(torch.nn.Linear(2, 2), decay_type="power", sigma_rel=0.10)
        >>> round(ema.schedule.gamma, 2), ema.update()
        (6.94, 0.0)
        >>> round(PowerDecay(gamma=1.0)(0.0, 4, None), 4)
        0.5625
    """

    #: ``(1 - 1/t)**(gamma + 1)`` raised to ``B / B_ref`` would be another gamma: no EMA scaling rule here.
    batch_size_invariant = True
    uses_decay = False  # the profile is set by gamma / sigma_rel alone

    def __init__(self, gamma: float | None = None, sigma_rel: float | None = None) -> None:
        if gamma is None and sigma_rel is None:
            raise ValueError("decay_type='power' needs `gamma` (> 0) or `sigma_rel` (in (0, 1/sqrt(12)))")
        if gamma is not None:
            g = check_gamma(gamma)
            if sigma_rel is not None:
                s = check_sigma_rel(sigma_rel)
                if not math.isclose(gamma_to_sigma_rel(g), s, rel_tol=1e-9):
                    raise ValueError(
                        f"decay_type='power': gamma={gamma!r} has sigma_rel={gamma_to_sigma_rel(g)!r}, "
                        f"not the sigma_rel={sigma_rel!r} also given; pass only one of them"
                    )
        else:
            g = sigma_rel_to_gamma(sigma_rel)
        self.gamma = g
        self.sigma_rel = gamma_to_sigma_rel(g)
        super().__init__(gamma=g, sigma_rel=self.sigma_rel)

    def __call__(self, decay: float, step: int, total_steps: int | None) -> float:
        return self.interval_decay(decay, step, total_steps, 1)

    def interval_decay(self, decay: float, step: int, total_steps: int | None, interval: int) -> float:
        """``(1 - interval/step)**(gamma + 1)``; 0 when ``step <= interval`` (the first update copies)."""
        return power_beta(self.gamma, float(max(step, 1)), float(interval))


EMA_DECAY_FUNCTIONS.setdefault("power", PowerDecay)


def profile_inner(t_a: Any, gamma_a: Any, t_b: Any, gamma_b: Any) -> np.ndarray:
    """Inner product ``<p_a, p_b> = integral of p_a(tau) p_b(tau) dtau`` of power-function profiles (EDM2 Eq. 151).

    For ``t_a <= t_b``: ``(gamma_a + 1)(gamma_b + 1)(t_a / t_b)**gamma_b / ((gamma_a + gamma_b + 1) t_b)``;
    symmetric otherwise. Arguments broadcast (NumPy), computed in float64.

    Example:
        >>> float(profile_inner(1.0, 1.0, 1.0, 1.0))  # integral of (2 tau)**2 over [0, 1]
        1.3333333333333333
    """
    t_a, g_a, t_b, g_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    a_first = t_a <= t_b
    lo_t, hi_t = np.where(a_first, t_a, t_b), np.where(a_first, t_b, t_a)
    g_hi = np.where(a_first, g_b, g_a)  # the exponent of the profile that ends later
    return (g_a + 1.0) * (g_b + 1.0) * (lo_t / hi_t) ** g_hi / ((g_a + g_b + 1.0) * hi_t)


@dataclass
class PowerFit:
    """Result of :func:`solve_weights`.

    Attributes:
        weights: ``X``, shape ``(snapshots, targets)``, float64; each column sums to 1.
        residual: Per target, the relative L2 error of the fitted profile,
            ``||p_r - sum_i x_ir p_i|| / ||p_r||`` (0 = exact reproduction).
        cond: Condition number of ``A``.
    """

    weights: np.ndarray
    residual: np.ndarray
    cond: float

    @property
    def ill_conditioned(self) -> bool:
        """Whether ``cond`` exceeds :data:`ILL_CONDITIONED`."""
        return bool(self.cond > ILL_CONDITIONED)


def solve_weights(
    snapshot_t: Sequence[float],
    snapshot_gamma: Sequence[float],
    target_t: float | Sequence[float],
    target_gamma: float | Sequence[float],
) -> PowerFit:
    """Least-squares weights that combine snapshots of power-function EMAs into other ones (EDM2 Algorithm 3).

    Solves ``A X = B`` in float64 with ``A_ij = <p_i, p_j>``, ``B_ir = <p_i, p_r>`` (:func:`profile_inner`), then
    normalises each column of ``X`` to sum to 1 (each profile integrates to 1, so the exact fit sums to 1; the
    normalisation removes rounding drift, as in EDM2's ``solve_posthoc_coefficients``). Times are divided by the
    largest one first (the weights do not depend on the unit of time; this keeps ``A`` of order 1). The residual is
    ``sqrt(<r, r> - 2 x.b + x.A.x) / sqrt(<r, r>)`` with ``<r, r> = (gamma + 1)**2 / ((2 gamma + 1) t)``.

    Args:
        snapshot_t: Time of each snapshot (> 0); all ``(t, gamma)`` pairs distinct.
        snapshot_gamma: Exponent of each snapshot's profile.
        target_t: Time(s) of the target profile(s), > 0 (normally ``>= max(snapshot_t)`` is not needed, but the
            caller should only pass snapshots with ``t_i <= t_r``).
        target_gamma: Exponent(s) of the target profile(s); broadcast against ``target_t``.

    Returns:
        A :class:`PowerFit`.

    Raises:
        ValueError: On empty input, non-positive times or exponents, duplicate snapshots, or a singular ``A``.

    Example:
        >>> fit = solve_weights([50, 100, 50, 100], [6.94, 6.94, 16.97, 16.97], 100, 16.97)
        >>> [round(float(x), 6) + 0.0 for x in fit.weights[:, 0]]
        [0.0, 0.0, 0.0, 1.0]
    """
    ts = np.asarray(snapshot_t, dtype=np.float64).reshape(-1)
    gs = np.asarray(snapshot_gamma, dtype=np.float64).reshape(-1)
    tr, gr = np.broadcast_arrays(
        np.asarray(target_t, dtype=np.float64).reshape(-1),
        np.asarray(target_gamma, dtype=np.float64).reshape(-1),
    )
    if ts.size == 0 or ts.shape != gs.shape:
        raise ValueError(
            f"solve_weights needs one gamma per snapshot and at least one snapshot, got {ts.size} times and "
            f"{gs.size} gammas"
        )
    if tr.size == 0:
        raise ValueError("solve_weights needs at least one target")
    for what, arr in (("snapshot_t", ts), ("snapshot_gamma", gs), ("target_t", tr), ("target_gamma", gr)):
        if not np.all(np.isfinite(arr)) or not np.all(arr > 0):
            raise ValueError(f"solve_weights: every `{what}` must be finite and > 0, got {arr.tolist()}")
    pairs = list(zip(ts.tolist(), gs.tolist(), strict=True))
    if len(set(pairs)) != len(pairs):
        dup = sorted({p for p in pairs if pairs.count(p) > 1})
        raise ValueError(f"solve_weights: duplicate snapshots (t, gamma) {dup}: A would be singular")
    scale = max(float(ts.max()), float(tr.max()))
    ts, tr = ts / scale, tr / scale
    A = profile_inner(ts[:, None], gs[:, None], ts[None, :], gs[None, :])
    B = profile_inner(ts[:, None], gs[:, None], tr[None, :], gr[None, :])
    cond = float(np.linalg.cond(A))
    try:
        X = np.linalg.solve(A, B)
    except np.linalg.LinAlgError as e:
        raise ValueError(
            f"solve_weights: the snapshots' Gram matrix is singular ({e}); cond(A) = {cond:.3g}"
        ) from e
    X = X / X.sum(axis=0, keepdims=True)
    rr = (gr + 1.0) ** 2 / ((2.0 * gr + 1.0) * tr)
    err2 = rr - 2.0 * np.einsum("ir,ir->r", X, B) + np.einsum("ir,ij,jr->r", X, A, X)
    residual = np.sqrt(np.maximum(err2, 0.0) / rr)
    return PowerFit(weights=X, residual=residual, cond=cond)
