"""The EMA scaling rule: a horizon in samples, not optimizer steps (issue 10, item 3).

Busbridge et al. 2023, "How to Scale Your EMA" (arXiv:2307.13813), "EMA Scaling Rule": when the
batch size is multiplied by ``kappa``, the EMA momentum ``rho`` becomes ``rho ** kappa``. Here ``kappa =
B / B_ref`` with ``B`` the effective batch (samples per optimizer step) and ``B_ref`` the ``reference_batch_size``
that ``decay`` was chosen for. With ``time_unit="samples"`` the schedule is evaluated at ``samples / B_ref``.

Every expected value is computed here or in ``tests/reference.py`` (plain Python / NumPy float64, no hf_ema):
the rule itself is :func:`scaled_momentum`, written from the paper.
"""

from __future__ import annotations

import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch
from _trainer_utils import Recorder, TinyNet, ToyDataset, training_args
from reference import (
    constant_decay,
    drive,
    exp_decay,
    float_params,
    perturb_,
    reference_ema,
    threshold_decay,
    tiny_mlp,
)
from safetensors.torch import load_file
from transformers import HfArgumentParser, Trainer

from hf_ema import EMAArguments, EMAState, EMATrainerCallback, IDecayFunction

RTOL, ATOL = 1e-5, 2e-6
SCHEDULES = {"constant": constant_decay, "threshold": threshold_decay, "exp": exp_decay}


def scaled_momentum(rho: float, kappa: float) -> float:
    """Busbridge et al. 2023, EMA Scaling Rule: scaling the batch by ``kappa`` turns momentum ``rho`` into
    ``rho ** kappa``."""
    return float(rho) ** float(kappa)


def test_the_reference_rule_is_kappa_small_steps_at_the_reference_batch():
    """Sanity check of the reference itself: ``kappa`` EMA steps of momentum ``rho`` towards the same target leave
    the same weight on the old average as one step of ``rho ** kappa`` (the rule's derivation, for integer
    kappa)."""
    rho, target, start = 0.97, 3.0, -1.0
    for kappa in (1, 2, 5):
        ema = start
        for _ in range(kappa):
            ema = rho * ema + (1 - rho) * target
        one = scaled_momentum(rho, kappa)
        assert math.isclose(ema, one * start + (1 - one) * target, rel_tol=1e-12)


def assert_close(got: dict[str, torch.Tensor], want: dict[str, np.ndarray]) -> None:
    for name, w in want.items():
        g = got[name].detach().double().cpu().numpy()
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=name)


def far_from(got: dict[str, torch.Tensor], want: dict[str, np.ndarray]) -> bool:
    """The EMA differs from ``want`` by far more than the tolerance (so a comparison with it could fail)."""
    return max(float(np.abs(got[n].detach().double().numpy() - w).max()) for n, w in want.items()) > 1e-3


# ------------------------------------------------------------------------------------------------ EMAState
@pytest.mark.parametrize(
    ("decay_type", "extra"), [("constant", {}), ("threshold", {}), ("exp", {"beta": 6.0})]
)
@pytest.mark.parametrize(("batch", "ref"), [(64, 32), (16, 32), (96, 32), (48, 32)])
@pytest.mark.parametrize("update_every", [1, 3])
def test_update_applies_decay_to_the_power_batch_over_reference(decay_type, extra, batch, ref, update_every):
    steps, decay, total = 24, 0.9, 24
    model = tiny_mlp(seed=1)
    ema = EMAState(
        model,
        decay=decay,
        decay_type=decay_type,
        total_steps=total,
        update_every=update_every,
        reference_batch_size=ref,
        batch_size=batch,
        **extra,
    )
    history, returned = drive(ema, model, steps, seed=2)
    kappa = batch / ref
    fn = SCHEDULES[decay_type]
    per_step = [scaled_momentum(fn(decay, k, total, **extra), kappa) for k in range(1, steps + 1)]
    np.testing.assert_allclose(returned, per_step, rtol=1e-12)
    want = reference_ema(history, per_step, update_every=update_every)
    got = ema.state_dict()["ema"]
    assert_close(got, want)
    unscaled = reference_ema(
        history, [fn(decay, k, total, **extra) for k in range(1, steps + 1)], update_every
    )
    assert far_from(got, unscaled)  # the rule makes a difference the comparison can see
    assert ema.samples_seen == steps * batch


