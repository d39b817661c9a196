"""Decay schedules: exact formulas on a grid of steps, registry, custom schedules, bad schedules.

Expected values come from ``tests/reference.py`` (formulas written from the spec), never from ``hf_ema``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import constant_decay, decays_for, exp_decay, float_params, threshold_decay, tiny_mlp

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
    """Through the engine: the k-th ``update()`` uses step k (1-based) and returns that step's decay."""
    model = tiny_mlp()
    ema = EMAState(model, decay=decay, decay_type=decay_type, **extra)
    assert ema.decay_type == decay_type
    kw = {"beta": extra["beta"]} if "beta" in extra else {}
    expected = decays_for(decay_type, decay, 150, extra.get("total_steps"), **kw)
    for k, want in enumerate(expected, start=1):
        got = ema.update()
        assert isinstance(got, float), type(got)
        assert _close(got, want), (k, got, want)
        assert ema.step == k
        assert _close(ema.last_decay, want)


def test_exp_default_beta_is_15():
    ema = EMAState(tiny_mlp(), decay=0.999, decay_type="exp", total_steps=200)
    got = [ema.update() for _ in range(30)]
    assert all(_close(g, exp_decay(0.999, k, 200, beta=15.0)) for k, g in enumerate(got, start=1)), got


@pytest.mark.parametrize("beta", [15, 7])
def test_supergradients_style_dict(beta):
    """``EMAState(model, **ema_params)`` with a SuperGradients ``ema_params`` dict; beta reaches the schedule."""
    ema_params = {"decay": 0.9999, "decay_type": "exp", "beta": beta}
    ema = EMAState(tiny_mlp(), **ema_params, total_steps=1000)
    assert ema.decay == 0.9999
    assert ema.decay_type == "exp"
    got = [ema.update() for _ in range(60)]
    for k, g in enumerate(got, start=1):
        assert _close(g, exp_decay(0.9999, k, 1000, beta=beta)), (k, g)
    if beta != 15:  # proves beta was passed, not the default
        assert not _close(got[9], exp_decay(0.9999, 10, 1000, beta=15.0))


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
    assert all(_close(g, exp_decay(0.99, k, 400)) for k, g in enumerate(got, start=1)), got


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
    for k, g in enumerate(got, start=1):
        assert _close(g, _linear_ref(0.95, k, 20)), (k, g)
    # A registered name shows up in the "unknown name" error too.
    with pytest.raises(ValueError, match="linear"):
        EMAState(tiny_mlp(), decay=0.95, decay_type="nope")


