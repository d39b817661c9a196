"""The ``warmup`` schedule (issue 10): the EMA warm-up of timm's ``ModelEmaV3`` and diffusers' ``EMAModel``.

The expected decays come from independent re-implementations of each library's ``get_decay``, fed with the step
that each library's own training loop passes (read, not copied):

* timm, huggingface/pytorch-image-models at ``aa4b5850c1543fa488abf260f18390eda46cf85d``:
  ``timm/utils/model_ema.py`` ``ModelEmaV3.get_decay(step)``: ``step = max(0, step - update_after_step - 1)``;
  ``0.0`` if ``step <= 0``; with ``use_warmup`` ``max(min(1 - (1 + step / warmup_gamma) ** -warmup_power, decay),
  min_decay)``, else ``decay``. Defaults ``decay=0.9999, min_decay=0, update_after_step=0, warmup_gamma=1,
  warmup_power=2/3``. ``train.py`` does ``num_updates += 1`` after each optimizer step, then
  ``update_ema(step=num_updates)``: the step is 1-based.
* diffusers, huggingface/diffusers at ``58eb52c0803ea9af3abec60841c2a093bdf1f951``:
  ``src/diffusers/training_utils.py`` ``EMAModel.step()`` does ``optimization_step += 1`` and then
  ``get_decay(optimization_step)``: ``step = max(0, optimization_step - update_after_step - 1)``; ``0.0`` if
  ``step <= 0``; ``1 - (1 + step / inv_gamma) ** -power`` with ``use_ema_warmup``, else ``(1 + step) / (10 + step)``;
  then ``min(., decay)`` and ``max(., min_decay)``. Defaults ``inv_gamma=1, power=2/3``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _trainer_utils import Recorder, TinyNet, ToyDataset, training_args
from reference import drive, reference_ema, tiny_mlp
from transformers import HfArgumentParser, Trainer

from hf_ema import EMA_DECAY_FUNCTIONS, EMAArguments, EMAState, EMATrainerCallback, WarmupDecay


def timm_v3_decay(
    step,
    decay=0.9999,
    min_decay=0.0,
    update_after_step=0,
    use_warmup=False,
    warmup_gamma=1.0,
    warmup_power=2 / 3,
):
    """timm ``ModelEmaV3.get_decay(step)``, ``step`` = timm's ``num_updates`` after the increment."""
    s = max(0, step - update_after_step - 1)
    if s <= 0:
        return 0.0
    if not use_warmup:
        return decay
    return max(min(1 - (1 + s / warmup_gamma) ** -warmup_power, decay), min_decay)


def diffusers_decay(
    optimization_step,
    decay=0.9999,
    min_decay=0.0,
    update_after_step=0,
    use_ema_warmup=False,
    inv_gamma=1.0,
    power=2 / 3,
):
    """diffusers ``EMAModel.get_decay(optimization_step)``, ``optimization_step`` incremented before the call."""
    s = max(0, optimization_step - update_after_step - 1)
    if s <= 0:
        return 0.0
    value = 1 - (1 + s / inv_gamma) ** -power if use_ema_warmup else (1 + s) / (10 + s)
    return max(min(value, decay), min_decay)


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


STEPS = [*range(1, 40), 99, 100, 1000, 31_623, 10**6]
SETTINGS = [  # (our arguments, timm arguments, diffusers arguments)
    ({}, {"use_warmup": True}, {"use_ema_warmup": True}),
    (
        {"warmup_power": 0.75, "inv_gamma": 2.0},
        {"use_warmup": True, "warmup_power": 0.75, "warmup_gamma": 2.0},
        {"use_ema_warmup": True, "power": 0.75, "inv_gamma": 2.0},
    ),
    (
        {"min_decay": 0.3, "update_after_step": 5},
        {"use_warmup": True, "min_decay": 0.3, "update_after_step": 5},
        {"use_ema_warmup": True, "min_decay": 0.3, "update_after_step": 5},
    ),
    (
        {"warmup_power": 1.0, "inv_gamma": 1, "update_after_step": 2},
        {"use_warmup": True, "warmup_power": 1.0, "update_after_step": 2},
        {"use_ema_warmup": True, "power": 1.0, "update_after_step": 2},
    ),
]