def test_batch_equal_to_reference_is_bitwise_the_unscaled_ema():
    kwargs = dict(decay=0.95, decay_type="threshold", update_every=2)
    a, b = tiny_mlp(seed=3), tiny_mlp(seed=3)
    ema_a = EMAState(a, **kwargs)
    ema_b = EMAState(b, reference_batch_size=24, batch_size=24, **kwargs)
    _, ra = drive(ema_a, a, 11, seed=4)
    _, rb = drive(ema_b, b, 11, seed=4)
    assert ra == rb
    for k, v in ema_a.state_dict()["ema"].items():
        assert torch.equal(v, ema_b.state_dict()["ema"][k]), k


def test_sample_time_gives_the_schedule_at_matching_sample_counts():
    """Threshold schedule, B_ref = 16: a run at batch 32 for n steps sees, at each step, the schedule value of a
    run at batch 16 at the same number of samples (step 2j), raised to 32/16."""
    n, decay = 10, 0.99
    small, big = tiny_mlp(seed=5), tiny_mlp(seed=5)
    ema_small = EMAState(
        small,
        decay=decay,
        decay_type="threshold",
        reference_batch_size=16,
        batch_size=16,
        time_unit="samples",
    )
    ema_big = EMAState(
        big, decay=decay, decay_type="threshold", reference_batch_size=16, batch_size=32, time_unit="samples"
    )
    _, small_d = drive(ema_small, small, 2 * n, seed=6)
    history, big_d = drive(ema_big, big, n, seed=6)
    # At matching sample counts (32 j samples), the schedule's value is the same: d_big = d_small ** 2.
    for j in range(1, n + 1):
        assert math.isclose(big_d[j - 1], scaled_momentum(small_d[2 * j - 1], 2), rel_tol=1e-12)
    want_per_step = [scaled_momentum(threshold_decay(decay, 2 * j), 2) for j in range(1, n + 1)]
    np.testing.assert_allclose(big_d, want_per_step, rtol=1e-12)
    assert_close(ema_big.state_dict()["ema"], reference_ema(history, want_per_step))
    # In optimizer-step time the schedule would be at step j, not 2j: a different EMA.
    steps_time = [scaled_momentum(threshold_decay(decay, j), 2) for j in range(1, n + 1)]
    assert far_from(ema_big.state_dict()["ema"], reference_ema(history, steps_time))


