"""Post-hoc EMA: snapshots, manifest, background writing, resume, synthesis, bad input.

Expected EMAs come from the definition of the power-function profile evaluated in float64 over the recorded
parameter history (see ``_ref_power_ema``), or from an ordinary ``EMAState(decay_type="power")`` tracked in the same
run (the EDM2 paper's own check of synthesis), never from the post-hoc code itself.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import tiny_bert, tiny_bn_net
from safetensors.torch import load_file, save_file

from hf_ema import EMAState, PostHocEMA, load_model, synthesize
from hf_ema.posthoc import PostHocError, read_manifest
from hf_ema.power import sigma_rel_to_gamma

G05, G10 = sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)


def _trajectory(model: torch.nn.Module, steps: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The model's float state (parameters and float buffers) after each optimizer step 1..steps: a random walk
    with drift, so that EMAs of different widths differ clearly."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    drift = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in state.items()}
    out = []
    for _ in range(steps):
        state = {k: v + drift[k] + 0.1 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        out.append(state)
    return out


@torch.no_grad()
def _set(model: torch.nn.Module, state: dict[str, torch.Tensor], step: int) -> None:
    sd = model.state_dict()
    for k, v in state.items():
        sd[k].copy_(v)
    for v in sd.values():
        if not v.is_floating_point():
            v.fill_(step)  # num_batches_tracked: an integer buffer, copied, never averaged


def _run(model, ph, traj, start: int, stop: int, also=()):
    for step in range(start, stop + 1):
        _set(model, traj[step - 1], step)
        ph.update()
        for e in also:
            e.update()


def _ref_power_ema(traj, name: str, gamma: float, t: int, dt: int = 1) -> np.ndarray:
    """Float64: sum over update times s of theta_s times the integral of p_t over (s - dt, s]."""
    out = 0.0
    for s in range(dt, t + 1, dt):
        w = (s ** (gamma + 1) - (s - dt) ** (gamma + 1)) / t ** (gamma + 1)
        out = out + w * traj[s - 1][name].double().numpy()
    return out


def _entries(run) -> list[dict]:
    return read_manifest(run)["snapshots"]


# ----------------------------------------------------------------------------- snapshots and manifest
def test_snapshots_manifest_and_values(tmp_path):
    model = tiny_bn_net()
    traj = _trajectory(model, 20)
    run = tmp_path / "run"
    with PostHocEMA(model, run, snapshot_every=5, run_id="r1") as ph:
        _run(model, ph, traj, 1, 20)
    manifest = read_manifest(run)
    assert manifest["run_id"] == "r1" and manifest["time_unit"] == "steps"
    assert manifest["tensors"]["1.num_batches_tracked"]["average"] is False
    assert manifest["tensors"]["0.weight"] == {"shape": [8, 4], "dtype": "float32", "average": True}
    entries = manifest["snapshots"]
    assert [(e["step"], e["profile"]) for e in entries] == [(s, p) for s in (5, 10, 15, 20) for p in (0, 1)]
    for e in entries:
        assert (
            e["t"] == e["step"] and e["dtype"] == "bfloat16" and e["run_id"] == "r1" and e["world_size"] == 1
        )
        assert e["gamma"] == pytest.approx((G05, G10)[e["profile"]], rel=1e-12)
        assert e["sigma_rel"] == pytest.approx((0.05, 0.10)[e["profile"]], rel=1e-12)
        tensors = load_file(str(run / e["files"][0]))
        assert int(tensors["1.num_batches_tracked"]) == e["step"]
        for name in ("0.weight", "3.bias", "1.running_mean"):
            want = _ref_power_ema(traj, name, e["gamma"], e["step"])
            got = tensors[name].double().numpy()
            # bf16 keeps 8 significant bits: within half an ulp of the fp32 EMA, itself ~1e-6 from float64
            np.testing.assert_allclose(got, want, rtol=2**-8, atol=1e-6, err_msg=f"{name} step {e['step']}")
    # nothing but the listed files (and no temp file) in the snapshot folder
    listed = {run / f for e in entries for f in e["files"]}
    assert set((run / "snapshots").iterdir()) == listed


def test_fp32_snapshots_and_update_every(tmp_path):
    model = tiny_bn_net()
    traj = _trajectory(model, 12)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="multiple of `update_every`"):
        PostHocEMA(model, run, snapshot_every=5, update_every=3)
    with PostHocEMA(model, run, snapshot_every=6, update_every=3, snapshot_dtype=torch.float32) as ph:
        _run(model, ph, traj, 1, 12)
    for e in _entries(run):
        got = load_file(str(run / e["files"][0]))["0.weight"].double().numpy()
        want = _ref_power_ema(traj, "0.weight", e["gamma"], e["step"], dt=3)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fraction_of_training_and_final_snapshot(tmp_path):
    model = tiny_bn_net()
    traj = _trajectory(model, 23)
    ph = PostHocEMA(model, tmp_path / "a", snapshot_every=0.25)
    with pytest.raises(ValueError, match="set `total_steps`"):
        ph.update()
    ph.total_steps = 23
    assert ph.snapshot_every == 6  # round(0.25 * 23)
    _run(model, ph, traj, 1, 23)
    ph.close()
    assert sorted({e["step"] for e in _entries(tmp_path / "a")}) == [6, 12, 18, 23]  # and the last step


@pytest.mark.parametrize("update_every", [1, 2])
def test_samples_clock(tmp_path, update_every):
    """Time counted in samples with a changing batch size: weights are integrals of the profile over the samples
    of each averaging interval; with a constant batch size the profile equals the one in steps (beta depends on
    dt / t only)."""
    model = tiny_bn_net()
    traj = _trajectory(model, 10)
    batches = [4, 4, 8, 8, 8, 16, 16, 16, 16, 32]
    ph = PostHocEMA(
        model,
        tmp_path / "s",
        snapshot_every=4,
        time_unit="samples",
        snapshot_dtype="float32",
        update_every=update_every,
        total_steps=10,
    )
    with pytest.raises(ValueError, match="samples"):
        ph.update()
    for step, b in enumerate(batches, start=1):
        _set(model, traj[step - 1], step)
        ph.update(samples=b)
    ph.close()
    ends = np.concatenate([[0], np.cumsum(batches)])  # samples seen after step s: ends[s]
    entries = _entries(tmp_path / "s")
    assert sorted({e["step"] for e in entries}) == [4, 8, 10]
    for e in entries:
        t = float(ends[e["step"]])
        assert e["t"] == t
        g = e["gamma"]
        want = sum(
            (ends[s] ** (g + 1) - ends[s - update_every] ** (g + 1))
            / t ** (g + 1)
            * traj[s - 1]["0.weight"].double()
            for s in range(update_every, e["step"] + 1, update_every)
        ).numpy()
        got = load_file(str(tmp_path / "s" / e["files"][0]))["0.weight"].double().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    model2 = tiny_bn_net()
    a = PostHocEMA(model2, tmp_path / "a", snapshot_every=100, time_unit="samples")
    b = PostHocEMA(model2, tmp_path / "b", snapshot_every=100)
    for step in range(1, 9):
        _set(model2, traj[step - 1], step)
        a.update(samples=64)
        b.update()
    for pa, pb in zip(a.profiles, b.profiles, strict=True):
        for k, v in pa.state_dict()["ema"].items():
            torch.testing.assert_close(v, pb.state_dict()["ema"][k], rtol=1e-6, atol=1e-7)


def test_snapshot_is_written_on_a_background_thread(tmp_path, monkeypatch):
    from hf_ema import posthoc

    release, started = threading.Event(), threading.Event()
    real_write = posthoc._SnapshotWriter._write
    threads = []

    def slow_write(self, job):
        threads.append(threading.current_thread().name)
        started.set()
        assert release.wait(30)
        real_write(self, job)

    monkeypatch.setattr(posthoc._SnapshotWriter, "_write", slow_write)
    model = tiny_bn_net()
    traj = _trajectory(model, 3)
    ph = PostHocEMA(model, tmp_path / "run", snapshot_every=2, max_pending=4)
    _run(model, ph, traj, 1, 3)  # the snapshot at step 2 is taken; update() came back while the write waits
    assert started.wait(30) and not _entries(tmp_path / "run")
    release.set()
    ph.flush()
    assert [e["step"] for e in _entries(tmp_path / "run")] == [2, 2]
    assert set(threads) == {"hf_ema-posthoc-writer"}
    stats = ph.write_stats
    assert stats["snapshots"] == 1 and stats["files"] == 2 and stats["caller_seconds"] > 0
    ph.close()


def test_writer_error_is_raised_on_the_training_thread(tmp_path):
    model = tiny_bn_net()
    run = tmp_path / "run"
    run.mkdir()
    (run / "snapshots").write_text("not a folder")
    ph = PostHocEMA(model, run, snapshot_every=1)
    with pytest.raises(RuntimeError, match="snapshot failed"):  # from the next submit (2nd profile) or flush
        ph.update()
        ph.flush()


# ----------------------------------------------------------------------------- synthesis
def test_target_equal_to_a_tracked_profile_reproduces_its_snapshot(tmp_path):
    model = tiny_bn_net()
    traj = _trajectory(model, 20)
    run = tmp_path / "run"
    with PostHocEMA(model, run, snapshot_every=5) as ph:
        _run(model, ph, traj, 1, 20)
    for at_step, sigma, profile in ((10, 0.05, 0), (20, 0.10, 1)):
        res = synthesize(run, sigma_rel=[sigma], at_step=at_step, progress=False)[0]
        assert res.residual < 1e-6
        assert math.isclose(sum(res.coefficients.values()), 1.0, abs_tol=1e-12)
        entry = next(e for e in _entries(run) if e["step"] == at_step and e["profile"] == profile)
        snap = load_file(str(run / entry["files"][0]))
        for k, v in snap.items():
            if v.is_floating_point():
                torch.testing.assert_close(
                    res.tensors[k], v.float(), rtol=0, atol=1e-5 * float(v.abs().max())
                )
            else:
                assert torch.equal(res.tensors[k], v)


def test_synthesis_matches_a_directly_tracked_third_profile(tmp_path):
    """The EDM2 check: sigma_rel=0.075 synthesised from the 0.05 / 0.10 snapshots vs a power EMA of 0.075 tracked
    in the same run. Bound: each tracked EMA is exactly the continuous profile applied to the piecewise-constant
    trajectory theta(tau) = theta_s on (s-1, s] (see hf_ema.power), so the difference in one coordinate is
    integral((p_r - fit)(tau) theta(tau)) <= ||p_r - fit|| * ||theta|| (Cauchy-Schwarz), where
    ||p_r - fit|| = residual * ||p_r||, ||p_r||^2 = (g+1)^2 / ((2g+1) t) and ||theta||^2 = sum_s theta_s^2; plus fp32
    rounding of the EMAs (~ steps * 2**-24 relative) amplified by sum |x_i|."""
    model = tiny_bn_net()
    steps = 200
    traj = _trajectory(model, steps, seed=3)
    run = tmp_path / "run"
    direct = EMAState(model, decay_type="power", sigma_rel=0.075)
    with PostHocEMA(model, run, snapshot_every=10, snapshot_dtype=torch.float32) as ph:
        _run(model, ph, traj, 1, steps, also=[direct])
    res = synthesize(run, sigma_rel=[0.075], progress=False)[0]
    assert res.step == steps and 0 < res.residual < 0.05
    g, t = res.gamma, float(steps)
    norm_p = (g + 1) / math.sqrt((2 * g + 1) * t)
    abs_coef = sum(abs(x) for x in res.coefficients.values())
    want = direct.state_dict()["ema"]
    checked = 0
    for name, value in want.items():
        if not value.is_floating_point():
            continue
        theta = torch.stack([traj[s][name].double() for s in range(steps)])
        norm_theta = theta.pow(2).sum(0).sqrt()
        bound = res.residual * norm_p * norm_theta + abs_coef * steps * 2**-24 * theta.abs().amax(0) + 1e-6
        diff = (res.tensors[name].double() - value.double()).abs()
        assert bool((diff <= bound).all()), (name, float((diff - bound).max()))
        checked += 1
        # the bound is tight enough to mean something: the tracked profiles differ by far more
        if name == "0.weight":
            gap = (ph.profiles[0].state_dict()["ema"][name] - ph.profiles[1].state_dict()["ema"][name]).abs()
            assert float(bound.mean()) < 0.2 * float(gap.mean())
    assert checked >= 6


def test_synthesis_between_snapshots_and_several_targets(tmp_path):
    model = tiny_bn_net()
    traj = _trajectory(model, 30)
    run = tmp_path / "run"
    with PostHocEMA(model, run, snapshot_every=5) as ph:
        _run(model, ph, traj, 1, 30)
    res = synthesize(run, sigma_rel=[0.06, 0.08, 0.12], at_step=17, batch_size=2, progress=False)
    assert [r.sigma_rel for r in res] == [0.06, 0.08, 0.12]
    for r in res:
        assert r.step == 17 and r.t == 17.0
        assert all("step-00000002" not in f for f in r.coefficients)  # only snapshots with t_i <= t_r
        assert len(r.coefficients) == 6 and math.isclose(sum(r.coefficients.values()), 1.0, abs_tol=1e-12)
    single = synthesize(run, sigma_rel=0.08, at_step=17, progress=False)[0]
    for k, v in single.tensors.items():
        assert torch.equal(v, res[1].tensors[k])  # batching does not change the result


def test_synthesis_writes_an_ema_net_that_loads(tmp_path):
    model = tiny_bert()
    traj = _trajectory(model, 10)
    run = tmp_path / "run"
    with PostHocEMA(model, run, snapshot_every=5) as ph:
        _run(model, ph, traj, 1, 10)
    assert (run / "config.json").is_file()
    res = synthesize(run, sigma_rel=[0.08], out_dir=tmp_path / "out", progress=False)[0]
    assert res.tensors is None and res.path == tmp_path / "out" / "sigma_rel-0.0800"
    mem = synthesize(run, sigma_rel=[0.08], progress=False)[0].tensors
    from transformers import BertForSequenceClassification

    loaded = load_model(BertForSequenceClassification, res.path)
    direct = BertForSequenceClassification.from_pretrained(res.path / "ema_net")
    for k, v in mem.items():
        assert torch.equal(loaded.state_dict()[k], v), k
        assert torch.equal(direct.state_dict()[k], v), k
    meta = json.loads((res.path / "ema_net" / "ema_state.json").read_text())
    assert meta["posthoc"]["residual"] == res.residual and meta["decay_type"] == "power"


def test_synthesis_reads_per_rank_pieces(tmp_path):
    """A snapshot split into per-rank files (an FSDP2-like row block and a ZeRO-3-like flat range with padding)
    is reassembled to the same tensors."""
    model = tiny_bn_net()
    traj = _trajectory(model, 10)
    run = tmp_path / "run"
    with PostHocEMA(model, run, snapshot_every=5) as ph:
        _run(model, ph, traj, 1, 10)
    before = synthesize(run, sigma_rel=[0.07], progress=False)[0].tensors
    manifest = json.loads((run / "manifest.json").read_text())
    e = manifest["snapshots"][-1]
    full = load_file(str(run / e["files"][0]))
    pieces: list[dict] = [{}, {}]
    layouts: list[dict] = [{}, {}]
    for name, x in full.items():
        if name == "0.weight":  # rows 0-4 / 5-7
            for r, (a, b) in enumerate(((0, 5), (5, 8))):
                pieces[r][name] = x[a:b].clone()
                layouts[r][name] = {"kind": "block", "offset": [a, 0], "shape": [b - a, 4]}
        elif name == "3.weight":  # 16 elements in partitions of 9: [0, 9) and [9, 16) + 2 zeros of padding
            flat = x.reshape(-1)
            pieces[0][name] = flat[:9].clone()
            pieces[1][name] = torch.cat([flat[9:], flat.new_zeros(2)])
            layouts[0][name] = {"kind": "flat", "start": 0, "stop": 9}
            layouts[1][name] = {"kind": "flat", "start": 9, "stop": 16}
        else:
            for r in range(2):
                pieces[r][name] = x.clone()
                layouts[r][name] = {"kind": "full"}
    files = []
    for r in range(2):
        f = e["files"][0].replace(".safetensors", f".rank{r}-of-2.safetensors")
        info = {"run_id": e["run_id"], "step": e["step"], "profile": e["profile"], "rank": r}
        meta = {"format": "pt", "hf_ema_posthoc": json.dumps(info), "layout": json.dumps(layouts[r])}
        save_file(pieces[r], str(run / f), metadata=meta)
        files.append(f)
    (run / e["files"][0]).unlink()
    e.update(files=files, layout="per_rank", world_size=2)
    (run / "manifest.json").write_text(json.dumps(manifest))
    after = synthesize(run, sigma_rel=[0.07], progress=False)[0].tensors
    for k, v in before.items():
        assert torch.equal(after[k], v), k


# ----------------------------------------------------------------------------- resume
def _snapshot_files(run: Path) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    return {(e["step"], e["profile"]): load_file(str(run / e["files"][0])) for e in _entries(run)}


def test_resume_in_the_middle_matches_an_uninterrupted_run(tmp_path):
    traj = _trajectory(tiny_bn_net(), 20)

    # uninterrupted
    model = tiny_bn_net()
    with PostHocEMA(model, tmp_path / "a", snapshot_every=5, run_id="same") as ph:
        _run(model, ph, traj, 1, 20)

    # interrupted: checkpoint at step 12, the run goes on to 17 (snapshot at 15 written), then crashes
    model = tiny_bn_net()
    ph = PostHocEMA(model, tmp_path / "b", snapshot_every=5, run_id="same")
    _run(model, ph, traj, 1, 12)
    ph.save(tmp_path / "ckpt-12")
    _run(model, ph, traj, 13, 17)
    ph.close()
    assert {e["step"] for e in _entries(tmp_path / "b")} == {5, 10, 15}
    stale = [tmp_path / "b" / f for e in _entries(tmp_path / "b") if e["step"] == 15 for f in e["files"]]

    # resume from step 12 with a fresh model and PostHocEMA on the same run folder
    model = tiny_bn_net()
    _set(model, traj[11], 12)
    ph = PostHocEMA(model, tmp_path / "b", snapshot_every=5).load(tmp_path / "ckpt-12")
    assert ph.step == 12 and ph.run_id == "same"
    assert {e["step"] for e in _entries(tmp_path / "b")} == {5, 10}  # the stale step-15 entries are gone
    assert not any(f.exists() for f in stale)
    _run(model, ph, traj, 13, 20)
    ph.close()

    a, b = _snapshot_files(tmp_path / "a"), _snapshot_files(tmp_path / "b")
    assert list(a) == list(b) == [(s, p) for s in (5, 10, 15, 20) for p in (0, 1)]  # no duplicates
    for key in a:
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    ea = [{k: v for k, v in e.items()} for e in _entries(tmp_path / "a")]
    eb = [{k: v for k, v in e.items()} for e in _entries(tmp_path / "b")]
    assert ea == eb
    ra = synthesize(tmp_path / "a", sigma_rel=[0.07], progress=False)[0]
    rb = synthesize(tmp_path / "b", sigma_rel=[0.07], progress=False)[0]
    for k in ra.tensors:
        assert torch.equal(ra.tensors[k], rb.tensors[k])


def test_state_dict_round_trip_in_memory(tmp_path):
    traj = _trajectory(tiny_bn_net(), 8)
    model = tiny_bn_net()
    ph = PostHocEMA(model, tmp_path / "run", snapshot_every=4, time_unit="samples")
    for s in range(1, 7):
        _set(model, traj[s - 1], s)
        ph.update(samples=3)
    sd = ph.state_dict()
    copy = {
        "profiles": [
            {"ema": {k: v.clone() for k, v in p["ema"].items()}, "meta": p["meta"]} for p in sd["profiles"]
        ]
    }
    copy["meta"] = json.loads(json.dumps(sd["meta"]))  # JSON-able
    other = PostHocEMA(tiny_bn_net(seed=1), tmp_path / "run", snapshot_every=4, time_unit="samples")
    other.load_state_dict(copy)
    assert other.step == 6 and other.time == 18.0
    for s in range(7, 9):
        _set(model, traj[s - 1], s)
        ph.update(samples=3)
        other.update(samples=3)  # other's model is another one: only the bookkeeping is compared here
    assert other.time == ph.time == 24.0 and other._last_snapshot_step == ph._last_snapshot_step == 8
    ph.close()
    other.close()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [0.0, -0.05, 0.2887, 0.5, float("nan")])
def test_sigma_rel_out_of_range(tmp_path, bad):
    with pytest.raises(ValueError, match="sigma_rel"):
        PostHocEMA(tiny_bn_net(), tmp_path, sigma_rels=(0.05, bad))
    with pytest.raises(ValueError, match="sigma_rel"):
        synthesize(tmp_path, sigma_rel=[bad])


def test_bad_constructor_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least two profiles"):
        PostHocEMA(tiny_bn_net(), tmp_path, sigma_rels=(0.05,))
    with pytest.raises(ValueError, match="must differ"):
        PostHocEMA(tiny_bn_net(), tmp_path, sigma_rels=(0.05, 0.05))
    with pytest.raises(ValueError, match="snapshot_every"):
        PostHocEMA(tiny_bn_net(), tmp_path, snapshot_every=1.5)
    with pytest.raises(ValueError, match="snapshot_every"):
        PostHocEMA(tiny_bn_net(), tmp_path, snapshot_every=0)
    with pytest.raises(ValueError, match="time_unit"):
        PostHocEMA(tiny_bn_net(), tmp_path, time_unit="epochs")
    with pytest.raises(ValueError, match="snapshot_dtype"):
        PostHocEMA(tiny_bn_net(), tmp_path, snapshot_dtype=torch.float64)


def test_run_folder_without_manifest(tmp_path):
    with pytest.raises(PostHocError, match=r"No post-hoc EMA manifest.*manifest\.json"):
        synthesize(tmp_path, sigma_rel=[0.1])
    with pytest.raises(PostHocError, match="does not exist"):
        synthesize(tmp_path / "nope", sigma_rel=[0.1])


def test_target_beyond_the_last_snapshot(tmp_path):
    model = tiny_bn_net()
    with PostHocEMA(model, tmp_path, snapshot_every=5) as ph:
        _run(model, ph, _trajectory(model, 12), 1, 12)
    with pytest.raises(PostHocError, match=r"at_step=11 is beyond the last snapshot \(step 10\)"):
        synthesize(tmp_path, sigma_rel=[0.1], at_step=11)
    with pytest.raises(PostHocError, match="before the first snapshot"):
        synthesize(tmp_path, sigma_rel=[0.1], at_step=3)


def test_snapshots_from_another_model(tmp_path):
    model = tiny_bn_net()
    with PostHocEMA(model, tmp_path / "run", snapshot_every=5) as ph:
        _run(model, ph, _trajectory(model, 10), 1, 10)
    # another model cannot write into this run folder
    with pytest.raises(PostHocError, match="another model"):
        PostHocEMA(tiny_bert(), tmp_path / "run", snapshot_every=5)
    # the same model in a new run cannot mix its snapshots with this run's without resuming it
    ph2 = PostHocEMA(tiny_bn_net(), tmp_path / "run", snapshot_every=1)
    with pytest.raises(PostHocError, match="not of this run"):
        ph2.update()
    # a snapshot file replaced by one of another model is refused by synthesis
    entry = _entries(tmp_path / "run")[0]
    other = tiny_bert()
    with PostHocEMA(
        other, tmp_path / "other", snapshot_every=1, run_id=read_manifest(tmp_path / "run")["run_id"]
    ) as p:
        p.update()
    shutil.copy(
        tmp_path / "other" / _entries(tmp_path / "other")[0]["files"][0], tmp_path / "run" / entry["files"][0]
    )
    with pytest.raises(PostHocError, match="other tensors than the run's model"):
        synthesize(tmp_path / "run", sigma_rel=[0.1], progress=False)


def test_resume_with_other_profiles_is_refused(tmp_path):
    model = tiny_bn_net()
    ph = PostHocEMA(model, tmp_path / "run", snapshot_every=5)
    _run(model, ph, _trajectory(model, 5), 1, 5)
    ph.save(tmp_path / "ckpt")
    ph.close()
    with pytest.raises(PostHocError, match="same profiles"):
        PostHocEMA(model, tmp_path / "run", sigma_rels=(0.05, 0.2), snapshot_every=5).load(tmp_path / "ckpt")
    with pytest.raises(PostHocError, match="No post-hoc EMA state"):
        PostHocEMA(model, tmp_path / "run", snapshot_every=5).load(tmp_path / "nothing")


# ----------------------------------------------------------------------------- two processes (FSDP2, gloo)
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)
def test_fsdp2_two_processes_gathered_and_per_rank_snapshots(tmp_path):
    """Both layouts on an FSDP2 model over 2 ranks (a 7-row layer shards unevenly): no collective in update()
    between snapshots, one run id on both ranks, snapshots equal to the power EMA of the gathered parameter history,
    and the per-rank pieces reassemble to the gathered files."""
    from hf_ema import posthoc
    from tests._torchrun import load_history, run_torchrun

    run_torchrun(
        Path(__file__).with_name("posthoc_worker.py"), str(tmp_path), timeout=240, label="posthoc worker"
    )
    info = [json.loads((tmp_path / f"info_rank{r}.json").read_text()) for r in (0, 1)]
    assert info[0]["sharded"] and info[0]["run_ids"] == info[1]["run_ids"]
    assert all(c == [0, 0] for i in info for c in i["collectives_in_update"]), info
    history = load_history(tmp_path / "history.safetensors")  # history[k]: full parameters after step k + 1
    traj = [{k: torch.from_numpy(v) for k, v in h.items()} for h in history]
    read = {}
    for layout, nfiles in (("gathered", 1), ("per_rank", 2)):
        run = tmp_path / layout
        manifest = read_manifest(run)
        entries = manifest["snapshots"]
        assert [(e["step"], e["profile"], len(e["files"])) for e in entries] == [
            (s, p, nfiles) for s in (3, 6) for p in (0, 1)
        ]
        for e in entries:
            assert e["world_size"] == 2 and e["layout"] == layout
            reader = posthoc._SnapshotReader(run, e, manifest)
            for name in traj[0]:
                got = reader.read(name)
                read[(layout, e["step"], e["profile"], name)] = got
                want = _ref_power_ema(traj, name, e["gamma"], e["step"])
                np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)
    for (layout, step, profile, name), x in read.items():
        if layout == "per_rank":
            assert torch.equal(x, read[("gathered", step, profile, name)]), name
    a = synthesize(tmp_path / "gathered", sigma_rel=[0.07], progress=False)[0]
    b = synthesize(tmp_path / "per_rank", sigma_rel=[0.07], progress=False)[0]
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k


def test_write_safetensors_round_trip(tmp_path):
    from hf_ema.posthoc import write_safetensors

    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f32": torch.randn(7),
        "f16": torch.randn(2, 2).half(),
        "f64": torch.randn(2).double(),
        "i64": torch.arange(5),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6)[:, ::2],  # not contiguous
    }
    write_safetensors(tmp_path / "a.safetensors", tensors, {"format": "pt", "k": "v"})
    back = load_file(str(tmp_path / "a.safetensors"))
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
    with pytest.raises(ValueError, match="CPU tensor"):
        write_safetensors(tmp_path / "b.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)}, {})


def test_badly_conditioned_fit_warns(tmp_path, monkeypatch):
    import hf_ema.power

    model = tiny_bn_net()
    with PostHocEMA(model, tmp_path, snapshot_every=5) as ph:
        _run(model, ph, _trajectory(model, 10), 1, 10)
    monkeypatch.setattr(hf_ema.power, "ILL_CONDITIONED", 1.0)  # every Gram matrix is "bad" now
    with pytest.warns(RuntimeWarning, match="badly conditioned"):
        synthesize(tmp_path, sigma_rel=[0.08], progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the asynchronous device-to-host snapshot path needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_snapshots_hold_the_profiles_as_of_their_step(tmp_path, dtype):
    """On CUDA the training thread only enqueues the snapshot's copies into pinned memory; the next update, queued
    right after, must not reach the files: each file equals the profile at its step, bitwise."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)]).cuda()
    ph = PostHocEMA(model, tmp_path, snapshot_every=2, total_steps=8, snapshot_dtype=dtype)
    want = {}
    for step in range(1, 9):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        ph.update()
        if step % 2 == 0:
            want[step] = [
                {k: v.detach().to(dtype).cpu().clone() for k, v in prof.state_dict()["ema"].items()}
                for prof in ph.profiles
            ]
    ph.close()
    entries = json.loads((tmp_path / "manifest.json").read_text())["snapshots"]
    assert len(entries) == 8
    for e in entries:
        got = load_file(str(tmp_path / e["files"][0]))
        ref = want[e["step"]][e["profile"]]
        assert all(torch.equal(got[k], ref[k]) for k in ref), (e["step"], e["profile"])
