"""Power-function EMA: sigma_rel <-> gamma, the online update, the profile inner product and the synthesis weights.

References are computed here from the definitions (EDM2, arXiv:2312.02696, Appendix C), in float64, never by calling
the function under test twice: the width as the standard deviation of ``tau / t`` under the profile, the cubic's
roots by ``numpy.roots``, the EMA as the sum over the parameter history of the profile's integral over each update
interval, inner products and least-squares fits by numerical quadrature on a fine grid.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hf_ema import EMA_DECAY_FUNCTIONS, EMAState, PowerDecay
from hf_ema.power import (
    MAX_SIGMA_REL,
    gamma_to_sigma_rel,
    power_beta,
    profile_inner,
    sigma_rel_to_gamma,
    solve_weights,
)

GAMMAS = [0.05, 0.5, 1.0, 3.0, 6.94, 16.97, 50.0, 400.0]


def _ref_sigma_rel(gamma: float) -> float:
    """Std of x = tau/t under the density (gamma+1) x**gamma on [0, 1]: E[x] = (g+1)/(g+2), E[x^2] = (g+1)/(g+3)."""
    m1 = (gamma + 1) / (gamma + 2)
    m2 = (gamma + 1) / (gamma + 3)
    return math.sqrt(m2 - m1 * m1)


def _ref_gamma(sigma_rel: float) -> float:
    """Largest real root of g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) by numpy's companion-matrix eigenvalues."""
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


# ----------------------------------------------------------------------------- sigma_rel <-> gamma
def test_paper_anchors():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_gamma_to_sigma_rel_is_the_profiles_relative_std(gamma):
    assert gamma_to_sigma_rel(gamma) == pytest.approx(_ref_sigma_rel(gamma), rel=1e-12)
    # and numerically, as a moment of the density on a fine grid (checks the closed form itself)
    x = np.linspace(0.0, 1.0, 400_001)
    p = (gamma + 1) * x**gamma
    m1 = np.trapezoid(p * x, x)
    var = np.trapezoid(p * (x - m1) ** 2, x)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(math.sqrt(var), rel=2e-4)


@pytest.mark.parametrize("sigma_rel", [1e-4, 0.01, 0.03, 0.05, 0.08, 0.10, 0.15, 0.2, 0.25, 0.288])
def test_sigma_rel_to_gamma_both_ways(sigma_rel):
    g = sigma_rel_to_gamma(sigma_rel)
    assert g > 0
    assert g == pytest.approx(_ref_gamma(sigma_rel), rel=1e-9)
    assert _ref_sigma_rel(g) == pytest.approx(sigma_rel, rel=1e-12)


@pytest.mark.parametrize(
    "bad", [0.0, -0.1, MAX_SIGMA_REL, 0.3, 1.0, float("nan"), float("inf"), True, "0.1", None]
)
def test_sigma_rel_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(bad)
    with pytest.raises(ValueError, match="sigma_rel"):
        EMAState(nn.Linear(2, 2), decay_type="power", sigma_rel=bad)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "3"])
def test_gamma_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="gamma"):
        gamma_to_sigma_rel(bad)
    with pytest.raises(ValueError, match="gamma"):
        PowerDecay(gamma=bad)


def test_power_decay_arguments():
    assert "power" in EMA_DECAY_FUNCTIONS and EMA_DECAY_FUNCTIONS["power"] is PowerDecay
    with pytest.raises(ValueError, match="needs `gamma`"):
        PowerDecay()
    with pytest.raises(ValueError, match="pass only one"):
        PowerDecay(gamma=6.94, sigma_rel=0.05)
    with pytest.raises(ValueError, match=r"'sigm_rel' \(did you mean 'sigma_rel'\?\)"):
        EMAState(nn.Linear(2, 2), decay_type="power", gamma=6.94, sigm_rel=0.1)
    both = PowerDecay(gamma=sigma_rel_to_gamma(0.1), sigma_rel=0.1)  # the saved config holds both: accepted
    assert both.sigma_rel == pytest.approx(0.1, rel=1e-12)
    assert PowerDecay(sigma_rel=0.1).config() == {"gamma": both.gamma, "sigma_rel": both.sigma_rel}


