"""PostHocEMACallback (post-hoc EMA in the Trainer), PostHocEMA with Accelerate's save_state / load_state, the
``--ema_posthoc`` flags, and the post-hoc example.

Expected snapshot values come from the definition of the power-function EMA evaluated in float64 over the training
weights that ``_trainer_utils.Recorder`` records after every optimizer step (``_ref_power``), never from hf_ema.
Resume checks compare a resumed run's folder byte for byte with an uninterrupted run's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _trainer_utils import Recorder, TinyNet, ToyDataset, training_args
from safetensors.torch import load_file
from torch import nn
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainerControl, TrainerState

from hf_ema import EMAArguments, EMATrainerCallback, PostHocEMA, PostHocEMACallback, synthesize
from hf_ema.posthoc import PostHocError, read_manifest
from hf_ema.power import sigma_rel_to_gamma

SIGMAS = (0.05, 0.10)


def _ref_power(history: list[dict[str, torch.Tensor]], name: str, sigma_rel: float, t: int) -> np.ndarray:
    """Float64 power EMA at optimizer step ``t``: ``theta_s`` (``history[s]``, the weights after step ``s``) weighs
    ``(s**(g+1) - (s-1)**(g+1)) / t**(g+1)``, the integral of ``p_t(tau) = (g+1) tau**g / t**(g+1)`` over
    ``(s-1, s]``."""
    g = sigma_rel_to_gamma(sigma_rel)
    out = np.zeros(history[0][name].shape)
    for s in range(1, t + 1):
        out += (s ** (g + 1) - (s - 1) ** (g + 1)) / t ** (g + 1) * history[s][name].double().numpy()
    return out


def _train(out, callbacks, model=None, resume=None, eval_data=None, **kw):
    """``Trainer.train`` with ``[Recorder, *callbacks]`` on the toy problem; ``kw`` go to ``training_args``."""
    model = model if model is not None else TinyNet()
    rec = Recorder(model)
    trainer = Trainer(
        model=model,
        args=training_args(out, **kw),
        train_dataset=ToyDataset(64),
        eval_dataset=eval_data,
        callbacks=[rec, *callbacks],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, rec


def _folder_bytes(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- snapshots in a Trainer run
def test_trainer_snapshots_match_the_power_ema_of_the_training_weights(tmp_path):
    """Gradient accumulation (one update per optimizer step), an EMATrainerCallback listed *before* the post-hoc
    one that swaps its EMA in for evaluations at the snapshot steps (the profiles must still average the training
    weights), fp32 snapshot files equal to the float64 power EMA, and the synthesis of a tracked sigma_rel equal to
    its snapshot."""
    ema_cb = EMATrainerCallback(decay=0.8)
    cb = PostHocEMACallback(sigma_rels=SIGMAS, snapshot_every=5, snapshot_dtype="float32", run_id="r")
    _, rec = _train(
        tmp_path,
        [ema_cb, cb],
        max_steps=20,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=4,
        eval_strategy="steps",
        eval_steps=5,
        eval_data=ToyDataset(16, seed=1),
    )
    assert rec.leaks == [] and len(rec.history) == 21 and rec.substeps == 20
    run = tmp_path / "posthoc"
    assert cb.run_dir == run and cb.posthoc.step == 20
    manifest = read_manifest(run)
    entries = manifest["snapshots"]
    assert [(e["step"], e["profile"]) for e in entries] == [(s, p) for s in (5, 10, 15, 20) for p in (0, 1)]
    assert {p.name for p in (run / "snapshots").iterdir()} == {
        Path(f).name for e in entries for f in e["files"]
    }
    for e in entries:
        snap = load_file(str(run / e["files"][0]))
        assert snap.keys() == rec.history[0].keys() and e["sigma_rel"] == SIGMAS[e["profile"]]
        for name, got in snap.items():
            want = _ref_power(rec.history, name, SIGMAS[e["profile"]], e["step"])
            np.testing.assert_allclose(
                got.double().numpy(), want, rtol=1e-5, atol=1e-6, err_msg=f"{name} {e}"
            )
    # The evaluations really had the EMA in the model (otherwise this would test nothing).
    assert not torch.equal(rec.eval_weights[5]["fc1.weight"], rec.history[5]["fc1.weight"])

    res = synthesize(run, sigma_rel=[0.10], progress=False)[0]
    assert res.step == 20 and res.residual < 1e-6
    last = load_file(str(run / entries[-1]["files"][0]))
    for k, v in last.items():
        torch.testing.assert_close(res.tensors[k], v, rtol=0, atol=1e-5 * float(v.abs().max()))


def test_evaluate_sigma_rel_evaluates_that_profile(tmp_path):
    cb = PostHocEMACallback(sigma_rels=SIGMAS, snapshot_every=4, evaluate_sigma_rel=0.10)
    _, rec = _train(
        tmp_path, [cb], max_steps=8, eval_strategy="steps", eval_steps=4, eval_data=ToyDataset(16, 1)
    )
    assert rec.leaks == []  # training weights back, bitwise, before every step
    assert sorted(rec.eval_weights) == [4, 8]
    for step, weights in rec.eval_weights.items():
        for name, got in weights.items():
            want = _ref_power(rec.history, name, 0.10, step)
            np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)
    # the model ends with the training weights
    assert all(torch.equal(p, rec.history[-1][n]) for n, p in cb.posthoc.model.named_parameters())


def test_skipped_optimizer_step_is_not_counted(tmp_path):
    cb = PostHocEMACallback(snapshot_every=2, run_dir=tmp_path / "run")
    _train(tmp_path, [cb], max_steps=2)
    args, state = training_args(tmp_path), TrainerState(global_step=3, max_steps=4)
    before = [p.state_dict()["ema"]["fc1.weight"].clone() for p in cb.posthoc.profiles]
    cb.on_step_end(args, state, TrainerControl(), optimizer=SimpleNamespace(step_was_skipped=True))
    assert cb.posthoc.step == 2
    assert all(
        torch.equal(p.state_dict()["ema"]["fc1.weight"], b)
        for p, b in zip(cb.posthoc.profiles, before, strict=True)
    )
    cb.on_step_end(args, state, TrainerControl(), optimizer=SimpleNamespace(step_was_skipped=False))
    assert cb.posthoc.step == 3


# ----------------------------------------------------------------------------- resume
class _StopAt(TrainerCallback):
    """Ends training (gracefully: on_train_end runs) after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    """An uninterrupted 20-step run, and one stopped at step 17 (after the step-15 snapshot, with a final snapshot
    at 17) then resumed from checkpoint-10 into the same folders with a new model of other initial weights."""
    root = tmp_path_factory.mktemp("posthoc_resume")
    kw = dict(max_steps=20, save_strategy="steps", save_steps=10)
    full = PostHocEMACallback(snapshot_every=5, run_id="run-1")
    _train(root / "full", [full], **kw)

    first = PostHocEMACallback(snapshot_every=5, run_id="run-1")
    _train(root / "resumed", [first, _StopAt(17)], **kw)
    interrupted_steps = [e["step"] for e in read_manifest(root / "resumed" / "posthoc")["snapshots"]]
    stale = [
        root / "resumed" / "posthoc" / f
        for e in read_manifest(root / "resumed" / "posthoc")["snapshots"]
        if e["step"] == 17
        for f in e["files"]
    ]
    second = PostHocEMACallback(snapshot_every=5)  # the run id comes back from the checkpoint
    _, rec = _train(
        root / "resumed",
        [second],
        model=TinyNet(seed=123),
        resume=str(root / "resumed" / "checkpoint-10"),
        **kw,
    )
    return SimpleNamespace(
        root=root, interrupted_steps=interrupted_steps, stale=stale, second=second, rec=rec, full=full
    )