def test_custom_schedule_instance():
    sched = LinearDecay(warmup=4)
    ema = EMAState(tiny_mlp(), decay=0.8, decay_type=sched)
    got = [ema.update() for _ in range(8)]
    for k, g in enumerate(got, start=1):
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
    ema = EMAState(model, decay=0.9, decay_type=_BadAfter(bad_value=bad_value, bad_step=4))
    for _ in range(3):
        assert ema.update() == 0.5
    before = {k: v.clone() for k, v in ema.ema_state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(ValueError) as info:
        ema.update()
    msg = str(info.value)
    assert "step 4" in msg, msg  # says where: the 4th optimizer step
    assert ema.step == 3 and ema.last_decay == 0.5  # a refused update counts nothing
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


# ------------------------------------------------------------------------------- which arguments a schedule gets
class OnlyWarmup(IDecayFunction):
    """Takes ``warmup`` only: the default ``beta`` must not reach it (it used to fail with "unexpected 'beta'")."""

    def __init__(self, warmup):
        super().__init__(warmup=warmup)
        self.warmup = warmup

    def __call__(self, decay, step, total_steps):
        return decay * min(1.0, step / self.warmup)


class WarmupAndBeta(IDecayFunction):
    def __init__(self, warmup, beta=1.0):
        super().__init__(warmup=warmup, beta=beta)
        self.warmup, self.beta = warmup, beta

    def __call__(self, decay, step, total_steps):
        return decay * min(1.0, self.beta * step / self.warmup)


class NoSuperInit(IDecayFunction):
    def __init__(self, warmup):  # does not call IDecayFunction.__init__
        self.warmup = warmup

    def __call__(self, decay, step, total_steps):
        return decay * min(1.0, step / self.warmup)


@pytest.fixture
def registered(monkeypatch):
    for name, cls in (("only_warmup", OnlyWarmup), ("warmup_beta", WarmupAndBeta), ("linear", LinearDecay)):
        monkeypatch.setitem(EMA_DECAY_FUNCTIONS, name, cls)
    monkeypatch.setitem(EMA_DECAY_FUNCTIONS, "no_super", NoSuperInit)


def test_schedule_gets_only_the_arguments_its_constructor_declares(registered):
    ema = EMAState(tiny_mlp(), decay=0.9, decay_type="only_warmup", warmup=4)
    assert ema.schedule.config() == {"warmup": 4}
    assert [ema.update() for _ in range(5)] == pytest.approx([0.9 * min(1, k / 4) for k in range(1, 6)])
    # An explicit beta (SuperGradients dicts carry one for any schedule) is dropped for it too.
    assert EMAState(tiny_mlp(), decay=0.9, decay_type="only_warmup", warmup=4, beta=3).schedule.config() == {
        "warmup": 4
    }
    # A constructor that names beta gets it (default or given); a **kwargs one gets everything.
    assert EMAState(tiny_mlp(), decay=0.9, decay_type="warmup_beta", warmup=4).schedule.beta == 15.0
    assert EMAState(tiny_mlp(), decay=0.9, decay_type="warmup_beta", warmup=4, beta=2).schedule.beta == 2
    lin = EMAState(tiny_mlp(), decay=0.9, decay_type="linear", warmup=4, anything=1).schedule
    assert lin.kwargs == {"beta": 15.0, "warmup": 4, "anything": 1}
    # The built-in schedules take what they use only.
    assert EMAState(tiny_mlp(), decay=0.9, decay_type="threshold", beta=3).schedule.config() == {}


def test_schedule_without_base_init_is_saved_with_its_arguments(registered, tmp_path):
    model = tiny_mlp()
    ema = EMAState(model, decay=0.9, decay_type="no_super", warmup=3)
    ema.update()
    ema.save(tmp_path)
    back = EMAState.load(tmp_path, tiny_mlp())
    assert back.decay_type == "no_super" and back.schedule.warmup == 3 and back.step == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"decy": 0.9},
            r"'decy' \(did you mean 'decay'\?\).*schedule 'constant' \(ConstantDecay\) takes no extra",
        ),
        (
            {"decay_type": "exp", "total_steps": 9, "betta": 3},
            r"'betta' \(did you mean 'beta'\?\).*takes 'beta'",
        ),
        ({"decay_type": "only_warmup", "warmup": 2, "warmpu": 3}, r"'warmpu' \(did you mean 'warmup'\?\)"),
        ({"update_evry": 2}, r"'update_evry' \(did you mean 'update_every'\?\)"),
        ({"zzz": 1}, r"Unexpected argument 'zzz': it is not an option of EMAState"),
    ],
)
def test_argument_nobody_takes_is_named_with_a_suggestion(registered, kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMAState(tiny_mlp(), **kwargs)
    from hf_ema import EMATrainerCallback

    with pytest.raises(ValueError, match=match):
        EMATrainerCallback(**kwargs)


def test_missing_required_schedule_argument_is_named(registered):
    with pytest.raises(
        ValueError, match=r"schedule 'only_warmup' \(OnlyWarmup\) needs the argument\(s\) 'warmup'"
    ):
        EMAState(tiny_mlp(), decay=0.9, decay_type="only_warmup")


def test_schedule_instance_with_extra_arguments_is_refused():
    with pytest.raises(ValueError, match=r"'warmup'.*already built schedule"):
        EMAState(tiny_mlp(), decay=0.9, decay_type=LinearDecay(warmup=4), warmup=10)
    # beta is the EMA's own argument: accepted with an instance, not passed to it.
    EMAState(tiny_mlp(), decay=0.9, decay_type=LinearDecay(warmup=4), beta=3)


# ------------------------------------------------------------------------------- update_every: interval_decay
class ProductOverInterval(IDecayFunction):
    """Overrides interval_decay with the product of the per-step decays of the interval; records its calls."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def __call__(self, decay, step, total_steps):
        return min(decay, (1 + step) / (10 + step))

    def interval_decay(self, decay, step, total_steps, interval):
        self.calls.append((decay, step, total_steps, interval))
        return math.prod(self(decay, s, total_steps) for s in range(step - interval + 1, step + 1))


def test_update_every_uses_interval_decay_on_averaging_steps_only():
    model = tiny_mlp(seed=3)
    sched = ProductOverInterval()
    ema = EMAState(model, decay=0.95, decay_type=sched, update_every=3, total_steps=99)
    gen = torch.Generator().manual_seed(1)
    hist = [float_params(model)]
    returned = []
    for _ in range(10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        returned.append(ema.update())
        hist.append(float_params(model))
    assert sched.calls == [(0.95, 3, 99, 3), (0.95, 6, 99, 3), (0.95, 9, 99, 3)]
    assert returned == [threshold_decay(0.95, k) for k in range(1, 11)]  # update() returns the step's decay
    assert ema.step == 10 and ema.num_updates == 3
    # Float64 reference: at step k in (3, 6, 9) the EMA moves with D = prod of threshold over k-2..k.
    expected = {n: v.copy() for n, v in hist[0].items()}
    for k in (3, 6, 9):
        big_d = math.prod(threshold_decay(0.95, s) for s in range(k - 2, k + 1))
        expected = {n: v * big_d + hist[k][n] * (1 - big_d) for n, v in expected.items()}
    got = ema.ema_state_dict()
    for n, v in expected.items():
        np.testing.assert_allclose(got[n].double().numpy(), v, rtol=1e-5, atol=1e-6)
    power = {n: v.copy() for n, v in hist[0].items()}  # the default (d**N) would give another EMA
    for k in (3, 6, 9):
        dn = threshold_decay(0.95, k) ** 3
        power = {n: v * dn + hist[k][n] * (1 - dn) for n, v in power.items()}
    assert max(np.abs(power[n] - expected[n]).max() for n in expected) > 1e-3


def test_default_interval_decay_is_the_step_decay_to_the_power():
    fn = EMA_DECAY_FUNCTIONS["threshold"]()
    assert _close(fn.interval_decay(0.99, 7, None, 4), threshold_decay(0.99, 7) ** 4)
    assert _close(
        EMA_DECAY_FUNCTIONS["exp"](beta=3).interval_decay(0.9, 5, 50, 2), exp_decay(0.9, 5, 50, 3) ** 2
    )


def test_interval_decay_outside_unit_interval_is_refused_and_counts_nothing():
    class Bad(ProductOverInterval):
        def interval_decay(self, decay, step, total_steps, interval):
            return 1.5

    ema = EMAState(tiny_mlp(), decay=0.9, decay_type=Bad(), update_every=2)
    ema.update()
    with pytest.raises(ValueError, match=r"1\.5 at step 2 \(interval_decay over 2 steps\)"):
        ema.update()
    assert ema.step == 1 and ema.num_updates == 0