def test_beta_formula_and_first_update_copies():
    g = 6.94
    assert power_beta(g, 10, 1) == pytest.approx((1 - 1 / 10) ** (g + 1), rel=1e-14)
    assert power_beta(g, 10, 3) == pytest.approx((7 / 10) ** (g + 1), rel=1e-14)
    assert power_beta(g, 3, 3) == 0.0 and power_beta(g, 1, 3) == 0.0
    fn = PowerDecay(gamma=g)
    assert fn(0.9999, 1, None) == 0.0  # decay ignored; step is 1-based: the first step copies
    assert fn(0.9999, 10, None) == pytest.approx((0.9) ** (g + 1), rel=1e-14)
    assert fn.interval_decay(0.9999, 4, None, 4) == 0.0
    assert fn.interval_decay(0.9999, 12, None, 4) == pytest.approx((8 / 12) ** (g + 1), rel=1e-14)


# ----------------------------------------------------------------------------- the online update
def _ref_power_ema(thetas: dict[int, np.ndarray], gamma: float, t: int, dt: int) -> np.ndarray:
    """EMA at time t from its definition: sum over update times s (s = dt, 2dt, ... <= t) of theta_s times the
    integral of p_t(tau) = (g+1) tau^g / t^(g+1) over (s - dt, s], i.e. (s^(g+1) - (s-dt)^(g+1)) / t^(g+1)."""
    out = np.zeros_like(next(iter(thetas.values())))
    for s in range(dt, t + 1, dt):
        w = (s ** (gamma + 1) - (s - dt) ** (gamma + 1)) / t ** (gamma + 1)
        out = out + w * thetas[s]
    return out


@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.2])
def test_online_update_matches_the_profile_on_a_random_walk(interval, sigma_rel):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    ema = EMAState(model, decay_type="power", sigma_rel=sigma_rel, update_every=interval)
    gamma = sigma_rel_to_gamma(sigma_rel)
    params = list(model.parameters())
    thetas: dict[int, np.ndarray] = {}
    for step in range(1, 61):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ema.update()
        thetas[step] = np.concatenate([p.detach().numpy().ravel() for p in params])
        if step % interval == 0:
            got = np.concatenate([ema.state_dict()["ema"][n].numpy().ravel() for n in ("weight", "bias")])
            want = _ref_power_ema(thetas, gamma, step, interval)
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10, err_msg=f"step {step}")


@pytest.mark.parametrize("interval", [1, 5])
def test_online_update_of_a_linear_trajectory(interval):
    """theta(t) = t: the continuous EMA is (g+1)/(g+2) t; the tracked one sees theta_s on (s - dt, s], at most dt above
    the continuous value and on average dt/2 above, so it lies in [cont, cont + dt]."""
    model = nn.Linear(1, 1, bias=False).double()
    ema = EMAState(model, decay_type="power", gamma=6.94, update_every=interval)
    for step in range(1, 401):
        with torch.no_grad():
            model.weight.fill_(step)
        ema.update()
    t = 400
    cont = (6.94 + 1) / (6.94 + 2) * t
    got = float(ema.state_dict()["ema"]["weight"])
    assert cont <= got <= cont + interval, (got, cont)


def test_power_ema_resumes_exactly(tmp_path):
    torch.manual_seed(1)
    model = nn.Linear(4, 3)
    ema = EMAState(model, decay_type="power", sigma_rel=0.1, update_every=2)
    trajectory = [torch.randn(3, 4) for _ in range(20)]

    def step(m, e, i):
        with torch.no_grad():
            m.weight.copy_(trajectory[i])
        e.update()

    for i in range(10):
        step(model, ema, i)
    ema.save(tmp_path)
    resumed = EMAState.load(tmp_path, model)
    assert isinstance(resumed.schedule, PowerDecay) and resumed.update_every == 2 and resumed.step == 10
    for i in range(10, 20):
        step(model, ema, i)
        step(model, resumed, i)
    assert torch.equal(ema.state_dict()["ema"]["weight"], resumed.state_dict()["ema"]["weight"])


# ----------------------------------------------------------------------------- inner product and synthesis
def _profile_on_grid(tau: np.ndarray, t: float, gamma: float) -> np.ndarray:
    return np.where(tau <= t, (gamma + 1) * np.power(tau, gamma) / t ** (gamma + 1), 0.0)