def test_resume_from_a_middle_checkpoint_is_byte_identical(resumed_runs):
    r = resumed_runs
    assert r.interrupted_steps == [5, 5, 10, 10, 15, 15, 17, 17]  # the stopped run's last snapshot is at 17
    assert r.rec.start_step == 10 and r.second.posthoc.step == 20 and r.second.posthoc.run_id == "run-1"
    assert r.stale and not any(f.exists() for f in r.stale)
    a = _folder_bytes(r.root / "full" / "posthoc")
    b = _folder_bytes(r.root / "resumed" / "posthoc")
    assert list(a) == list(b)  # same files: none stale, none duplicated
    assert [k for k in a if a[k] != b[k]] == []  # manifest and every snapshot byte-identical
    steps = [e["step"] for e in read_manifest(r.root / "resumed" / "posthoc")["snapshots"]]
    assert steps == [5, 5, 10, 10, 15, 15, 20, 20]
    sa = synthesize(r.root / "full" / "posthoc", sigma_rel=[0.03, 0.2], at_step=18, progress=False)
    sb = synthesize(r.root / "resumed" / "posthoc", sigma_rel=[0.03, 0.2], at_step=18, progress=False)
    for x, y in zip(sa, sb, strict=True):
        assert all(torch.equal(x.tensors[k], y.tensors[k]) for k in x.tensors)
    # each checkpoint carries the profiles' state, and a profile loads as model weights
    ckpt = r.root / "full" / "checkpoint-10" / "posthoc_ema"
    assert json.loads((ckpt / "posthoc_state.json").read_text())["step"] == 10
    sd = load_file(str(ckpt / "profile-1" / "ema_net" / "model.safetensors"))
    snap = load_file(str(r.root / "full" / "posthoc" / "snapshots" / "step-000000010.p1.safetensors"))
    for k, v in sd.items():  # the bf16 snapshot is the fp32 profile rounded
        assert torch.equal(v.to(torch.bfloat16), snap[k])


