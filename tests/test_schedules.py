"""Decay schedules: exact formulas on a grid of steps, registry, custom schedules, bad schedules.

Expected values come from ``tests/reference.py`` (formulas written from the spec), never from ``hf_ema``.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import constant_decay, decays_for, exp_decay, threshold_decay, tiny_mlp

from hf_ema import EMA_DECAY_FUNCTIONS, EMAState, IDecayFunction

STEPS = [0, 1, 2, 3, 5, 8, 9, 10, 11, 50, 99, 100, 101, 499, 500, 999, 1000, 4999]
DECAYS = [0.5, 0.9, 0.999, 0.9999]
TOTALS = [100, 1000, 5000]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


def test_registry_has_builtin_schedules():
    for name in ("constant", "threshold", "exp"):
        assert name in EMA_DECAY_FUNCTIONS, f"{name!r} missing from EMA_DECAY_FUNCTIONS"
        assert issubclass(EMA_DECAY_FUNCTIONS[name], IDecayFunction)


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("total", TOTALS)
def test_constant_formula_on_grid(decay, total):
    fn = EMA_DECAY_FUNCTIONS["constant"]()
    for step in STEPS:
        assert _close(float(fn(decay, step, total)), constant_decay(decay, step, total)), step


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("total", TOTALS)
def test_threshold_formula_on_grid(decay, total):
    fn = EMA_DECAY_FUNCTIONS["threshold"]()
    for step in STEPS:
        expected = threshold_decay(decay, step, total)
        assert _close(float(fn(decay, step, total)), expected), (step, fn(decay, step, total), expected)
    # Hand-checked anchors of min(decay, (1 + step) / (10 + step)).
    assert _close(float(fn(0.9999, 0, total)), 0.1)
    assert _close(float(fn(0.9999, 10, total)), 11 / 20)
    assert _close(float(fn(0.5, 1000, total)), 0.5)


@pytest.mark.parametrize("beta", [15.0, 1.0, 7.5])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("total", TOTALS)
def test_exp_formula_on_grid(beta, decay, total):
    fn = EMA_DECAY_FUNCTIONS["exp"](beta=beta)
    for step in STEPS:
        expected = exp_decay(decay, step, total, beta=beta)
        got = float(fn(decay, step, total))
        assert _close(got, expected), (step, got, expected)
    assert float(fn(decay, 0, total)) == 0.0  # 1 - exp(0)
    # Hand-checked anchor: at step == total the factor is 1 - exp(-beta).
    assert _close(float(fn(decay, total, total)), decay * (1 - math.exp(-beta)))


@pytest.mark.parametrize(
    ("decay_type", "decay", "extra"),
    [
        ("constant", 0.9, {}),
        ("threshold", 0.99, {}),
        ("threshold", 0.9999, {}),
        ("exp", 0.9999, {"total_steps": 120}),
        ("exp", 0.99, {"total_steps": 40, "beta": 3.0}),
    ],
)
def test_update_returns_schedule_value_each_step(decay_type, decay, extra):
    """Through the engine: ``update()`` number k uses step k (0-based) and returns that step's decay."""
    model = tiny_mlp()
    ema = EMAState(model, decay=decay, decay_type=decay_type, **extra)
    assert ema.decay_type == decay_type
    kw = {"beta": extra["beta"]} if "beta" in extra else {}
    expected = decays_for(decay_type, decay, 150, extra.get("total_steps"), **kw)
    for k, want in enumerate(expected):
        got = ema.update()
        assert isinstance(got, float), type(got)
        assert _close(got, want), (k, got, want)
        assert ema.step == k + 1
        assert _close(ema.last_decay, want)


def test_exp_default_beta_is_15():
    ema = EMAState(tiny_mlp(), decay=0.999, decay_type="exp", total_steps=200)
    got = [ema.update() for _ in range(30)]
    assert all(_close(g, exp_decay(0.999, k, 200, beta=15.0)) for k, g in enumerate(got)), got


@pytest.mark.parametrize("beta", [15, 7])
def test_supergradients_style_dict(beta):
    """``EMAState(model, **ema_params)`` with a SuperGradients ``ema_params`` dict; beta reaches the schedule."""
    ema_params = {"decay": 0.9999, "decay_type": "exp", "beta": beta}
    ema = EMAState(tiny_mlp(), **ema_params, total_steps=1000)
    assert ema.decay == 0.9999
    assert ema.decay_type == "exp"
    got = [ema.update() for _ in range(60)]
    for k, g in enumerate(got):
        assert _close(g, exp_decay(0.9999, k, 1000, beta=beta)), (k, g)
    if beta != 15:  # proves beta was passed, not the default
        assert not _close(got[10], exp_decay(0.9999, 10, 1000, beta=15.0))


