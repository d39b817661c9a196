"""What a Trainer user sees of EMATrainerCallback: log lines under ``log_level``, the long-horizon warning, the
decay in the training logs, and evaluating the EMA after ``replace_at_end=False``."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from _trainer_utils import Recorder, TinyNet, ToyDataset, training_args
from reference import decays_for, reference_ema
from transformers import Trainer
from transformers.utils import logging as hf_logging

from hf_ema import EMATrainerCallback


@pytest.fixture(autouse=True)
def keep_transformers_verbosity():
    """The Trainer hands ``log_level`` to transformers' global verbosity and never puts it back."""
    before = hf_logging.get_verbosity()
    yield
    hf_logging.set_verbosity(before)


def run(tmp_path, cb, resume=None, model=None, **args):
    model = model if model is not None else TinyNet()
    rec = Recorder(model)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, **args),
        train_dataset=ToyDataset(64),
        eval_dataset=ToyDataset(32, seed=1),
        callbacks=[rec, cb],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, rec


def hf_ema_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("hf_ema")]


def _trainer_cannot_load_its_rng_state() -> bool:
    import inspect

    src = inspect.getsource(Trainer._load_rng_state)
    new_torch = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 6)
    return new_torch and "torch.load(rng_file)" in src


# ---------------------------------------------------------------------------------------------- log_level
@pytest.mark.skipif(
    _trainer_cannot_load_its_rng_state(),
    reason="this transformers Trainer cannot resume under torch>=2.6 (torch.load of rng_state.pth, weights_only)",
)
@pytest.mark.parametrize("log_level", ["info", "warning"])
def test_log_level_controls_the_ema_lines(tmp_path, caplog, log_level):
    lib = logging.getLogger("hf_ema")
    level_before = lib.level
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, log_level=log_level)
    run(tmp_path, EMATrainerCallback(decay=0.5), **kw)
    run(tmp_path, EMATrainerCallback(decay=0.5), resume=str(tmp_path / "checkpoint-2"), **kw)
    lines = hf_ema_lines(caplog)
    built = [m for m in lines if m.startswith("EMA built")]
    saved = [m for m in lines if m.startswith("EMA saved to")]
    restored = [m for m in lines if m.startswith("EMA restored from")]
    if log_level == "info":
        assert len(built) == 2 and "decay=0.5" in built[0]
        assert saved[:2] == [
            f"EMA saved to {tmp_path / 'checkpoint-2' / 'ema_net'}",
            f"EMA saved to {tmp_path / 'checkpoint-4' / 'ema_net'}",
        ]
        assert restored == [f"EMA restored from {tmp_path / 'checkpoint-2' / 'ema_net'} (EMA step 2)"]
    else:
        assert built == saved == restored == []
    assert lib.level == level_before  # put back after training: later, non-Trainer use logs as configured