class RecordingSchedule(IDecayFunction):
    """Constant 0.5, recording the (step, total_steps) it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[float, float | None]] = []

    def __call__(self, decay, step, total_steps):
        self.calls.append((step, total_steps))
        return 0.5


@pytest.mark.parametrize(
    ("batch", "want_steps", "want_total"), [(32, [2, 4, 6], 20), (24, [1.5, 3, 4.5], 15)]
)
def test_sample_time_passes_samples_over_reference_to_the_schedule(batch, want_steps, want_total):
    schedule = RecordingSchedule()
    ema = EMAState(
        tiny_mlp(),
        decay=0.9,
        decay_type=schedule,
        total_steps=10,
        reference_batch_size=16,
        batch_size=batch,
        time_unit="samples",
    )
    for _ in range(3):
        ema.update()
    assert [s for s, _ in schedule.calls] == want_steps  # a float when samples / B_ref is not whole
    assert {t for _, t in schedule.calls} == {want_total}  # total_steps * B / B_ref
    assert [type(s) for s, _ in schedule.calls] == [type(w) for w in want_steps]


def test_set_batch_size_changes_the_exponent_from_the_next_step():
    model = tiny_mlp(seed=7)
    ema = EMAState(model, decay=0.8, reference_batch_size=10, batch_size=10)
    history, returned = drive(ema, model, 3, seed=8)
    ema.set_batch_size(30)
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        perturb_(model, gen)
        returned.append(ema.update())
        history.append(float_params(model))
    per_step = [0.8] * 3 + [scaled_momentum(0.8, 3)] * 3
    np.testing.assert_allclose(returned, per_step, rtol=1e-12)
    assert_close(ema.state_dict()["ema"], reference_ema(history, per_step))
    assert ema.samples_seen == 3 * 10 + 3 * 30


def test_horizon_in_steps_and_samples():
    ema = EMAState(tiny_mlp(), decay=0.999, update_every=4, reference_batch_size=256, batch_size=1024)
    h = ema.horizon()
    step_decay = 0.999**4  # kappa = 4
    assert h["decay"] == 0.999 and h["batch_size"] == 1024 and h["reference_batch_size"] == 256
    assert math.isclose(h["step_decay"], step_decay, rel_tol=1e-12)
    assert math.isclose(h["applied_decay"], step_decay**4, rel_tol=1e-12)  # every 4 steps: d ** (kappa * N)
    assert math.isclose(h["steps"], 4 / (1 - step_decay**4), rel_tol=1e-12)  # N / (1 - applied decay)
    assert math.isclose(h["samples"], 4 * 1024 / (1 - step_decay**4), rel_tol=1e-12)
    # About the same horizon in samples (within 1%) as the reference batch alone at decay 0.999: the point of the rule.
    assert math.isclose(h["samples"], 256 / (1 - 0.999), rel_tol=1e-2)
    plain = EMAState(tiny_mlp(), decay=0.9, update_every=2).horizon()
    assert (
        plain["samples"] is None
        and math.isclose(plain["steps"], 2 / (1 - 0.9**2))
        and plain["applied_decay"] == 0.9**2
    )


# ------------------------------------------------------------------------------------------------ resume
def _ema(model, batch, **kw):
    kw = {"decay": 0.95, "decay_type": "threshold", "reference_batch_size": 32, "time_unit": "samples", **kw}
    return EMAState(model, batch_size=batch, **kw)


def test_resume_with_another_batch_rescales_and_says_so_once(tmp_path, caplog):
    model = tiny_mlp(seed=10)
    first = _ema(model, 32)
    history, _ = drive(first, model, 5, seed=11)
    first.save(tmp_path)
    resumed = _ema(model, 64)
    with caplog.at_level(logging.INFO, logger="hf_ema"):
        resumed.load(tmp_path)
    lines = [r.getMessage() for r in caplog.records if "effective batch" in r.getMessage()]
    assert len(lines) == 1 and "32 (saved) -> 64 (now)" in lines[0] and "d**2" in lines[0], lines
    assert resumed.step == 5 and resumed.samples_seen == 5 * 32 and resumed.batch_size == 64
    gen = torch.Generator().manual_seed(12)
    returned = []
    for _ in range(4):
        perturb_(model, gen)
        returned.append(resumed.update())
        history.append(float_params(model))
    # Before: schedule at samples/32 = k; after: at (160 + 64 j) / 32 = 5 + 2j, each raised to 64 / 32.
    after = [scaled_momentum(threshold_decay(0.95, 5 + 2 * j), 2) for j in range(1, 5)]
    np.testing.assert_allclose(returned, after, rtol=1e-12)
    per_step = [threshold_decay(0.95, k) for k in range(1, 6)] + after
    assert_close(resumed.state_dict()["ema"], reference_ema(history, per_step))


def test_resume_with_another_batch_is_refused_when_strict(tmp_path):
    model = tiny_mlp(seed=13)
    first = _ema(model, 32)
    drive(first, model, 3, seed=14)
    first.save(tmp_path)
    strict = _ema(tiny_mlp(seed=99), 64, strict_batch_size=True)
    before = {k: v.clone() for k, v in strict.state_dict()["ema"].items()}
    with pytest.raises(ValueError, match=r"strict_batch_size.*32.*64"):
        strict.load(tmp_path)
    assert strict.step == 0 and strict.samples_seen == 0  # a refused load changes nothing
    assert all(torch.equal(v, before[k]) for k, v in strict.state_dict()["ema"].items())
    same = _ema(tiny_mlp(seed=99), 32, strict_batch_size=True)
    same.load(tmp_path)
    assert same.step == 3


@pytest.mark.parametrize("via", ["state_dict", "files"])
def test_resume_continues_bitwise(tmp_path, via):
    kw = dict(
        decay=0.99,
        decay_type="exp",
        beta=5.0,
        total_steps=20,
        update_every=2,
        reference_batch_size=32,
        time_unit="samples",
    )
    a, b = tiny_mlp(seed=15), tiny_mlp(seed=15)
    ema_a = EMAState(a, batch_size=48, **kw)
    _, dec_a = drive(ema_a, a, 16, seed=16)

    ema_b = EMAState(b, batch_size=48, **kw)
    gen = torch.Generator().manual_seed(16)
    for _ in range(7):  # mid update_every cycle
        perturb_(b, gen)
        ema_b.update()
    if via == "files":
        ema_b.save(tmp_path)
        ema_c = EMAState.load(tmp_path, b)  # every setting, the batch size included, from ema_state.json
    else:
        sd = ema_b.state_dict()
        meta = json.loads(json.dumps(sd["meta"]))
        # Loading into an EMAState keeps its settings (see test_resume): the same settings continue the same run.
        ema_c = EMAState(b, batch_size=48, **kw)
        ema_c.load_state_dict({"ema": {k: v.clone() for k, v in sd["ema"].items()}, "meta": meta})
    assert (ema_c.reference_batch_size, ema_c.time_unit, ema_c.batch_size, ema_c.samples_seen) == (
        32,
        "samples",
        48,
        7 * 48,
    )
    dec_c = []
    for _ in range(9):
        perturb_(b, gen)
        dec_c.append(ema_c.update())
    assert dec_c == dec_a[7:]
    for k, v in ema_a.state_dict()["ema"].items():
        assert torch.equal(v, ema_c.state_dict()["ema"][k]), k


# ------------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reference_batch_size": 0, "batch_size": 8}, "reference_batch_size"),
        ({"reference_batch_size": 8.0, "batch_size": 8}, "reference_batch_size"),
        ({"reference_batch_size": 8, "batch_size": -8}, "batch_size"),
        ({"reference_batch_size": 8, "batch_size": True}, "batch_size"),
        ({"time_unit": "samples", "batch_size": 8}, "time_unit='samples'.*reference_batch_size"),
        ({"time_unit": "epochs"}, "time_unit"),
    ],
)
def test_bad_batch_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMAState(tiny_mlp(), **kwargs)
    with pytest.raises(ValueError, match=match):  # the callback checks them before training
        EMATrainerCallback(**kwargs)


def test_reference_batch_without_a_known_batch_is_refused():
    with pytest.raises(
        ValueError, match=r"reference_batch_size=32 needs the effective batch size.*batch_size="
    ):
        EMAState(tiny_mlp(), reference_batch_size=32)
    # The Trainer callback knows B only at train start (from the TrainingArguments): accepted here.
    assert EMATrainerCallback(reference_batch_size=32).ema is None


def test_strict_batch_size_must_be_bool():
    with pytest.raises(TypeError, match="strict_batch_size"):
        EMAState(tiny_mlp(), strict_batch_size="yes")


def test_accelerator_gives_the_batch_size_of_its_prepared_dataloader():
    from accelerate import Accelerator

    data = torch.utils.data.TensorDataset(torch.randn(64, 4))
    acc = Accelerator(cpu=True, gradient_accumulation_steps=3)
    model, _loader = acc.prepare(tiny_mlp(), torch.utils.data.DataLoader(data, batch_size=8))
    ema = EMAState(model, decay=0.9, accelerator=acc, reference_batch_size=8)
    assert ema.batch_size == 8 * acc.num_processes * 3
    assert math.isclose(ema.update(), 0.9 ** (ema.batch_size / 8), rel_tol=1e-12)
    # A second loader with another batch size (e.g. evaluation): ambiguous, so B must be given.
    acc.prepare(torch.utils.data.DataLoader(data, batch_size=32))
    with pytest.raises(ValueError, match=r"different batch sizes \[8, 32\].*batch_size="):
        EMAState(model, accelerator=acc, reference_batch_size=8)
    # (named: one accelerator refuses two EMAs that would save to the same folder)
    assert EMAState(model, accelerator=acc, reference_batch_size=8, batch_size=48, name="b").batch_size == 48
    assert EMAState(model, accelerator=acc, name="c").batch_size is None  # without the rule B is optional


def test_from_params_and_flags_reach_the_ema():
    params = {
        "decay": 0.99,
        "decay_type": "threshold",
        "reference_batch_size": 256,
        "time_unit": "samples",
        "strict_batch_size": True,
    }
    ema = EMAState.from_params(tiny_mlp(), params, batch_size=512)
    assert (ema.reference_batch_size, ema.time_unit, ema.strict_batch_size, ema.batch_size) == (
        256,
        "samples",
        True,
        512,
    )
    names = ("reference_batch_size", "time_unit", "strict_batch_size")
    want = {"reference_batch_size": 256, "time_unit": "samples", "strict_batch_size": True}
    cb = EMATrainerCallback.from_params(params)
    assert {k: cb.ema_kwargs[k] for k in names} == want
    (args,) = HfArgumentParser(EMAArguments).parse_args_into_dataclasses(
        [
            "--ema",
            "--ema_reference_batch_size",
            "256",
            "--ema_time_unit",
            "samples",
            "--ema_strict_batch_size",
        ]
    )
    assert {k: args.callback_kwargs()[k] for k in names} == want
    assert {k: EMATrainerCallback.from_args(args).ema_kwargs[k] for k in names} == want
    # Not given: not passed (the callback's defaults), and bad values stop the parse.
    (plain,) = HfArgumentParser(EMAArguments).parse_args_into_dataclasses([])
    assert not {"reference_batch_size", "time_unit", "strict_batch_size"} & set(plain.callback_kwargs())
    for argv, match in (
        (["--ema_time_unit", "epochs"], "time_unit"),
        (["--ema_reference_batch_size", "0"], "reference_batch_size"),
    ):
        with pytest.raises(ValueError, match=match):
            HfArgumentParser(EMAArguments).parse_args_into_dataclasses(argv)


# ------------------------------------------------------------------------------------------------ Trainer
def _train(out, cb, resume=None, **args):
    model = TinyNet()
    rec = Recorder(model)
    trainer = Trainer(
        model=model, args=training_args(out, **args), train_dataset=ToyDataset(64), callbacks=[rec, cb]
    )
    trainer.train(resume_from_checkpoint=resume)
    return rec


def _np(history):
    return [{k: v.double().numpy() for k, v in h.items()} for h in history]


def test_trainer_callback_takes_the_batch_from_training_arguments(tmp_path, caplog):
    cb = EMATrainerCallback(decay=0.8, reference_batch_size=4, update_every=2)
    with caplog.at_level(logging.INFO, logger="hf_ema.callback"):
        rec = _train(tmp_path, cb, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=6)
    assert cb.ema.batch_size == 4 * 2 * 1  # per-device batch x accumulation x processes
    per_step = [scaled_momentum(0.8, 2)] * 6
    want = reference_ema(_np(rec.history), per_step, update_every=2)
    assert_close(cb.ema.state_dict()["ema"], want)
    assert far_from(cb.ema.state_dict()["ema"], reference_ema(_np(rec.history), [0.8] * 6, update_every=2))
    lines = [r.getMessage() for r in caplog.records if "EMA horizon" in r.getMessage()]
    assert len(lines) == 1, lines
    steps = 2 / (1 - 0.8**4)  # update_every / (1 - decay ** (kappa * update_every))
    assert f"{steps:.6g} optimizer steps = {steps * 8:.6g} samples" in lines[0]
    assert f"{0.8**4:.6g} applied every 2 steps" in lines[0] and "reference batch 4" in lines[0]


def test_trainer_without_the_rule_keeps_decay_and_records_the_batch(tmp_path):
    cb = EMATrainerCallback(decay=0.8)
    rec = _train(tmp_path, cb, per_device_train_batch_size=8, max_steps=3)
    assert cb.ema.batch_size == 8 and cb.ema.samples_seen == 24 and cb.ema.last_decay == 0.8
    assert_close(cb.ema.state_dict()["ema"], reference_ema(_np(rec.history), [0.8] * 3))


def test_trainer_resume_with_another_batch_rescales_and_resume_is_bitwise(tmp_path, caplog):
    kw = dict(max_steps=8, save_strategy="steps", save_steps=4)
    cfg = dict(decay=0.9, decay_type="threshold", reference_batch_size=8, time_unit="samples")
    full_cb = EMATrainerCallback(**cfg)
    _train(tmp_path / "full", full_cb, per_device_train_batch_size=8, **kw)

    # Same batch: the resumed EMA equals the uninterrupted one bit for bit.
    same = tmp_path / "same"
    shutil.copytree(tmp_path / "full" / "checkpoint-4", same / "checkpoint-4")
    cb = EMATrainerCallback(**cfg)
    _train(same, cb, resume=str(same / "checkpoint-4"), per_device_train_batch_size=8, **kw)
    for k, v in full_cb.ema.state_dict()["ema"].items():
        assert torch.equal(cb.ema.state_dict()["ema"][k], v), k

    # Twice the batch: one line says so, and the next steps use the schedule at samples/8, squared.
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "full" / "checkpoint-4", other / "checkpoint-4")
    cb2 = EMATrainerCallback(**cfg)
    with caplog.at_level(logging.INFO, logger="hf_ema"):
        rec = _train(other, cb2, resume=str(other / "checkpoint-4"), per_device_train_batch_size=16, **kw)
    lines = [r.getMessage() for r in caplog.records if "(saved) ->" in r.getMessage()]
    assert len(lines) == 1 and "8 (saved) -> 16 (now)" in lines[0], lines
    after = [scaled_momentum(threshold_decay(0.9, 4 + 2 * j), 2) for j in range(1, 5)]
    assert cb2.ema.last_decay == pytest.approx(after[-1], rel=1e-12)
    assert cb2.ema.samples_seen == 4 * 8 + 4 * 16
    # The EMA over the resumed steps, starting from the checkpoint's EMA.
    saved = load_file(str(other / "checkpoint-4" / "ema_net" / "model.safetensors"))
    history = _np(rec.history)
    history[0] = {k: saved[k].double().numpy() for k in history[0]}
    assert_close(cb2.ema.state_dict()["ema"], reference_ema(history, after))

    strict = tmp_path / "strict"
    shutil.copytree(tmp_path / "full" / "checkpoint-4", strict / "checkpoint-4")
    with pytest.raises(ValueError, match=r"strict_batch_size.*8.*16"):
        _train(
            strict,
            EMATrainerCallback(**cfg, strict_batch_size=True),
            resume=str(strict / "checkpoint-4"),
            per_device_train_batch_size=16,
            **kw,
        )


def test_long_horizon_warning_counts_the_scaled_decay(tmp_path, caplog):
    """decay 0.99 averages over ~100 optimizer steps at the reference batch 1, but at batch 8 the rule applies
    0.99 ** 8 per step: ~13 steps, within a 20-step run, so no warning; without the rule there is one."""
    with caplog.at_level(logging.WARNING, logger="hf_ema"):
        _train(tmp_path / "a", EMATrainerCallback(decay=0.99, reference_batch_size=1), max_steps=20)
    assert not [r for r in caplog.records if "max_steps" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="hf_ema"):
        _train(tmp_path / "b", EMATrainerCallback(decay=0.99), max_steps=20)
    assert [r for r in caplog.records if "more than this run's max_steps=20" in r.getMessage()]
