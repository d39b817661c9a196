"""A training process killed with SIGKILL (a preempted node) while it checkpoints: the resume from its newest
checkpoint is exact (the EMA equals that of an uninterrupted run, bitwise) or stops with a clear error; no kill leaves
an ``ema_net`` that loads with other values than the uninterrupted run's.

Tiny BERT Trainer runs (6 optimizer steps, a checkpoint every 2) in child processes of ``_kill_harness.py``, killed
(a) by themselves at each point of the second EMA save (``checkpoint-4``), and (b) by the harness at a few seeded
random moments. Each is then resumed, in a fresh process, from its newest checkpoint that the Trainer finished. The
expected values come from an uninterrupted run with the same seed, never from the resumed one.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_ema.io import EMA_DIRNAME, find_ema_dir, load_ema_net

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL (POSIX)")

HARNESS = Path(__file__).with_name("_kill_harness.py")
DECAY, STALE_DECAY, MAX_STEPS = 0.8, 0.5, 6
#: Kills that leave checkpoint-4 without a usable EMA: the resume must stop with the error.
LOUD = ["save_start", "weights_partial", "weights_written", "json_unrenamed"]
#: Kills after the save's data was complete (its commit record written): the resume must be exact.
EXACT = ["json_written", "renamed", "save_end"]
#: Kills at the end of a save into checkpoint-4 that a stale earlier run had filled (a reused output_dir).
OVERWRITE = ["cleanup"]
#: Kill points of a save that replaces an ema_net: the callback deletes a stale one before the Trainer rewrites its
#: checkpoint, so a Trainer save never replaces one and never reaches them (io-level tests cover the recovery).
UNREACHED = ["between_renames"]
RANDOM_KILLS = sorted(random.Random(20240611).sample([i / 100 for i in range(5, 100)], 8))


def _job(root: Path, name: str, **kw) -> dict:
    return {
        "out": str(root / name),
        "decay": DECAY,
        "max_steps": MAX_STEPS,
        "result": str(root / f"{name}.json"),
        **kw,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    jobs = [_job(root, "reference"), _job(root, "timing", timing=True)]
    jobs.append(_job(root, "stale", decay=STALE_DECAY, max_steps=4))
    names = []
    for point in LOUD + EXACT + OVERWRITE + UNREACHED:
        prefill = {"prefill": str(root / "stale")} if point in OVERWRITE + UNREACHED else {}
        jobs.append(_job(root, point, kill_at=point, kill_save=2, **prefill))
        names.append(point)
    jobs.append(
        _job(root, "stale_save_start", kill_at="save_start", kill_save=2, prefill=str(root / "stale"))
    )
    names.append("stale_save_start")
    for i, frac in enumerate(RANDOM_KILLS):
        jobs.append(_job(root, f"random{i}", kill_after=frac))
        names.append(f"random{i}")
    for name in names:
        snapshots = [str(root / f"{name}.probe")]
        if name == "weights_partial":
            snapshots.append(str(root / "restart"))
        jobs.append(
            _job(
                root,
                name,
                resume="latest",
                retry_previous=True,
                snapshot=snapshots,
                result=str(root / f"{name}.resume.json"),
            )
        )
    jobs.append(_job(root, "restart", resume="latest", allow_restart=True))
    plan = root / "jobs.json"
    plan.write_text(json.dumps(jobs))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HARNESS.parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(HARNESS), str(plan)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def result(name):
        return json.loads((root / f"{name}.json").read_text())["runs"]

    return root, result


def _ema(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


def _reference_checkpoint_ema(root: Path, step: int) -> dict[str, torch.Tensor]:
    return _ema(root / "reference" / f"checkpoint-{step}" / EMA_DIRNAME / "model.safetensors")


def test_reference_runs(runs):
    root, result = runs
    assert [r["status"] for r in result("reference")] == ["ok"]
    assert [r["status"] for r in result("stale")] == ["ok"]
    # The stale run's EMA differs from the reference's: the overwrite cases can tell which one a resume used.
    stale = _ema(root / "stale" / "checkpoint-4" / EMA_DIRNAME / "model.safetensors")
    assert not _same_bits(stale, _reference_checkpoint_ema(root, 4))


@pytest.mark.parametrize("point", LOUD + EXACT + OVERWRITE)
def test_the_kill_happened(runs, point):
    _, result = runs
    (run,) = result(point)
    assert run["status"] == "killed" and run["signal"] == 9, run


@pytest.mark.parametrize("name", LOUD + EXACT + OVERWRITE + [f"random{i}" for i in range(len(RANDOM_KILLS))])
def test_no_checkpoint_holds_an_ema_net_that_loads_wrong(runs, name):
    """What the kill left (a copy taken before the resume): every EMA that any loader finds is the uninterrupted
    run's at that step, bitwise; after the loader finished an interrupted save, ``from_pretrained(ema_net)`` works."""
    from transformers import AutoModelForSequenceClassification

    root, _ = runs
    probe = root / f"{name}.probe"
    for ckpt in sorted(probe.glob("checkpoint-*")):
        step = int(ckpt.name.split("-")[1])
        found = find_ema_dir(ckpt)
        if step == 4 and name in LOUD:
            assert found is None, f"{name}: {ckpt} should hold no usable EMA"
        if step == 4 and name in EXACT + OVERWRITE:
            assert found == ckpt / EMA_DIRNAME, f"{name}: the interrupted save was not finished on disk"
            model = AutoModelForSequenceClassification.from_pretrained(ckpt / EMA_DIRNAME)
            want = _reference_checkpoint_ema(root, 4)
            assert _same_bits({k: v for k, v in model.state_dict().items() if k in want}, want)
        if found is not None:
            tensors, meta = load_ema_net(found)
            assert meta["step"] == step
            assert _same_bits(tensors, _reference_checkpoint_ema(root, step)), f"{name}: {found}"
            assert found == ckpt / EMA_DIRNAME  # in place, so from_pretrained(ckpt/ema_net) reads the same