def _gauss_nodes(t_max: float, panels: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of Gauss-Legendre quadrature of the given order on each of ``panels`` equal panels of
    [0, t_max] (exact for polynomials of degree < 2 * order on each panel)."""
    x, w = np.polynomial.legendre.leggauss(order)
    edges = np.linspace(0.0, t_max, panels + 1)
    a, b = edges[:-1, None], edges[1:, None]
    return (0.5 * (b - a) * x + 0.5 * (a + b)).ravel(), (0.5 * (b - a) * w).ravel()


def _quad(f_of_tau, t_max: float) -> float:
    tau, w = _gauss_nodes(t_max, 40, 100)
    return float(np.sum(w * f_of_tau(tau)))


@pytest.mark.parametrize(
    ("ta", "ga", "tb", "gb"),
    [
        (1.0, 1.0, 1.0, 1.0),
        (0.5, 2.0, 1.0, 3.0),
        (1.0, 3.0, 0.5, 2.0),
        (0.3, 6.94, 0.9, 16.97),
        (2.0, 0.5, 2.0, 7.0),
    ],
)
def test_profile_inner_against_quadrature(ta, ga, tb, gb):
    def product(tau):
        return _profile_on_grid(tau, ta, ga) * _profile_on_grid(tau, tb, gb)

    # integrate up to the shorter profile's end (the product is 0 beyond): smooth there, so quadrature is exact-ish
    want = _quad(product, min(ta, tb))
    assert float(profile_inner(ta, ga, tb, gb)) == pytest.approx(want, rel=1e-9)
    assert float(profile_inner(tb, gb, ta, ga)) == pytest.approx(want, rel=1e-9)


def _snapshot_grid(n: int = 6, t_end: float = 1200.0):
    ts = [t_end * (i + 1) / n for i in range(n)]
    g1, g2 = sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)
    return ts + ts, [g1] * n + [g2] * n


def test_target_equal_to_a_snapshot_gives_that_snapshot():
    ts, gs = _snapshot_grid()
    for k in (len(ts) - 1, len(ts) // 2 - 1, 3):
        fit = solve_weights(ts, gs, ts[k], gs[k])
        want = np.zeros(len(ts))
        want[k] = 1.0
        np.testing.assert_allclose(fit.weights[:, 0], want, atol=1e-6)
        assert fit.residual[0] < 1e-6


def test_weights_match_a_least_squares_fit_on_a_grid():
    """The analytic normal equations against a discretised least-squares fit of the target profile (no Gram
    matrix formula involved), and the reported residual against the L2 error measured on the grid."""
    ts, gs = _snapshot_grid(n=4, t_end=1.0)
    t_r, g_r = 1.0, sigma_rel_to_gamma(0.075)
    fit = solve_weights(ts, gs, [t_r, t_r], [g_r, sigma_rel_to_gamma(0.15)])
    np.testing.assert_allclose(fit.weights.sum(axis=0), 1.0, rtol=0, atol=1e-12)

    tau, quad_w = _gauss_nodes(1.0, 600, 60)  # panel edges at every snapshot time (multiples of 1/4)
    sq = np.sqrt(quad_w)
    design = np.stack([_profile_on_grid(tau, t, g) * sq for t, g in zip(ts, gs, strict=True)], axis=1)
    target = _profile_on_grid(tau, t_r, g_r) * sq
    x_ls, *_ = np.linalg.lstsq(design, target, rcond=None)
    np.testing.assert_allclose(fit.weights[:, 0], x_ls / x_ls.sum(), rtol=1e-5, atol=1e-6)
    err = target - design @ fit.weights[:, 0]
    measured = np.linalg.norm(err) / np.linalg.norm(target)
    assert fit.residual[0] == pytest.approx(measured, rel=1e-4)
    assert 1e-4 < fit.residual[0] < 0.2  # a genuine approximation, not an exact one


def test_times_are_unit_free():
    ts, gs = _snapshot_grid()
    a = solve_weights(ts, gs, 1200.0, sigma_rel_to_gamma(0.08))
    b = solve_weights([t * 1e6 for t in ts], gs, 1200.0e6, sigma_rel_to_gamma(0.08))
    np.testing.assert_allclose(a.weights, b.weights, rtol=1e-9, atol=1e-12)


def test_solve_weights_bad_input():
    with pytest.raises(ValueError, match="duplicate"):
        solve_weights([1.0, 1.0], [6.94, 6.94], 1.0, 6.94)
    with pytest.raises(ValueError, match="snapshot_t"):
        solve_weights([0.0, 1.0], [6.94, 6.94], 1.0, 6.94)
    with pytest.raises(ValueError, match="at least one snapshot"):
        solve_weights([], [], 1.0, 6.94)


def test_near_duplicate_snapshots_are_flagged_ill_conditioned():
    fine = solve_weights([1.0, 2.0, 1.0, 2.0], [6.94, 6.94, 16.97, 16.97], 2.0, 10.0)
    assert not fine.ill_conditioned
    bad = solve_weights([1.0, 1.0 + 1e-12, 2.0], [6.94, 6.94, 6.94], 2.0, 10.0)
    assert bad.ill_conditioned and bad.cond > 1e10