def test_resume_without_posthoc_state_is_refused_before_any_step(resumed_runs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(resumed_runs.root / "full" / "checkpoint-10", out / "checkpoint-10")
    shutil.rmtree(out / "checkpoint-10" / "posthoc_ema")
    with pytest.raises(PostHocError, match=r"no `posthoc_ema/posthoc_state\.json`"):
        _train(out, [PostHocEMACallback(snapshot_every=5)], resume=str(out / "checkpoint-10"), max_steps=20)


# ----------------------------------------------------------------------------- refusals
class _CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps += 1


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda cb, d: [cb, cb], ValueError, "listed 2 times"),
        (lambda cb, d: [cb, PostHocEMACallback(run_dir=d / "other")], ValueError, "2 PostHocEMACallbacks"),
        (
            lambda cb, d: [EMATrainerCallback(decay=0.9), PostHocEMACallback(evaluate_sigma_rel=0.05)],
            ValueError,
            "both would put their EMA",
        ),
    ],
)
def test_conflicting_callbacks_are_refused_at_train_start(tmp_path, make, error, match):
    count = _CountSteps()
    with pytest.raises(error, match=match):
        _train(tmp_path, [count, *make(PostHocEMACallback(), tmp_path)], max_steps=2)
    assert count.steps == 0


def test_new_run_into_a_used_run_dir_is_refused(tmp_path):
    _train(tmp_path, [PostHocEMACallback(snapshot_every=1)], max_steps=2)
    count = _CountSteps()
    with pytest.raises(PostHocError, match="already lists 4 snapshot"):
        _train(tmp_path, [count, PostHocEMACallback(snapshot_every=1)], max_steps=2)
    assert count.steps == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma_rels": (0.1,)}, "at least two profiles"),
        ({"sigma_rels": (0.05, 0.4)}, "sigma_rels\\[1\\]"),
        ({"sigma_rels": 0.1}, "sequence of numbers"),
        ({"snapshot_every": 0}, "snapshot_every"),
        ({"snapshot_every": 1.5}, "snapshot_every"),
        ({"snapshot_dtype": "int8"}, "snapshot_dtype"),
        ({"evaluate_sigma_rel": 0.07}, "evaluate_sigma_rel"),
        ({"layout": "sharded"}, "layout"),
        ({"snapshot_every": 5, "update_every": 2}, "multiple of `update_every`"),
    ],
)
def test_bad_arguments_are_refused_when_the_callback_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PostHocEMACallback(**kwargs)