@pytest.mark.parametrize("decay", [0.9, 0.999, 0.9999])
@pytest.mark.parametrize(("ours", "timm", "diffusers"), SETTINGS)
def test_formula_equals_timm_and_diffusers_on_their_steps(decay, ours, timm, diffusers):
    fn = EMA_DECAY_FUNCTIONS["warmup"](**ours)
    for step in STEPS:
        got = fn(decay, step, None)
        assert _close(got, timm_v3_decay(step, decay=decay, **timm)), (step, got)
        assert _close(got, diffusers_decay(step, decay=decay, **diffusers)), (step, got)


def test_defaults_are_timms_and_hand_checked_values():
    fn = WarmupDecay()
    assert fn.config() == {"warmup_power": 2 / 3, "inv_gamma": 1.0, "min_decay": 0.0, "update_after_step": 0}
    assert fn(0.9999, 1, None) == 0.0  # the first update copies the weights
    assert _close(fn(0.9999, 2, None), 1 - 2 ** (-2 / 3))
    # diffusers' notes: power 2/3 reaches 0.999 at ~31.6k steps, power 3/4 at 10k steps.
    assert fn(0.9999, 31_623 + 1, None) == pytest.approx(0.999, abs=1e-7)
    assert WarmupDecay(warmup_power=0.75)(0.9999, 10_000 + 1, None) == pytest.approx(0.999, abs=1e-7)


def test_timm_without_warmup_is_min_decay_equal_to_decay():
    fn = WarmupDecay(min_decay=0.99, update_after_step=3)
    for step in STEPS:
        assert _close(fn(0.99, step, None), timm_v3_decay(step, decay=0.99, update_after_step=3)), step


def test_diffusers_without_warmup_is_threshold_one_step_later():
    """Documented, not equal: diffusers' (1 + s) / (10 + s) at its step k is our threshold at step k - 1."""
    thr = EMA_DECAY_FUNCTIONS["threshold"]()
    assert diffusers_decay(1, decay=0.999) == 0.0
    for step in range(2, 200):
        assert _close(diffusers_decay(step, decay=0.999), thr(0.999, step - 1, None)), step


# ------------------------------------------------------------------------------------------------ engine
@pytest.mark.parametrize(("ours", "timm", "_"), SETTINGS)
def test_ema_state_equals_timm_driven_ema(ours, timm, _):
    model = tiny_mlp(seed=2)
    ema = EMAState(model, decay=0.95, decay_type="warmup", **ours)
    history, returned = drive(ema, model, 30, seed=3)
    want = [timm_v3_decay(k, decay=0.95, **timm) for k in range(1, 31)]
    np.testing.assert_allclose(returned, want, rtol=1e-12, atol=0)
    expected = reference_ema(history, want)
    got = ema.ema_state_dict()
    for n, v in expected.items():
        np.testing.assert_allclose(got[n].double().numpy(), v, rtol=1e-5, atol=1e-6, err_msg=n)
    assert max(np.abs(history[-1][n] - expected[n]).max() for n in expected) > 1e-3


def test_update_after_step_lets_the_ema_follow_the_weights():
    model = tiny_mlp(seed=4)
    ema = EMAState(model, decay=0.99, decay_type="warmup", update_after_step=3)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        d = ema.update()
        same = all(torch.equal(ema.ema_state_dict()[n], p) for n, p in model.named_parameters())
        assert same == (step <= 4) and (d == 0.0) == (step <= 4), (step, d)


def test_update_every_with_warmup_copies_then_averages():
    model = tiny_mlp(seed=5)
    ema = EMAState(model, decay=0.9, decay_type="warmup", update_every=2, update_after_step=1)
    history, returned = drive(ema, model, 12, seed=6)
    want = [timm_v3_decay(k, decay=0.9, update_after_step=1, use_warmup=True) for k in range(1, 13)]
    np.testing.assert_allclose(returned, want, rtol=1e-12, atol=0)
    expected = reference_ema(history, want, update_every=2)
    got = ema.ema_state_dict()
    for n, v in expected.items():
        np.testing.assert_allclose(got[n].double().numpy(), v, rtol=1e-5, atol=1e-6, err_msg=n)