def test_exp_without_total_steps_fails_at_construction():
    with pytest.raises(ValueError, match="total_steps"):
        EMAState(tiny_mlp(), decay=0.9999, decay_type="exp")
    with pytest.raises(ValueError, match="total_steps"):
        EMAState(tiny_mlp(), **{"decay": 0.9999, "decay_type": "exp", "beta": 15})


@pytest.mark.parametrize("bad", [0, -5])
def test_exp_with_non_positive_total_steps_fails_at_construction(bad):
    with pytest.raises(ValueError, match="total_steps"):
        EMAState(tiny_mlp(), decay=0.9999, decay_type="exp", total_steps=bad)


def test_schedules_without_total_steps_need_none():
    for name in ("constant", "threshold"):
        ema = EMAState(tiny_mlp(), decay=0.9, decay_type=name)
        assert isinstance(ema.update(), float)


def test_total_steps_is_settable():
    """The Trainer callback sets ``total_steps`` late; the schedule must use the new value."""
    ema = EMAState(tiny_mlp(), decay=0.99, decay_type="exp", total_steps=10)
    ema.total_steps = 400
    got = [ema.update() for _ in range(5)]
    assert all(_close(g, exp_decay(0.99, k, 400)) for k, g in enumerate(got)), got


def test_unknown_decay_type_lists_known_names():
    with pytest.raises(ValueError) as info:
        EMAState(tiny_mlp(), decay=0.9, decay_type="cosine_warmup_xyz")
    msg = str(info.value)
    assert "cosine_warmup_xyz" in msg
    for name in ("constant", "threshold", "exp"):
        assert name in msg, msg


def test_decay_type_of_wrong_kind_is_refused():
    with pytest.raises((TypeError, ValueError), match="decay_type"):
        EMAState(tiny_mlp(), decay=0.9, decay_type=lambda d, s, t: d)


class LinearDecay(IDecayFunction):
    """Test schedule: ramps linearly from 0 to ``decay`` over ``warmup`` steps."""

    def __init__(self, **kwargs):
        self.warmup = kwargs.get("warmup", 10)
        super().__init__(**kwargs)

    def __call__(self, decay: float, step: int, total_steps: int) -> float:
        return decay * min(1.0, step / self.warmup)


def _linear_ref(decay, step, warmup):
    return decay * min(1.0, step / warmup)


def test_registered_custom_schedule_by_name(monkeypatch):
    monkeypatch.setitem(EMA_DECAY_FUNCTIONS, "linear", LinearDecay)
    ema = EMAState(tiny_mlp(), decay=0.95, decay_type="linear", warmup=20)
    assert ema.decay_type == "linear"
    assert isinstance(ema.schedule, LinearDecay)
    got = [ema.update() for _ in range(30)]
    for k, g in enumerate(got):
        assert _close(g, _linear_ref(0.95, k, 20)), (k, g)
    # A registered name shows up in the "unknown name" error too.
    with pytest.raises(ValueError, match="linear"):
        EMAState(tiny_mlp(), decay=0.95, decay_type="nope")


def test_custom_schedule_instance():
    sched = LinearDecay(warmup=4)
    ema = EMAState(tiny_mlp(), decay=0.8, decay_type=sched)
    got = [ema.update() for _ in range(8)]
    for k, g in enumerate(got):
        assert _close(g, _linear_ref(0.8, k, 4)), (k, g)


class _BadAfter(IDecayFunction):
    def __init__(self, **kwargs):
        self.bad_value = kwargs["bad_value"]
        self.bad_step = kwargs["bad_step"]
        super().__init__(**kwargs)

    def __call__(self, decay, step, total_steps):
        return self.bad_value if step >= self.bad_step else 0.5


@pytest.mark.parametrize("bad_value", [1.5, -0.25, float("nan")])
def test_schedule_outside_unit_interval_fails_at_that_update(bad_value):
    model = tiny_mlp()
    ema = EMAState(model, decay=0.9, decay_type=_BadAfter(bad_value=bad_value, bad_step=3))
    for _ in range(3):
        assert ema.update() == 0.5
    before = {k: v.clone() for k, v in ema.ema_state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(ValueError) as info:
        ema.update()
    msg = str(info.value)
    assert "3" in msg or "step" in msg, msg  # says where
    after = ema.ema_state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed by a refused update"


def test_schedule_boundaries_zero_and_one_are_accepted():
    """[0, 1] is closed: d = 0 copies the weights, d = 1 freezes the EMA."""

    class Fixed(IDecayFunction):
        def __init__(self, **kwargs):
            self.value = kwargs["value"]
            super().__init__(**kwargs)

        def __call__(self, decay, step, total_steps):
            return self.value

    model = tiny_mlp()
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    frozen = EMAState(model, decay=0.9, decay_type=Fixed(value=1.0))
    copier = EMAState(model, decay=0.9, decay_type=Fixed(value=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0).add_(1.0)
    frozen.update()
    copier.update()
    fz, cp = frozen.ema_state_dict(), copier.ema_state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(fz[name], init[name])
        assert torch.equal(cp[name], p.detach())