# ----------------------------------------------------------------------------- flags
def test_flags_build_both_callbacks():
    parser = HfArgumentParser(EMAArguments)
    (a,) = parser.parse_args_into_dataclasses(
        ["--ema", "--ema_decay_type", "power", "--ema_sigma_rel", "0.1", "--ema_posthoc",
         "--ema_sigma_rels", "0.03", "0.08", "0.15", "--ema_snapshot_every", "200", "--ema_snapshot_dtype",
         "float32", "--ema_posthoc_dir", "runs/x"]
    )  # fmt: skip
    ema_cb, ph_cb = a.callbacks()
    assert isinstance(ema_cb, EMATrainerCallback) and isinstance(ph_cb, PostHocEMACallback)
    assert ema_cb.ema_kwargs["sigma_rel"] == 0.1 and ema_cb.ema_kwargs["decay_type"] == "power"
    assert ph_cb.sigma_rels == [0.03, 0.08, 0.15] and ph_cb.run_dir_arg == "runs/x"
    assert (
        ph_cb.posthoc_kwargs["snapshot_every"] == 200 and ph_cb.posthoc_kwargs["snapshot_dtype"] == "float32"
    )
    (b,) = parser.parse_args_into_dataclasses(["--ema_posthoc", "--ema_snapshot_every", "0.1"])
    (only,) = b.callbacks()
    assert isinstance(only, PostHocEMACallback) and only.posthoc_kwargs["snapshot_every"] == 0.1
    assert only.sigma_rels == [0.05, 0.10]
    assert EMAArguments().callbacks() == []


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--ema_posthoc", "--ema_snapshot_every", "2.5"], "whole number"),
        (["--ema_posthoc", "--ema_snapshot_every", "0"], "ema_snapshot_every"),
        (["--ema_posthoc", "--ema_sigma_rels", "0.1"], "at least two profiles"),
        (["--ema_posthoc", "--ema_snapshot_dtype", "int8"], "snapshot_dtype"),
        (["--ema", "--ema_decay_type", "power"], "sigma_rel"),
    ],
)
def test_bad_flags_fail_while_parsing(argv, match):
    with pytest.raises(ValueError, match=match):
        HfArgumentParser(EMAArguments).parse_args_into_dataclasses(argv)


# ----------------------------------------------------------------------------- Accelerate
def _acc_setup(seed: int, run_dir: Path, **kw):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    model, opt = acc.prepare(model, opt)
    ph = PostHocEMA(
        model, run_dir, snapshot_every=3, total_steps=8, snapshot_dtype="float32", accelerator=acc, **kw
    )
    return acc, model, opt, ph


def _acc_train(model, opt, ph, start: int, stop: int) -> None:
    for step in range(start, stop):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        ph.update()


