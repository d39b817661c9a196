"""Resuming and loading never lose the EMA quietly: crash leftovers are finished or refused, hand-edited state is
refused naming its file, the settings rule on load (the user's object decides the settings, the file gives the
state), and Trainer resumes from a checkpoint outside ``output_dir`` and with a user-given ``total_steps``.

Expected EMA values come from NumPy float64 loops over recorded weights (``reference.py``), or from an uninterrupted
run, never from the code under test.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from _trainer_utils import Recorder, TinyNet, ToyDataset, training_args
from reference import decays_for, drive, reference_ema, threshold_decay, tiny_bert, tiny_mlp
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification, HfArgumentParser, Trainer

from hf_ema import EMAArguments, EMAFileError, EMAState, EMATrainerCallback, load_model
from hf_ema.io import EMA_DIRNAME, STATE_NAME, find_ema_dir, summarize_names
from hf_ema.loading import has_ema
from hf_ema.schedules import EMA_DECAY_FUNCTIONS, IDecayFunction


def _hf_ema_warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name.startswith("hf_ema") and r.levelno >= logging.WARNING
    ]


def _snapshot(ema: EMAState) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ema.ema_state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------------
# Names in errors
# --------------------------------------------------------------------------------------------------------


def test_summarize_names():
    assert summarize_names(["a", "b"]) == "'a', 'b'"
    assert summarize_names([]) == ""
    names = [f"n{i}" for i in range(15)]
    assert summarize_names(names, limit=3) == "'n0', 'n1', 'n2' and 12 more (15 in all)"
    assert summarize_names(iter(names[:5])) == "'n0', 'n1', 'n2', 'n3', 'n4'"


def test_mismatch_error_shows_a_few_names_and_a_count(tmp_path):
    def stack(prefix: str, width: int) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(OrderedDict((f"{prefix}{i}", nn.Linear(3, width)) for i in range(30)))

    EMAState(stack("layer", 3), decay=0.9).save(tmp_path)
    with pytest.raises(EMAFileError) as info:
        EMAState.load(tmp_path, stack("block", 3))
    msg = str(info.value)
    assert "'block0.weight'" in msg and "'layer0.weight'" in msg
    assert msg.count("and 55 more (60 in all)") == 2, msg
    assert len(msg) < 700, len(msg)
    with pytest.raises(ValueError) as info:
        EMAState(stack("layer", 4), decay=0.9).load_state_dict(
            EMAState(stack("layer", 3), decay=0.9).state_dict()
        )
    msg = str(info.value)
    assert "and 55 more (60 in all)" in msg and "saved (3, 3) vs model (4, 3)" in msg, msg
    assert len(msg) < 500, len(msg)


# --------------------------------------------------------------------------------------------------------
# Hand-edited ema_state.json
# --------------------------------------------------------------------------------------------------------

BAD_META = [
    ("update_every", 0),
    ("step", -3),
    ("step", "3"),
    ("step", 2.5),
    ("step", True),
    ("num_updates", 99),
    ("num_updates", -1),
    ("decay", 1.5),
    ("decay", "0.9"),
    ("last_decay", 2.0),
    ("total_steps", 0),
    ("trainable_only", "yes"),
    ("buffers", "mean"),
    ("dtype", "int32"),
    ("schedule_kwargs", [1]),
    ("decay_type", 3),
]


def _saved_with(tmp_path: Path, **edits) -> tuple[nn.Module, Path]:
    model = tiny_mlp()
    ema = EMAState(model, decay=0.9)
    drive(ema, model, 3)
    ema.save(tmp_path)
    state = tmp_path / EMA_DIRNAME / STATE_NAME
    meta = json.loads(state.read_text())
    meta.update(edits)
    for key in [k for k, v in edits.items() if v is KeyError]:
        del meta[key]
    state.write_text(json.dumps(meta))
    return model, state


@pytest.mark.parametrize(("key", "value"), BAD_META)
def test_hand_edited_state_is_refused_naming_the_file(tmp_path, key, value):
    model, state = _saved_with(tmp_path, **{key: value})
    fresh = EMAState(copy.deepcopy(model), decay=0.9)
    before = _snapshot(fresh)
    loaders = {
        "EMAState.load": lambda: EMAState.load(tmp_path, copy.deepcopy(model)),
        "ema.load": lambda: fresh.load(tmp_path),
        "load_model": lambda: load_model(tiny_mlp(seed=3), tmp_path),
    }
    for what, load in loaders.items():
        with pytest.raises(EMAFileError) as info:
            load()
        msg = str(info.value)
        assert str(state) in msg and repr(key) in msg and repr(value) in msg, (what, msg)
    assert fresh.step == 0 and _same(_snapshot(fresh), before)  # a refused load changes nothing


def test_state_without_step_is_refused_naming_the_file(tmp_path):
    model, state = _saved_with(tmp_path, step=KeyError)
    with pytest.raises(EMAFileError, match="'step' is missing") as info:
        EMAState(copy.deepcopy(model), decay=0.9).load(tmp_path)
    assert str(state) in str(info.value)


def test_state_dict_with_bad_meta_is_refused():
    ema = EMAState(tiny_mlp(), decay=0.9)
    sd = ema.state_dict()
    sd["meta"] = {**sd["meta"], "update_every": 0}
    with pytest.raises(
        ValueError, match=r"state dict's 'meta'.*'update_every' must be an integer >= 1, got 0"
    ):
        EMAState(tiny_mlp(), decay=0.9).load_state_dict(sd)


# --------------------------------------------------------------------------------------------------------
# Settings on load: the object decides the settings, the file gives the state
# --------------------------------------------------------------------------------------------------------


def test_loading_keeps_the_objects_settings_and_continues_from_the_saved_step(tmp_path, caplog):
    model = tiny_mlp(seed=1)
    saved = EMAState(model, decay=0.95, decay_type="exp", beta=5.0, total_steps=20, update_every=3)
    drive(saved, model, 7, seed=2)
    saved.save(tmp_path)
    saved_ema = {k: v.double().numpy() for k, v in saved.ema_state_dict().items()}

    mine_model = copy.deepcopy(model)
    mine = EMAState(mine_model, decay=0.9, decay_type="threshold", update_every=2)
    with caplog.at_level(logging.WARNING):
        mine.load(tmp_path)
    (warning,) = _hf_ema_warnings(caplog)  # one message
    for part in (str(tmp_path / EMA_DIRNAME / STATE_NAME), "decay 0.95 -> 0.9", "'exp' -> 'threshold'"):
        assert part in warning, warning
    assert "update_every 3 -> 2" in warning and "step 7" in warning, warning
    assert (mine.decay, mine.decay_type, mine.update_every) == (0.9, "threshold", 2)
    assert (mine.step, mine.num_updates, mine.last_decay) == (7, 2, saved.last_decay)
    assert mine.total_steps == 20  # the object had none: the saved one

    # It continues with its own schedule after the saved step: d_t = min(0.9, (1 + t) / (10 + t)) with t the 1-based
    # count of optimizer steps, t = 8, 9, ..., averaging with d_t**2 when t % 2 == 0, from the saved EMA.
    history, returned = drive(mine, mine_model, 5, seed=3)
    ema = {k: v.copy() for k, v in saved_ema.items()}
    for j, live in enumerate(history[1:]):
        t = 8 + j
        d = threshold_decay(0.9, t)
        assert returned[j] == d
        if t % 2 == 0:
            ema = {k: ema[k] * d**2 + live[k] * (1 - d**2) for k in ema}
    got = mine.ema_state_dict()
    for k in ema:
        np.testing.assert_allclose(got[k].double().numpy(), ema[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_an_explicit_total_steps_wins_over_the_saved_one(tmp_path, caplog):
    model = tiny_mlp()
    EMAState(model, decay=0.9, decay_type="exp", total_steps=20).save(tmp_path)
    mine = EMAState(copy.deepcopy(model), decay=0.9, decay_type="exp", total_steps=50)
    with caplog.at_level(logging.WARNING):
        mine.load(tmp_path)
    assert mine.total_steps == 50
    (warning,) = _hf_ema_warnings(caplog)
    assert "total_steps 20 -> 50" in warning


def test_same_settings_load_without_a_warning(tmp_path, caplog):
    model = tiny_mlp()
    kwargs = dict(decay=0.9, decay_type="exp", beta=3.0, total_steps=20, update_every=2)
    EMAState(model, **kwargs).save(tmp_path)
    with caplog.at_level(logging.WARNING):
        EMAState(copy.deepcopy(model), **kwargs).load(tmp_path)
        EMAState.load(tmp_path, copy.deepcopy(model))
    assert _hf_ema_warnings(caplog) == []


class _RampDecay(IDecayFunction):
    """``decay * min(1, (1 + step) / total_steps)`` (a schedule that exists only in this test)."""

    requires_total_steps = True

    def __call__(self, decay, step, total_steps):
        return decay * min(1.0, (1 + step) / total_steps)


def test_unregistered_saved_schedule(tmp_path, caplog, monkeypatch):
    model = tiny_mlp()
    with monkeypatch.context() as mp:
        mp.setitem(EMA_DECAY_FUNCTIONS, "test_ramp", _RampDecay)
        ema = EMAState(model, decay=0.9, decay_type="test_ramp", total_steps=10)
        drive(ema, model, 3)
        ema.save(tmp_path)
    assert "test_ramp" not in EMA_DECAY_FUNCTIONS
    state = tmp_path / EMA_DIRNAME / STATE_NAME

    # Into an EMAState that has its own schedule: not an error, one message.
    mine = EMAState(copy.deepcopy(model), decay=0.9, decay_type="constant")
    with caplog.at_level(logging.WARNING):
        mine.load(tmp_path)
    (warning,) = _hf_ema_warnings(caplog)
    assert "'test_ramp' -> 'constant'" in warning, warning
    assert mine.decay_type == "constant" and mine.step == 3

    # Built from the file's settings: a clear error naming the file, and the way out.
    with pytest.raises(EMAFileError) as info:
        EMAState.load(tmp_path, copy.deepcopy(model))
    msg = str(info.value)
    assert str(state) in msg and "'test_ramp'" in msg and "decay_type=" in msg, msg
    back = EMAState.load(tmp_path, copy.deepcopy(model), decay_type="threshold")
    assert back.decay_type == "threshold" and back.step == 3 and back.decay == 0.9


def test_classmethod_load_overrides(tmp_path):
    model = tiny_mlp()
    ema = EMAState(model, decay=0.95, decay_type="exp", beta=5.0, total_steps=20, update_every=3)
    drive(ema, model, 4)
    ema.save(tmp_path)
    back = EMAState.load(tmp_path, copy.deepcopy(model), decay=0.5)
    assert (back.decay, back.decay_type, back.schedule.beta, back.update_every) == (0.5, "exp", 5.0, 3)
    assert back.step == 4 and _same(_snapshot(back), _snapshot(ema))


# --------------------------------------------------------------------------------------------------------
# What a crash inside save_ema_net leaves (the states are made by hand here; test_kill_resume.py kills real runs)
# --------------------------------------------------------------------------------------------------------


def _saved_bert(directory: Path, seed: int = 0, steps: int = 3) -> dict[str, torch.Tensor]:
    model = tiny_bert(seed=seed)
    ema = EMAState(model, decay=0.7)
    drive(ema, model, steps, seed=seed + 1)
    ema.save(directory)
    return _snapshot(ema)


def _loads_as(folder: Path, want: dict[str, torch.Tensor]) -> None:
    loaded = AutoModelForSequenceClassification.from_pretrained(folder)
    sd = loaded.state_dict()
    for name, t in want.items():
        assert torch.equal(sd[name], t), name


def test_complete_save_left_under_its_temporary_name_is_finished_on_disk(tmp_path, caplog):
    ckpt = tmp_path / "checkpoint-4"
    saved = _saved_bert(ckpt)
    # A kill after the commit record (ema_state.json) and before the rename leaves exactly this:
    os.rename(ckpt / EMA_DIRNAME, ckpt / ".ema_net.tmp-0a1b2c3d")
    with pytest.raises(OSError):
        AutoModelForSequenceClassification.from_pretrained(ckpt / EMA_DIRNAME)
    with caplog.at_level(logging.WARNING):
        assert has_ema(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == [EMA_DIRNAME]
    assert any("interrupted save" in w for w in _hf_ema_warnings(caplog))
    _loads_as(ckpt / EMA_DIRNAME, saved)


def test_kill_between_the_renames_publishes_the_new_ema(tmp_path):
    ckpt = tmp_path / "checkpoint-4"
    _saved_bert(ckpt, seed=0)  # the ema_net being replaced
    new = _saved_bert(tmp_path / "scratch", seed=5, steps=4)
    os.rename(ckpt / EMA_DIRNAME, ckpt / ".ema_net.old-11111111")
    os.rename(tmp_path / "scratch" / EMA_DIRNAME, ckpt / ".ema_net.tmp-22222222")
    assert find_ema_dir(ckpt / EMA_DIRNAME) == ckpt / EMA_DIRNAME  # also given the ema_net path itself
    assert sorted(p.name for p in ckpt.iterdir()) == [EMA_DIRNAME]
    _loads_as(ckpt / EMA_DIRNAME, new)
    assert EMAState.load(ckpt, tiny_bert()).step == 4


@pytest.mark.parametrize("damage", ["no_state", "state_not_renamed", "state_not_json", "weights_truncated"])
def test_an_unfinished_save_is_never_used(tmp_path, damage):
    ckpt = tmp_path / "checkpoint-4"
    _saved_bert(tmp_path / "scratch")
    tmp = ckpt / ".ema_net.tmp-33333333"
    ckpt.mkdir()
    os.rename(tmp_path / "scratch" / EMA_DIRNAME, tmp)
    if damage == "no_state":  # killed before the commit record
        (tmp / STATE_NAME).unlink()
    elif damage == "state_not_renamed":  # killed inside atomic_write_text, before its rename
        os.rename(tmp / STATE_NAME, tmp / ".ema_state.json.x.tmp")
    elif damage == "state_not_json":
        (tmp / STATE_NAME).write_text('{"step": ')
    else:  # not left by save_ema_net (its weights are flushed first), but refused all the same
        weights = tmp / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    assert find_ema_dir(ckpt) is None and not has_ema(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == [tmp.name]  # left alone
    with pytest.raises(EMAFileError) as info:
        EMAState.load(ckpt, tiny_bert())
    assert str(ckpt) in str(info.value)


def test_the_writer_accepts_a_reader_that_finished_its_save(tmp_path, monkeypatch):
    """A reader between the writer's commit record and its rename publishes the save; the save still succeeds."""
    model = tiny_bert()
    ema = EMAState(model, decay=0.7)
    drive(ema, model, 2)
    real_replace = os.replace
    readers = []

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == EMA_DIRNAME and Path(src).name.startswith(".ema_net.tmp-"):
            readers.append(find_ema_dir(Path(dst).parent))  # another process loading the checkpoint right now
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    assert ema.save(tmp_path) == tmp_path / EMA_DIRNAME
    assert readers == [tmp_path / EMA_DIRNAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == [EMA_DIRNAME]
    _loads_as(tmp_path / EMA_DIRNAME, _snapshot(ema))


def test_a_finished_save_that_cannot_be_renamed_is_read_where_it_is(tmp_path, monkeypatch, caplog):
    ckpt = tmp_path / "ckpt"
    saved = _saved_bert(ckpt)
    os.rename(ckpt / EMA_DIRNAME, ckpt / ".ema_net.tmp-44444444")

    def read_only(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(os, "rename", read_only)
    with caplog.at_level(logging.WARNING):
        assert find_ema_dir(ckpt) == ckpt / ".ema_net.tmp-44444444"
        back = EMAState.load(ckpt, tiny_bert())
    assert _same(_snapshot(back), saved)
    assert any("cannot be renamed" in w for w in _hf_ema_warnings(caplog))


@pytest.mark.skipif(
    not Path("/proc/self/fd").is_dir(), reason="reads the paths of file descriptors from /proc"
)
def test_save_flushes_the_data_before_the_commit_record_and_each_rename(tmp_path, monkeypatch):
    model = tiny_bert()
    ema = EMAState(model, decay=0.7)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", str(dst)))
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ema.save(tmp_path)
    (tmp,) = {Path(p).parent for kind, p in events if kind == "fsync" and Path(p).name == "model.safetensors"}

    def at(kind, path):
        return events.index((kind, str(path)))

    commit, publish = at("replace", tmp / STATE_NAME), at("replace", tmp_path / EMA_DIRNAME)
    assert at("fsync", tmp / "model.safetensors") < commit
    assert at("fsync", tmp / "config.json") < commit
    assert ("fsync", str(tmp)) in events[commit:publish]  # the commit record is durable before the rename
    assert ("fsync", str(tmp_path)) in events[publish:]  # and so is the rename


# --------------------------------------------------------------------------------------------------------
# Trainer resumes
# --------------------------------------------------------------------------------------------------------


def _trainer_cannot_load_its_rng_state() -> bool:
    src = inspect.getsource(Trainer._load_rng_state)
    return tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 6) and "torch.load(rng_file)" in src


needs_resume = pytest.mark.skipif(
    _trainer_cannot_load_its_rng_state(),
    reason="this transformers Trainer cannot resume under torch>=2.6 (torch.load of rng_state.pth, weights_only)",
)
KW = dict(max_steps=12, save_strategy="steps", save_steps=4)


def _train(out: Path, model: nn.Module, cb: EMATrainerCallback, resume=None, **overrides) -> Recorder:
    rec = Recorder(model)
    trainer = Trainer(
        model=model,
        args=training_args(out, **{**KW, **overrides}),
        train_dataset=ToyDataset(64),
        callbacks=[rec, cb],
    )
    trainer.train(resume_from_checkpoint=resume)
    return rec


def _np(history):
    return [{k: v.double().numpy() for k, v in h.items()} for h in history]


def _assert_close(tensors, ref):
    for n in ref:
        np.testing.assert_allclose(tensors[n].double().numpy(), ref[n], rtol=1e-5, atol=1e-6, err_msg=n)


@needs_resume
def test_resume_from_a_checkpoint_outside_output_dir(tmp_path):
    cb = EMATrainerCallback(decay=0.8, decay_type="exp", beta=5.0)
    rec = _train(tmp_path / "run", TinyNet(), cb)
    _assert_close(
        cb.ema.ema_state_dict(), reference_ema(_np(rec.history), decays_for("exp", 0.8, 12, 12, beta=5.0))
    )
    full = _snapshot(cb.ema)
    archive = tmp_path / "archive" / "backup-of-step-8"  # not named checkpoint-N, not under any output_dir
    shutil.copytree(tmp_path / "run" / "checkpoint-8", archive)
    shutil.rmtree(tmp_path / "run")

    cb2 = EMATrainerCallback(decay=0.8, decay_type="exp", beta=5.0)
    rec2 = _train(tmp_path / "new_output", TinyNet(seed=9), cb2, resume=str(archive))
    assert rec2.start_step == 8 and cb2.ema.step == 12
    assert _same(_snapshot(cb2.ema), full)


@needs_resume
def test_user_given_total_steps_drives_the_schedule_and_survives_resume(tmp_path):
    cb = EMATrainerCallback(decay=0.9, decay_type="exp", beta=4.0, total_steps=40)
    rec = _train(tmp_path / "run", TinyNet(), cb)
    history = _np(rec.history)
    _assert_close(cb.ema.ema_state_dict(), reference_ema(history, decays_for("exp", 0.9, 12, 40, beta=4.0)))
    with_max_steps = reference_ema(history, decays_for("exp", 0.9, 12, 12, beta=4.0))
    got = cb.ema.ema_state_dict()
    assert max(float(np.abs(got[n].double().numpy() - with_max_steps[n]).max()) for n in got) > 1e-3
    meta = json.loads((tmp_path / "run" / "checkpoint-8" / EMA_DIRNAME / STATE_NAME).read_text())
    assert meta["total_steps"] == 40

    cb2 = EMATrainerCallback(decay=0.9, decay_type="exp", beta=4.0, total_steps=40)
    _train(tmp_path / "run", TinyNet(seed=3), cb2, resume=str(tmp_path / "run" / "checkpoint-8"))
    assert cb2.ema.total_steps == 40 and _same(_snapshot(cb2.ema), _snapshot(cb.ema))


@needs_resume
def test_resume_with_other_settings_uses_them_from_the_saved_step(tmp_path, caplog):
    cb = EMATrainerCallback(decay=0.8, decay_type="exp", beta=5.0)
    _train(tmp_path / "run", TinyNet(), cb)
    ckpt = tmp_path / "run" / "checkpoint-8"
    saved = {
        k: v.double().numpy() for k, v in load_file(str(ckpt / EMA_DIRNAME / "model.safetensors")).items()
    }

    cb2 = EMATrainerCallback(decay=0.6, decay_type="exp", beta=5.0)
    with caplog.at_level(logging.WARNING):
        rec = _train(tmp_path / "run", TinyNet(seed=4), cb2, resume=str(ckpt))
    (warning,) = _hf_ema_warnings(caplog)
    assert "decay 0.8 -> 0.6" in warning and "step 8" in warning, warning
    # From the saved EMA, the new decay after the saved step: d_t = 0.6 * (1 - exp(-5 t / 12)), t = 9 .. 12 (the
    # 1-based count of optimizer steps done).
    ema = saved
    for j, live in enumerate(_np(rec.history)[1:]):
        d = 0.6 * (1 - math.exp(-5.0 * (9 + j) / 12))
        ema = {k: ema[k] * d + live[k] * (1 - d) for k in ema}
    _assert_close(cb2.ema.ema_state_dict(), ema)


@needs_resume
def test_incomplete_ema_net_stops_the_resume_unless_allowed(tmp_path, caplog):
    _train(tmp_path / "run", TinyNet(), EMATrainerCallback(decay=0.8), max_steps=8)
    ckpt = tmp_path / "run" / "checkpoint-8"
    (ckpt / EMA_DIRNAME / "model.safetensors").unlink()
    rec = Recorder(TinyNet())
    with pytest.raises(EMAFileError) as info:
        _train(tmp_path / "run", rec.model, EMATrainerCallback(decay=0.8), resume=True, max_steps=10)
    msg = str(info.value)
    assert (
        str(ckpt) in msg and "incomplete" in msg and "model.safetensors" in msg and "allow_ema_restart" in msg
    )
    cb = EMATrainerCallback(decay=0.8, allow_ema_restart=True)
    with caplog.at_level(logging.WARNING):
        _train(tmp_path / "run", TinyNet(), cb, resume=True, max_steps=10)
    assert cb.ema.step == 10
    assert any("allow_ema_restart=True" in w for w in _hf_ema_warnings(caplog))


def test_allow_ema_restart_argument_and_flag():
    with pytest.raises(TypeError, match="allow_ema_restart"):
        EMATrainerCallback(allow_ema_restart="yes")
    assert EMATrainerCallback().allow_ema_restart is False
    (args,) = HfArgumentParser(EMAArguments).parse_args_into_dataclasses(["--ema", "--ema_allow_restart"])
    assert EMATrainerCallback.from_args(args).allow_ema_restart is True