def test_without_logging_configured_the_lines_reach_stderr(tmp_path, capsys):
    """A script that configured no logging still sees hf_ema's lines at log_level="info", like transformers'."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()  # a plain script: no handler anywhere (pytest adds its own to the root logger)
    try:
        run(tmp_path / "passive", EMATrainerCallback(decay=0.5), max_steps=2)  # log_level="passive"
        quiet = capsys.readouterr().err
        run(tmp_path / "info", EMATrainerCallback(decay=0.5), max_steps=2, log_level="info")
        loud = capsys.readouterr().err
    finally:
        root.handlers[:] = saved
    assert "[hf_ema] EMA built" not in quiet
    assert "[hf_ema] EMA built: decay=0.5" in loud
    assert logging.getLogger("hf_ema").handlers == []  # the handler leaves with the training run


# ---------------------------------------------------------------------------------------------- horizon
@pytest.mark.parametrize(
    ("decay", "decay_type", "update_every", "warns"),
    [
        (0.99, "constant", 1, True),  # horizon 100 > 20
        (0.9999, "threshold", 1, True),  # the README's decay on a short run
        (0.5, "constant", 30, True),  # averages every 30 steps: never within 20 steps
        (0.9, "constant", 1, False),  # horizon 10 <= 20
        (0.9, "constant", 2, False),  # horizon 2 / (1 - 0.81) = 10.5 <= 20
        (0.9999, "power", 1, False),  # the power EMA ignores `decay`: its width is relative to training time
    ],
)
def test_long_horizon_warns_once_at_train_start(tmp_path, caplog, decay, decay_type, update_every, warns):
    kwargs = {"sigma_rel": 0.1} if decay_type == "power" else {}
    cb = EMATrainerCallback(decay=decay, decay_type=decay_type, update_every=update_every, **kwargs)
    with caplog.at_level(logging.WARNING, logger="hf_ema"):
        run(tmp_path, cb, max_steps=20, eval_strategy="steps", eval_steps=10)
    found = [m for m in hf_ema_lines(caplog) if "optimizer steps" in m]
    if not warns:
        assert found == []
        return
    horizon = update_every / (1 - decay**update_every)  # steps until a weight's share falls by e
    assert len(found) == 1, found
    assert f"about {round(horizon)} optimizer steps" in found[0] and "max_steps=20" in found[0]
    if decay_type == "constant":  # the share the initial weights keep after 20 steps
        share = decay ** (update_every * (20 // update_every))
        assert f"initial weights keep {share:.0%}" in found[0]


# ---------------------------------------------------------------------------------------------- decay in logs
@pytest.mark.parametrize("update_every", [1, 3])
def test_logs_show_per_step_and_applied_decay(tmp_path, update_every):
    cb = EMATrainerCallback(decay=0.9, update_every=update_every)
    trainer, rec = run(tmp_path, cb, max_steps=7)
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert sorted(logs) == list(range(1, 8))
    assert all(logs[s]["ema_decay"] == 0.9 for s in logs)  # the schedule's decay of each optimizer step
    if update_every == 1:
        assert not any("ema_decay_applied" in h for h in logs.values())
    else:  # averaging at steps 3 and 6, each with 0.9**3; none before the first one
        assert [s for s in logs if "ema_decay_applied" in logs[s]] == [3, 4, 5, 6, 7]
        assert all(logs[s]["ema_decay_applied"] == pytest.approx(0.9**3, rel=1e-12) for s in range(3, 8))
    ref = reference_ema(
        [{k: v.double().numpy() for k, v in h.items()} for h in rec.history],
        decays_for("constant", 0.9, 7),
        update_every=update_every,
    )
    for n, t in cb.ema.state_dict()["ema"].items():
        np.testing.assert_allclose(t.double().numpy(), ref[n], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- replace_at_end
def test_replace_at_end_false_evaluate_the_ema_with_average_parameters(tmp_path):
    """The README's recipe: after train() the model holds the training weights; the EMA is evaluated inside
    ``callback.ema.average_parameters()``."""
    cb = EMATrainerCallback(decay=0.8, replace_at_end=False)
    trainer, rec = run(tmp_path, cb, max_steps=10)
    raw = trainer.evaluate()["eval_loss"]
    with cb.ema.average_parameters():
        ema = trainer.evaluate()["eval_loss"]
    after = trainer.evaluate()["eval_loss"]
    assert after == raw  # training weights back

    def loss_of(weights):
        model = TinyNet()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(torch.as_tensor(np.asarray(weights[n]), dtype=p.dtype))
        return Trainer(
            model=model, args=training_args(tmp_path / "x"), eval_dataset=ToyDataset(32, seed=1)
        ).evaluate()["eval_loss"]

    hist = [{k: v.double().numpy() for k, v in h.items()} for h in rec.history]
    assert raw == pytest.approx(loss_of(hist[-1]), rel=1e-6)
    assert ema == pytest.approx(loss_of(reference_ema(hist, decays_for("constant", 0.8, 10))), rel=1e-5)
    assert not math.isclose(raw, ema, rel_tol=1e-4)