def test_accelerate_save_state_load_state_round_trip(tmp_path):
    _, model, opt, ph = _acc_setup(0, tmp_path / "a", run_id="acc")
    _acc_train(model, opt, ph, 0, 8)
    ph.close()

    acc, model, opt, ph = _acc_setup(0, tmp_path / "b", run_id="acc")
    with pytest.raises(ValueError, match="already has a PostHocEMA"):
        PostHocEMA(model, tmp_path / "c", accelerator=acc)
    _acc_train(model, opt, ph, 0, 5)
    acc.save_state(str(tmp_path / "ckpt"))
    assert json.loads((tmp_path / "ckpt" / "posthoc_ema" / "posthoc_state.json").read_text())["step"] == 5
    _acc_train(model, opt, ph, 5, 7)  # the run goes on (snapshot at 6), then stops
    ph.close()
    del ph

    acc, model, opt, ph = _acc_setup(42, tmp_path / "b")  # other weights, no run id: all from the files
    acc.load_state(str(tmp_path / "ckpt"))
    assert ph.step == 5 and ph.run_id == "acc"
    assert [e["step"] for e in read_manifest(tmp_path / "b")["snapshots"]] == [3, 3]
    _acc_train(model, opt, ph, 5, 8)
    ph.close()
    a, b = _folder_bytes(tmp_path / "a"), _folder_bytes(tmp_path / "b")
    assert list(a) == list(b) and [k for k in a if a[k] != b[k]] == []

    acc2, _, _, _ph2 = _acc_setup(0, tmp_path / "d")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PostHocError, match="no `posthoc_ema` folder"):
        acc2.load_state(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- two processes (FSDP2, gloo)
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)
def test_fsdp2_two_processes_resume_and_synthesis_equal_one_process(tmp_path):
    """The callback on an FSDP2 model over 2 ranks: profiles kept per shard, no collective in on_step_end between
    snapshots, a resume from the middle rewrites byte-identical files, and the synthesis equals that of one process
    fed the same (gathered) parameter trajectory."""
    from tests._torchrun import load_history, run_torchrun
    from tests.dist_worker import make_model
    from tests.posthoc_callback_worker import CALLBACK_KWARGS, MAX_STEPS

    run_torchrun(Path(__file__).with_name("posthoc_callback_worker.py"), str(tmp_path), timeout=240)
    info = [json.loads((tmp_path / f"info_rank{r}.json").read_text()) for r in (0, 1)]
    for i in info:
        assert i["sharded"] and i["profile_bytes"] == [4 * i["local_numel"]] * 2  # per shard, fp32
        assert i["collectives_in_update"] == [[0, 0]] * 3
        assert i["resumed_step"] == 3 and i["resumed_run_id"] == "fsdp2"
    assert info[0]["steps_after_load"] == [2]  # snapshots 4 and 6 of the first run dropped on resume
    a, b = _folder_bytes(tmp_path / "uninterrupted"), _folder_bytes(tmp_path / "run")
    assert list(a) == list(b) and [k for k in a if a[k] != b[k]] == []

    # One process, same trajectory (the full parameters the worker gathered after each step).
    history = load_history(tmp_path / "history.safetensors")
    model = make_model(3)
    cb = PostHocEMACallback(run_dir=tmp_path / "single", run_id="fsdp2", **CALLBACK_KWARGS)
    args = training_args(tmp_path / "single_out", max_steps=MAX_STEPS)
    state, control = TrainerState(max_steps=MAX_STEPS), TrainerControl()
    cb.on_train_begin(args, state, control, model=model)
    for step, params in enumerate(history, start=1):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(torch.from_numpy(params[n]))
        state.global_step = step
        cb.on_step_end(args, state, control, model=model)
    cb.on_train_end(args, state, control, model=model)

    targets = [0.03, 0.07, 0.15]
    two = synthesize(tmp_path / "run", sigma_rel=targets, progress=False)
    one = synthesize(tmp_path / "single", sigma_rel=targets, progress=False)
    for x, y in zip(two, one, strict=True):
        assert x.coefficients == y.coefficients
        for k in x.tensors:
            # The same fp32 operations on the same values: the per-shard lerps give the elements of the full
            # tensor's lerp (bitwise in practice; a vectorised tail could round one element differently, hence
            # a tolerance of a few fp32 ulps of the synthesis' largest term).
            scale = sum(abs(c) for c in x.coefficients.values()) * float(y.tensors[k].abs().max())
            torch.testing.assert_close(x.tensors[k], y.tensors[k], rtol=0, atol=8 * 2**-24 * scale, msg=k)


# ----------------------------------------------------------------------------- example
def test_example_train_posthoc_runs_short(tmp_path):
    pytest.importorskip("sklearn", reason="the example's data ships with scikit-learn")
    pytest.importorskip("matplotlib", reason="the example plots with matplotlib")
    import importlib.util
    import sys

    examples = Path(__file__).resolve().parents[1] / "examples"
    spec = importlib.util.spec_from_file_location("example_train_posthoc", examples / "train_posthoc.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(module)
        out = module.main(
            ["--output_dir", str(tmp_path), "--max_steps", "40", "--sweep", "0.05", "0.08", "0.1"]
        )
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop(spec.name, None)
    assert out["snapshot_steps"] == list(range(2, 41, 2))  # every 5% of 40 steps
    assert [round(r["sigma_rel"], 3) for r in out["sweep"]] == [0.05, 0.08, 0.1]
    assert out["sweep"][0]["residual"] < 1e-9 and out["sweep"][2]["residual"] < 1e-9  # the tracked ones
    assert (tmp_path / "posthoc_sweep.png").stat().st_size > 1000
    # the documented disk cost: bytes per snapshot (bf16: 2 bytes a value) x snapshots x profiles, plus each
    # file's safetensors header (its 8-byte length, then the JSON)
    numel = sum(p.numel() for p in module.tiny_vit().state_dict().values())
    files = list((tmp_path / "posthoc" / "snapshots").iterdir())
    headers = sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in files)
    assert len(files) == 40 and out["disk_bytes"] - headers == 2 * numel * 20 * 2