@pytest.mark.parametrize("name", LOUD + EXACT + OVERWRITE + [f"random{i}" for i in range(len(RANDOM_KILLS))])
def test_resume_after_the_kill_is_exact_or_loud(runs, name):
    root, result = runs
    final = _ema(root / "reference.run.ema.safetensors")
    attempts = result(f"{name}.resume")
    first = attempts[0]
    if name in LOUD:
        assert first["status"] == "ema_error", first
    if name in EXACT + OVERWRITE:
        assert first["status"] == "ok", first  # (resumed from checkpoint-4)
    if first["status"] == "ema_error":
        # Loud: names the checkpoint and both ways out; then, as it says, the previous checkpoint resumes exactly.
        assert first["resume"] in first["error"] and "allow_ema_restart=True" in first["error"], first
        assert "delete that checkpoint" in first["error"]
        assert len(attempts) == 2, attempts
    done = attempts[-1]
    assert done["status"] in ("ok", "complete"), done  # complete: killed after its last checkpoint was saved
    assert _same_bits(_ema(done["ema_file"]), final), (
        f"{name}: resumed EMA differs from the uninterrupted run"
    )


@pytest.mark.parametrize("point", UNREACHED)
def test_a_save_into_a_reused_output_dir_replaces_no_ema_net(runs, point):
    root, result = runs
    (run,) = result(point)
    assert run["status"] == "ok", run  # never killed: the stale ema_net was gone before the save
    assert _same_bits(_ema(run["ema_file"]), _ema(root / "reference.run.ema.safetensors"))


def test_kill_before_the_save_in_a_reused_output_dir_is_loud(runs):
    _, result = runs
    first = result("stale_save_start.resume")[0]
    assert first["status"] == "ema_error", first


def test_allow_ema_restart_resumes_without_the_lost_ema(runs):
    root, result = runs
    (run,) = result("restart")
    assert run["status"] == "ok" and run["resume"].endswith("checkpoint-4"), run
    # The EMA restarted from checkpoint-4's weights: not the uninterrupted run's (which is why it needs opting in).
    assert not _same_bits(_ema(run["ema_file"]), _ema(root / "reference.run.ema.safetensors"))
