"""Every benchmark script runs in its quick mode and reports the rows it exists for, so the benchmarks cannot rot.

One ``python benchmarks/run_all.py --quick`` (a subprocess, which runs each script as its own subprocess with
``--quick``: tiny sizes, 1-3 rounds) must exit 0 and its RESULTS.md must hold, per script, hf_ema's rows with
their correctness checks passed (the averaging check ``||ema' - p|| = d ||ema - p||``, the EMA update counts, the
memory matching its independent expectation) and, for each peer (timm, diffusers, ema-pytorch, torch_ema), either
its timed row (when installed) or "skipped: not installed" (when not). Without CUDA, ``bench_cuda.py --quick``
runs its code on the CPU and plain ``bench_cuda.py`` exits 0 saying it skipped. Around 30 s on 2 idle cores.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import run_all  # noqa: E402

# (row label when installed, distribution's import name, row label when it is not)
PEERS = [
    ("timm ModelEmaV3", "timm", "timm"),
    ("diffusers EMAModel(foreach)", "diffusers", "diffusers"),
    ("ema-pytorch EMA(foreach)", "ema_pytorch", "ema_pytorch"),
    ("torch_ema ExponentialMovingAverage", "torch_ema", "torch_ema"),
]
D_OK = "ratio 0.999000 = d ok"
NUMBER = re.compile(r"^[0-9]+(\.[0-9]+)?$")


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=path)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, str]:
    """RESULTS.md of one quick run of every script, split into ``{section title: text}``."""
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--out", str(out)],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    text = (out / "RESULTS.md").read_text()
    sections = {}
    for chunk in text.split("\n## ")[1:]:
        title, _, body = chunk.partition("\n")
        sections[title] = body
    return sections


def rows(text: str, label: str) -> list[list[str]]:
    """Every markdown table row of ``text`` whose first cell is ``label``, as lists of cells."""
    found = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] == label:
            found.append(cells)
    return found


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_peers(section: str, n_tables: int) -> None:
    """Each peer has one row per table: timed with the averaging check passed, or a reason it did not run.

    An installed peer must not be reported as missing (its import path works); it may still be reported with
    an error of its own (e.g. timm 1.0.29's ModelEmaV3 has no ``dtype=`` for the bf16 workload), which is a
    row of the table, not a failure of the script.
    """
    for label, module, skipped_label in PEERS:
        got = rows(section, label) + rows(section, skipped_label)
        assert len(got) == n_tables, (label, section)
        if installed(module):
            for r in got:
                assert "not installed" not in r[-1], r
                assert r[0] == skipped_label or r[-1].endswith(D_OK) or "update failed" in r[-1], r
        else:
            assert all("skipped: not installed" in r[-1] for r in got), got


@pytest.mark.parametrize(
    "title",
    [
        "Update time, 1 torch thread (robust to other load on the machine)",
        "Update time, torch's default threads (all cores; sensitive to other load)",
    ],
)
def test_bench_update_quick(results, title):
    sec = results[title]
    assert "--quick" in sec
    ours = rows(sec, "hf_ema EMAState")
    assert len(ours) == 2, sec  # fp32 and bf16 workloads
    assert all(NUMBER.match(r[1]) and r[-1] == D_OK for r in ours), ours
    assert len(rows(sec, "torch._foreach_copy_ (floor)")) == 2
    assert len(rows(sec, "torch AveragedModel+get_ema_multi_avg_fn")) == 2
    check_peers(sec, 2)
    assert rows(sec, "fp32 update <= 1.10x copy"), sec


def test_bench_overhead_quick(results):
    sec = results["Host overhead per update"]
    (ours,) = rows(sec, "hf_ema EMAState")
    assert NUMBER.match(ours[1]) and ours[-1] == "0.999000", ours
    for label, module, skipped_label in PEERS:
        got = rows(sec, label) + rows(sec, skipped_label)
        assert len(got) == 1, (label, sec)
        assert ("not installed" in got[0][-1]) is not installed(module), got
    assert rows(sec, "host overhead <= 0.4 ms / update (200 tensors)"), sec


def test_bench_trainer_quick(results):
    sec = results["Trainer overhead (1 torch thread)"]
    # 10 optimizer steps per run in quick mode: EMA updates 0, 10 and 1 (update_every=10)
    for label, updates in (("no EMA", "0"), ("ema every step", "10"), ("ema update_every=10", "1")):
        (r,) = rows(sec, label)
        assert r[-1] == updates and NUMBER.match(r[1]), r


def test_bench_memory_quick(results):
    sec = results["EMA memory per rank"]
    for label in (
        "unsharded, fp32 model, fp32 EMA",
        "unsharded, bf16 model, fp32 EMA",
        "unsharded, bf16 model, dtype=None (bf16 EMA)",
        "FSDP2 2 ranks, rank 0",
        "FSDP2 2 ranks, rank 1",
    ):
        (r,) = rows(sec, label)
        assert r[3] == "yes", r
    if installed("peft"):
        (r,) = rows(sec, "LoRA r=8 (query, value), trainable_only=True")
        assert r[3] == "yes", r
    timm_label = "(peer) timm ModelEmaV3: full deep copy" if installed("timm") else "(peer) timm ModelEmaV3"
    assert len(rows(sec, timm_label)) == 1, sec


def test_bench_cuda_quick(results):
    sec = results["GPU"]
    ours = rows(sec, "hf_ema EMAState")
    assert len(ours) == 2 and all(r[-1] == D_OK for r in ours), ours
    check_peers(sec, 2)
    for loop in ("no EMA", "EMA inline", "EMA side_stream=True"):
        assert len(rows(sec, loop)) == 1, sec
    if not torch.cuda.is_available():
        assert "CPU (smoke run, not a GPU result)" in sec


def test_every_script_ran_and_reported_ok(results):
    wall = results["Wall time per script"]
    scripts = [r for r in (line.split("|") for line in wall.splitlines()) if len(r) > 3 and ".py" in r[1]]
    assert len(scripts) == 8, wall  # update x2, overhead, trainer, memory, bema, posthoc, cuda
    listed = {r[1].split()[0] for r in scripts}
    assert listed == {p.name for p in BENCH.glob("bench_*.py")}, listed  # no script is left out of run_all
    assert all(r[3].strip() == "ok" for r in scripts), wall


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA skip")
def test_bench_cuda_without_cuda_skips_with_exit_0():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_cuda.py")],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("no CUDA: skipped"), proc.stdout


def test_a_failing_script_makes_run_one_report_failure(tmp_path):
    res, _ = run_all.run_one("no_such_benchmark.py", [], 120, tmp_path / "x.json")
    assert res["failed"] == "exit status 2" and "no_such_benchmark.py failed" in res["markdown"]


def test_own_failures_exit_1_after_printing_the_table(capsys):
    with pytest.raises(SystemExit) as e:
        _common.emit({"name": "update", "markdown": "| table |", "failures": ["hf_ema EMAState: off"]}, None)
    assert e.value.code == 1
    out, err = capsys.readouterr()
    assert "| table |" in out and "hf_ema EMAState: off" in err


def test_timm_model_ema_loads_without_running_timm_init(tmp_path, monkeypatch):
    """A stand-in timm whose ``__init__`` fails like a timm without torchvision: the loader must not run it."""
    pkg = tmp_path / "timm"
    (pkg / "utils").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ModuleNotFoundError('torchvision', name='torchvision')\n")
    (pkg / "utils" / "__init__.py").write_text("raise AssertionError('timm.utils must not run')\n")
    (pkg / "utils" / "model_ema.py").write_text("import torch\n\nclass ModelEmaV3:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, _common._TIMM_EMA_MODULE, raising=False)
    importlib.invalidate_caches()
    module = _common.timm_model_ema()
    assert module.__file__ == str(pkg / "utils" / "model_ema.py") and hasattr(module, "ModelEmaV3")
    assert "timm" not in sys.modules
    monkeypatch.delitem(sys.modules, _common._TIMM_EMA_MODULE)


def test_timm_model_ema_missing_timm_is_module_not_found(monkeypatch):
    monkeypatch.delitem(sys.modules, _common._TIMM_EMA_MODULE, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError) as e:
        _common.timm_model_ema()
    assert e.value.name == "timm"