def test_save_load_keeps_the_warmup_arguments(tmp_path):
    model = tiny_mlp()
    kw = {"warmup_power": 0.75, "inv_gamma": 3.0, "min_decay": 0.1, "update_after_step": 2}
    ema = EMAState(model, decay=0.98, decay_type="warmup", **kw)
    for _ in range(5):
        ema.update()
    ema.save(tmp_path)
    back = EMAState.load(tmp_path, tiny_mlp())
    assert back.decay_type == "warmup" and back.schedule.config() == kw and back.step == 5
    assert back.update() == ema.update()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_power": 0}, "warmup_power"),
        ({"warmup_power": float("nan")}, "warmup_power"),
        ({"inv_gamma": -1.0}, "inv_gamma"),
        ({"min_decay": -0.1}, "min_decay"),
        ({"min_decay": 0.995}, r"`min_decay`=0\.995 is above the maximum `decay`=0\.99"),
        ({"update_after_step": -1}, "update_after_step"),
        ({"update_after_step": 2.5}, "update_after_step"),
        ({"warmup_powr": 0.75}, r"'warmup_powr' \(did you mean 'warmup_power'\?\)"),
    ],
)
def test_bad_warmup_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMAState(tiny_mlp(), decay=0.99, decay_type="warmup", **kwargs)
    with pytest.raises(ValueError, match=match):
        EMATrainerCallback(decay=0.99, decay_type="warmup", **kwargs)


def test_warmup_arguments_with_another_schedule_are_refused():
    with pytest.raises(ValueError, match=r"'inv_gamma'.*schedule 'threshold'"):
        EMAState(tiny_mlp(), decay=0.99, decay_type="threshold", inv_gamma=2.0)


# ------------------------------------------------------------------------------------------------ entry points
def test_reachable_from_from_params_and_flags():
    cb = EMATrainerCallback.from_params({"decay": 0.999, "decay_type": "warmup", "warmup_power": 0.75})
    assert cb.ema_kwargs["decay_type"] == "warmup" and cb.ema_kwargs["warmup_power"] == 0.75
    ema = EMAState.from_params(tiny_mlp(), {"decay": 0.999, "decay_type": "warmup", "update_after_step": 4})
    assert ema.schedule.update_after_step == 4
    flags = "--ema --ema_decay_type warmup --ema_warmup_power 0.75 --ema_inv_gamma 2 --ema_min_decay 0.5"
    (args,) = HfArgumentParser(EMAArguments).parse_args_into_dataclasses(
        [*flags.split(), "--ema_update_after_step", "10"]
    )
    kw = EMATrainerCallback.from_args(args).ema_kwargs
    assert {k: kw[k] for k in ("warmup_power", "inv_gamma", "min_decay", "update_after_step")} == {
        "warmup_power": 0.75,
        "inv_gamma": 2.0,
        "min_decay": 0.5,
        "update_after_step": 10,
    }
    default = HfArgumentParser(EMAArguments).parse_args_into_dataclasses(["--ema_decay_type", "warmup"])[0]
    assert "warmup_power" not in default.callback_kwargs()  # unset flags leave the schedule's defaults
    with pytest.raises(ValueError, match="inv_gamma"):
        HfArgumentParser(EMAArguments).parse_args_into_dataclasses(
            ["--ema_inv_gamma", "2"]
        )  # constant schedule


def test_trainer_callback_with_warmup_equals_timm_driven_ema(tmp_path):
    model = TinyNet()
    cb = EMATrainerCallback(decay=0.9, decay_type="warmup", warmup_power=0.75, update_after_step=2)
    rec = Recorder(model)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=12),
        train_dataset=ToyDataset(64),
        callbacks=[rec, cb],
    )
    trainer.train()
    want = [
        timm_v3_decay(k, 0.9, update_after_step=2, use_warmup=True, warmup_power=0.75) for k in range(1, 13)
    ]
    history = [{k: v.double().numpy() for k, v in h.items()} for h in rec.history]
    expected = reference_ema(history, want)
    got = cb.ema.state_dict()["ema"]
    for n, v in expected.items():
        np.testing.assert_allclose(got[n].double().numpy(), v, rtol=1e-5, atol=1e-6, err_msg=n)
    logged = [h["ema_decay"] for h in trainer.state.log_history if "ema_decay" in h]
    np.testing.assert_allclose(logged, want, rtol=1e-12, atol=0)
