"""The ``hf-ema`` command line: inspect, export, synthesize, sweep, and its error handling.

Most commands run in-process through ``hf_ema.cli.main([...])`` (fast); two run as ``python -m hf_ema`` in a
subprocess (the real entry point). Expected values are computed independently: EMA weights are read back with
``from_pretrained`` / ``safetensors`` and compared with the tracking ``EMAState``'s own tensors, sizes with
``os.walk``, and the sweep's best width from float64 power-function EMAs of the recorded parameter trajectory
(``_ref_power_ema``), never from the CLI's own output.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import tiny_bert
from safetensors.torch import load_file, save_file

from hf_ema import EMAState, PostHocEMA, load_model, synthesize
from hf_ema.cli import TOKENIZER_FILES, CLIError, main
from hf_ema.power import sigma_rel_to_gamma

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 40, 4
GRID = [0.04, 0.06, 0.08, 0.10, 0.12]
TARGET = 0.08
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "ema", "weights"]


def _tokenizer():
    """A tiny word-level fast tokenizer built offline (no download, no vocab conversion)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def _ref_power_ema(traj, sigma_rel: float, t: int) -> dict[str, np.ndarray]:
    """Float64 power-function EMA at step t: theta_s weighted by the integral of p_t over (s - 1, s]."""
    g = sigma_rel_to_gamma(sigma_rel)
    out: dict[str, np.ndarray] = {}
    for s in range(1, t + 1):
        w = (s ** (g + 1) - (s - 1) ** (g + 1)) / t ** (g + 1)
        for n, v in traj[s - 1].items():
            out[n] = out.get(n, 0.0) + w * v.double().numpy()
    return out


def _dist(a, b) -> float:
    return math.sqrt(sum(float(((np.asarray(a[n]) - np.asarray(b[n])) ** 2).sum()) for n in b))


def _disk_bytes(folder: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny BERT trained (a drifting random walk) for STEPS steps with a PostHocEMA run and two EMAStates (one
    named), saved as a Trainer-like checkpoint with a tokenizer; the parameter trajectory for the references."""
    root = tmp_path_factory.mktemp("cli")
    model = tiny_bert()
    gen = torch.Generator().manual_seed(0)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    drift = {n: torch.randn(v.shape, generator=gen) * 0.05 for n, v in state.items()}
    ema = EMAState(model, decay=0.8)
    slow = EMAState(model, decay=0.95, name="slow")
    traj = []
    with PostHocEMA(model, root / "run", snapshot_every=EVERY, snapshot_dtype=torch.float32) as ph:
        for _ in range(STEPS):
            state = {n: v + drift[n] + 0.1 * torch.randn(v.shape, generator=gen) for n, v in state.items()}
            traj.append(state)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(state[n])
            ph.update()
            ema.update()
            slow.update()
    ckpt = root / "checkpoint-40"
    model.save_pretrained(ckpt)
    _tokenizer().save_pretrained(ckpt)
    (ckpt / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    (ckpt / "generation_config.json").write_text(json.dumps({"max_length": 7}))
    (ckpt / "trainer_state.json").write_text("{}")  # not a tokenizer file: never exported
    ema.save(ckpt)
    slow.save(ckpt)
    return {
        "root": root,
        "run": root / "run",
        "ckpt": ckpt,
        "model": model,
        "traj": traj,
        "ema": {k: v.clone() for k, v in ema.ema_state_dict().items()},
        "slow": {k: v.clone() for k, v in slow.ema_state_dict().items()},
    }


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the test printed before (e.g. transformers' progress bars)
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("hf-ema: error: ") and "Traceback" not in err, err


# ----------------------------------------------------------------------------- entry points
def test_console_script_and_python_m(world):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = None
    if tomllib is not None:
        scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
        assert scripts == {"hf-ema": "hf_ema.cli:main"}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run(
        [sys.executable, "-m", "hf_ema", "inspect", str(world["run"]), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["kind"] == "posthoc_run"
    bad = subprocess.run(
        [sys.executable, "-m", "hf_ema", "inspect", str(world["root"] / "nope")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 1 and bad.stdout == ""
    _one_line_error(bad.stderr)
    assert "does not exist" in bad.stderr


@pytest.mark.parametrize("verb", ["inspect", "export", "synthesize", "sweep"])
def test_every_verb_has_help_with_an_example(capsys, verb):
    rc, out, _ = _run(capsys, verb, "--help")
    assert rc == 0 and "examples:" in out and f"hf-ema {verb} " in out
    rc, out, _ = _run(capsys, "--help")
    assert rc == 0 and verb in out


# ----------------------------------------------------------------------------- inspect
def test_inspect_checkpoint_json(world, capsys):
    ckpt, model = world["ckpt"], world["model"]
    rc, out, err = _run(capsys, "inspect", ckpt, "--json")
    assert rc == 0, err
    desc = json.loads(out)
    assert desc["kind"] == "checkpoint" and desc["model_type"] == "bert"
    assert set(desc["tokenizer_files"]) == {"tokenizer.json", "tokenizer_config.json", "vocab.txt"} | (
        {"special_tokens_map.json"} if (ckpt / "special_tokens_map.json").exists() else set()
    )
    emas = {e["folder"]: e for e in desc["emas"]}
    assert list(emas) == ["ema_net", "ema_net-slow"]
    sd = model.state_dict()
    for folder, decay in (("ema_net", 0.8), ("ema_net-slow", 0.95)):
        e = emas[folder]
        assert e["step"] == STEPS and e["num_updates"] == STEPS and e["decay"] == decay
        assert e["decay_type"] == "constant" and e["update_every"] == 1 and e["dtype"] == "float32"
        ema_tensors = world["ema" if folder == "ema_net" else "slow"]
        assert e["tensors"] == len(ema_tensors)
        assert e["parameters"] == sum(v.numel() for v in ema_tensors.values())
        assert e["parameters"] == sum(sd[n].numel() for n in ema_tensors)
        assert e["bytes"] == _disk_bytes(ckpt / folder)
        assert e["tensor_dtypes"] == {"float32": len(ema_tensors)}
        assert e["peft_adapter_files"] == [] and e["config"] is True
    assert emas["ema_net-slow"]["name"] == "slow"
    # text output names the same things
    rc, out, _ = _run(capsys, "inspect", ckpt)
    assert (
        rc == 0
        and "ema_net-slow" in out
        and "decay 0.95" in out
        and f"{emas['ema_net']['parameters']:,}" in out
    )


def test_inspect_ema_net_folder_and_run(world, capsys):
    rc, out, _ = _run(capsys, "inspect", world["ckpt"] / "ema_net", "--json")
    desc = json.loads(out)
    assert rc == 0 and desc["kind"] == "ema_net" and desc["step"] == STEPS and desc["decay"] == 0.8

    run = world["run"]
    rc, out, err = _run(capsys, "inspect", run, "--json")
    assert rc == 0, err
    desc = json.loads(out)
    manifest = json.loads((run / "manifest.json").read_text())
    assert desc["kind"] == "posthoc_run" and desc["run_id"] == manifest["run_id"]
    assert [round(p["sigma_rel"], 10) for p in desc["profiles"]] == [0.05, 0.1]
    assert desc["world_size"] == [1] and desc["layout"] == ["gathered"] and desc["time_unit"] == "steps"
    snaps = desc["snapshots"]
    assert snaps["count"] == 2 * STEPS // EVERY and snaps["steps"] == STEPS // EVERY
    assert (snaps["first_step"], snaps["last_step"]) == (EVERY, STEPS)
    assert snaps["dtype"] == ["float32"] and snaps["missing_files"] == 0
    assert snaps["bytes"] == _disk_bytes(run / "snapshots")
    sd = world["model"].state_dict()
    assert set(manifest["tensors"]) == set(sd) and desc["tensors"] == len(sd)
    assert desc["parameters"] == sum(v.numel() for v in sd.values())
    assert desc["config"] is True and desc["model_type"] == "bert"
    rc, out, _ = _run(capsys, "inspect", run)
    assert rc == 0 and manifest["run_id"] in out and f"steps {EVERY}..{STEPS}" in out


def test_inspect_bad_paths(world, tmp_path, capsys):
    rc, out, err = _run(capsys, "inspect", tmp_path / "missing")
    assert rc == 1 and out == "" and "does not exist" in err
    _one_line_error(err)
    world["model"].save_pretrained(tmp_path / "plain")  # a model folder without any EMA
    rc, _, err = _run(capsys, "inspect", tmp_path / "plain")
    assert rc == 1 and "no EMA" in err
    _one_line_error(err)
    (tmp_path / "file.txt").write_text("x")
    rc, _, err = _run(capsys, "inspect", tmp_path / "file.txt")
    assert rc == 1 and "is a file" in err
    (tmp_path / "badrun").mkdir()
    (tmp_path / "badrun" / "manifest.json").write_text("{not json")
    rc, _, err = _run(capsys, "inspect", tmp_path / "badrun")
    assert rc == 1 and "not valid JSON" in err
    _one_line_error(err)
    # an incomplete ema_net is shown and reported
    (tmp_path / "ck" / "ema_net").mkdir(parents=True)
    (tmp_path / "ck" / "ema_net" / "ema_state.json").write_text("{}")
    rc, out, err = _run(capsys, "inspect", tmp_path / "ck")
    assert rc == 1 and "ERROR" in out and "model.safetensors" in err
    # --debug: the exception itself, with its traceback
    with pytest.raises(CLIError, match="does not exist"):
        main(["inspect", str(tmp_path / "missing"), "--debug"])
    with pytest.raises(CLIError, match="does not exist"):
        main(["--debug", "inspect", str(tmp_path / "missing")])


# ----------------------------------------------------------------------------- export
def test_export_loads_with_from_pretrained_and_tokenizer(world, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ckpt, out = world["ckpt"], tmp_path / "model"
    rc, stdout, err = _run(capsys, "export", ckpt, out)
    assert rc == 0, err
    assert "from_pretrained" in stdout
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    sd = loaded.state_dict()
    trained = world["model"].state_dict()
    for name, want in world["ema"].items():
        assert torch.equal(sd[name], want), name
    assert any(not torch.equal(world["ema"][n], trained[n]) for n in world["ema"])  # not the training weights
    assert load_file(str(out / "model.safetensors")).keys() == world["ema"].keys()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("hello ema world")["input_ids"] == [5, 7, 6]
    exported = {p.name for p in out.iterdir()}
    want_tok = {n for n in TOKENIZER_FILES if (ckpt / n).is_file()}
    assert want_tok >= {"tokenizer.json", "tokenizer_config.json", "vocab.txt"}
    assert (
        exported
        == {"model.safetensors", "config.json", "generation_config.json", "hf_ema_export.json"} | want_tok
    )
    for n in [*want_tok, "generation_config.json"]:
        assert (out / n).read_bytes() == (ckpt / n).read_bytes(), n
    assert not list(tmp_path.glob(".model.*"))  # no temporary folder left

    # a non-empty OUT is refused and left as it was; --force replaces it (here with the named EMA, in bf16)
    before = (out / "model.safetensors").read_bytes()
    rc, _, err = _run(capsys, "export", ckpt, out)
    assert rc == 1 and "--force" in err and (out / "model.safetensors").read_bytes() == before
    _one_line_error(err)
    rc, _, err = _run(capsys, "export", ckpt, out, "--ema", "slow", "--force", "--dtype", "bfloat16")
    assert rc == 0, err
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    for name, want in world["slow"].items():
        assert torch.equal(loaded.state_dict()[name], want.to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"


def test_export_bad_input(world, tmp_path, capsys):
    ckpt = world["ckpt"]
    rc, _, err = _run(capsys, "export", ckpt, tmp_path / "o", "--ema", "fast")
    assert rc == 1 and "ema_net-fast" in err and "ema_net-slow" in err
    _one_line_error(err)
    for target in (ckpt, ckpt.parent, ckpt / "ema_net" / "x"):  # would delete or write into the source
        rc, _, err = _run(capsys, "export", ckpt, target, "--force")
        assert rc == 1 and "must not be" in err, target
    assert (ckpt / "ema_net" / "model.safetensors").is_file()
    rc, _, err = _run(capsys, "export", tmp_path / "nothing", tmp_path / "o")
    assert rc == 1 and "does not exist" in err
    rc, _, err = _run(capsys, "export", ckpt)
    assert rc == 2 and "OUT" in err  # argparse usage error
    # only named EMAs: the single one is taken; with two the choice is required
    only = tmp_path / "only"
    only.mkdir()
    (only / "ema_net-slow").symlink_to(ckpt / "ema_net-slow", target_is_directory=True)
    rc, out, err = _run(capsys, "export", only, tmp_path / "o1")
    assert rc == 0 and "ema_net-slow" in out, err
    (only / "ema_net-b").symlink_to(ckpt / "ema_net", target_is_directory=True)
    rc, _, err = _run(capsys, "export", only, tmp_path / "o2")
    assert rc == 1 and "--ema NAME" in err


def test_export_trainable_only_completes_the_model(tmp_path, capsys):
    """An EMA of the trainable tensors only: exported on top of the checkpoint's weights for the frozen rest."""
    from transformers import AutoModelForSequenceClassification

    model = tiny_bert()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("classifier"))
    ema = EMAState(model, decay=0.5, trainable_only=True)
    with torch.no_grad():
        for _ in range(3):
            model.classifier.weight.add_(1.0)
            ema.update()
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    ema.save(ckpt)
    rc, out, err = _run(capsys, "export", ckpt, tmp_path / "m")
    assert rc == 0, err
    assert "trainable" in out
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").state_dict()
    ema_sd = ema.ema_state_dict()
    assert set(ema_sd) == {"classifier.weight", "classifier.bias"}
    for n, v in model.state_dict().items():
        want = ema_sd.get(n, v)
        assert torch.equal(loaded[n], want), n
    assert not torch.equal(loaded["classifier.weight"], model.classifier.weight)


def test_export_peft_adapter(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    tiny_bert().save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    model = peft.get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "base"),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )
    ema = EMAState(model, decay=0.5, trainable_only=True)
    with torch.no_grad():
        for _ in range(3):
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.3)
            ema.update()
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    _tokenizer().save_pretrained(ckpt)
    ema.save(ckpt)
    rc, out, err = _run(capsys, "export", ckpt, tmp_path / "adapter")
    assert rc == 0, err
    assert "PEFT adapter" in out and "PeftModel.from_pretrained" in out
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files and "config.json" not in files
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").state_dict()
    ema_sd = ema.ema_state_dict()
    lora = [n for n in ema_sd if "lora_" in n]
    assert lora
    for n in lora:
        assert torch.equal(loaded[n], ema_sd[n]), n
        assert not torch.equal(ema_sd[n], model.state_dict()[n])
    # an ema_net without the adapter files (older hf_ema) of a PEFT checkpoint: refused, not a base-less "model"
    (ckpt / "ema_net" / "adapter_model.safetensors").unlink()
    (ckpt / "ema_net" / "adapter_config.json").unlink()
    rc, _, err = _run(capsys, "export", ckpt, tmp_path / "adapter2")
    assert rc == 1 and "is a PEFT checkpoint" in err and not (tmp_path / "adapter2").exists()


# ----------------------------------------------------------------------------- synthesize
def test_synthesize_writes_what_synthesize_returns(world, tmp_path, capsys):
    from transformers import BertForSequenceClassification

    run, out = world["run"], tmp_path / "synth"
    rc, stdout, err = _run(capsys, "synthesize", run, "--sigma-rel", 0.03, 0.07, "--out", out)
    assert rc == 0, err
    mem = synthesize(run, sigma_rel=[0.03, 0.07], progress=False)
    for r in mem:
        folder = out / f"sigma_rel-{r.sigma_rel:.4f}"
        written = load_file(str(folder / "ema_net" / "model.safetensors"))
        assert written.keys() == r.tensors.keys()
        for k, v in r.tensors.items():
            assert torch.equal(written[k], v), k
        assert f"{r.residual:.3g}" in stdout and str(folder / "ema_net") in stdout
        loaded = load_model(BertForSequenceClassification, folder)
        assert torch.equal(loaded.state_dict()["classifier.weight"], r.tensors["classifier.weight"])
    # the weights table: one row per snapshot used, one column per target
    assert "weights" in stdout and stdout.count(f"{STEPS:>9}") == 2

    rc, stdout, _ = _run(
        capsys, "synthesize", run, "--sigma-rel", 0.05, "--at-step", 20, "--out", out, "--json"
    )
    assert rc == 0
    (res,) = json.loads(stdout)["results"]
    assert res["step"] == 20 and Path(res["path"]) == out / "sigma_rel-0.0500-step-20"
    assert math.isclose(sum(res["coefficients"].values()), 1.0, abs_tol=1e-9)


def test_synthesize_config_and_tokenizer_for_a_run_without_config(world, tmp_path, capsys):
    """A run that recorded no model config: --config adds config.json, --tokenizer the tokenizer files, so that
    `export` of the result is a complete model folder."""
    import shutil

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    (run / "config.json").unlink()
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"] = None
    (run / "manifest.json").write_text(json.dumps(manifest))
    rc, stdout, _ = _run(capsys, "synthesize", run, "--sigma-rel", 0.07, "--out", tmp_path / "a")
    assert rc == 0 and "no model config" in stdout
    assert not (tmp_path / "a" / "sigma_rel-0.0700" / "ema_net" / "config.json").exists()
    ckpt = world["ckpt"]
    rc, _, err = _run(
        capsys, "synthesize", run, "--sigma-rel", 0.07, "--out", tmp_path / "b", "--config", ckpt,
        "--tokenizer", ckpt,
    )  # fmt: skip
    assert rc == 0, err
    folder = tmp_path / "b" / "sigma_rel-0.0700"
    direct = AutoModelForSequenceClassification.from_pretrained(folder / "ema_net")
    want = synthesize(world["run"], sigma_rel=[0.07], progress=False)[0].tensors
    assert torch.equal(direct.state_dict()["bert.pooler.dense.weight"], want["bert.pooler.dense.weight"])
    rc, _, err = _run(capsys, "export", folder, tmp_path / "model")
    assert rc == 0, err
    assert AutoTokenizer.from_pretrained(tmp_path / "model")("world")["input_ids"] == [6]
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").state_dict()
    for k, v in want.items():
        assert torch.equal(loaded[k], v), k


def test_synthesize_bad_input(world, tmp_path, capsys):
    run = world["run"]
    rc, _, err = _run(capsys, "synthesize", run, "--sigma-rel", 0.5, "--out", tmp_path / "o")
    assert rc == 1 and "--sigma-rel" in err and "0.5" in err
    _one_line_error(err)
    rc, _, err = _run(capsys, "synthesize", run, "--sigma-rel", 0.05)
    assert rc == 2 and "--out" in err
    rc, _, err = _run(capsys, "synthesize", run, "--sigma-rel", "abc", "--out", tmp_path / "o")
    assert rc == 2 and "not a number" in err
    rc, _, err = _run(
        capsys, "synthesize", run, "--sigma-rel", 0.05, "--at-step", STEPS + 4, "--out", tmp_path
    )
    assert rc == 1 and "beyond the last snapshot" in err
    _one_line_error(err)
    rc, _, err = _run(capsys, "synthesize", world["ckpt"], "--sigma-rel", 0.05, "--out", tmp_path / "o")
    assert rc == 1 and "manifest" in err
    _one_line_error(err)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- sweep
HOOK = '''
import os
import torch
from safetensors.torch import load_file

_TARGET = None


def distance(state_dict, sigma_rel):
    """Euclidean distance of the parameters to a known target."""
    global _TARGET
    if _TARGET is None:
        _TARGET = load_file(os.path.join(os.path.dirname(__file__), "target.safetensors"))
    d2 = sum(float(((state_dict[k].double() - v) ** 2).sum()) for k, v in _TARGET.items())
    return {"distance": d2 ** 0.5, "sigma_seen": sigma_rel}


def broken(state_dict, sigma_rel):
    raise RuntimeError("eval set not found")


def not_a_dict(state_dict, sigma_rel):
    return 3.0


def one(state_dict, sigma_rel):
    return {"loss": torch.tensor(sigma_rel)}
'''


@pytest.fixture(scope="module")
def hook(world):
    """The hook file and the float64 reference EMAs of the grid (the target is the one of TARGET)."""
    refs = {s: _ref_power_ema(world["traj"], s, STEPS) for s in GRID}
    folder = world["root"] / "hooks"
    folder.mkdir()
    save_file({k: torch.from_numpy(v) for k, v in refs[TARGET].items()}, str(folder / "target.safetensors"))
    (folder / "cli_hooks.py").write_text(HOOK)
    return {"file": folder / "cli_hooks.py", "refs": refs}


def test_sweep_picks_the_best_and_writes_table_plot_csv(world, hook, tmp_path, capsys):
    refs = hook["refs"]
    ref_dist = {s: _dist(refs[s], refs[TARGET]) for s in GRID}
    out = tmp_path / "sweep"
    rc, stdout, err = _run(
        capsys, "sweep", world["run"], "--grid", 0.04, 0.12, 5, "--eval", f"{hook['file']}:distance",
        "--metric", "distance", "--out", out, "--tokenizer", world["ckpt"],
    )  # fmt: skip
    assert rc == 0, err
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["sigma_rel"]) for r in rows] == GRID
    for r in rows:
        s = float(r["sigma_rel"])
        assert float(r["sigma_seen"]) == s
        # synthesis error (residual ~1-2% here) moves the distance by < 0.1; candidates are >= 3 apart
        assert abs(float(r["distance"]) - ref_dist[s]) < 0.1, (s, r["distance"], ref_dist[s])
    expected_best = min(GRID, key=lambda s: ref_dist[s])
    assert expected_best == TARGET
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["best"]["sigma_rel"] == expected_best and summary["mode"] == "min"
    assert summary["metric"] == "distance" and len(summary["results"]) == len(GRID)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"best: sigma_rel {expected_best:.4f}" in stdout and "distance" in stdout
    # the best EMA is written: it equals synthesize's, loads, and exports with the tokenizer
    best = synthesize(world["run"], sigma_rel=[expected_best], progress=False)[0].tensors
    written = load_file(str(out / "best" / "ema_net" / "model.safetensors"))
    assert all(torch.equal(written[k], v) for k, v in best.items())
    assert (out / "best" / "tokenizer.json").is_file()
    rc, _, err = _run(capsys, "export", out / "best", tmp_path / "model")
    assert rc == 0, err

    # mode max: the farthest width, again from the float64 references
    rc, _, err = _run(
        capsys, "sweep", world["run"], "--sigma-rel", *GRID, "--eval", f"{hook['file']}:distance",
        "--metric", "distance", "--mode", "max", "--out", out, "--force",
    )  # fmt: skip
    assert rc == 0, err
    farthest = max(GRID, key=lambda s: ref_dist[s])
    assert farthest != TARGET
    assert json.loads((out / "sweep.json").read_text())["best"]["sigma_rel"] == farthest


def test_sweep_module_hook_and_single_metric(world, hook, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(hook["file"].parent)  # MODULE:FUNCTION is imported from the working directory
    monkeypatch.delitem(sys.modules, "cli_hooks", raising=False)
    rc, _, err = _run(
        capsys,
        "sweep",
        world["run"],
        "--sigma-rel",
        0.1,
        0.05,
        "--eval",
        "cli_hooks:one",
        "--out",
        tmp_path / "s",
    )
    assert rc == 0, err
    summary = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert summary["metric"] == "loss" and summary["best"]["sigma_rel"] == 0.05


def test_sweep_bad_input(world, hook, tmp_path, capsys):
    run, f = world["run"], hook["file"]
    base = ["sweep", run, "--sigma-rel", 0.05, 0.1, "--out", tmp_path / "o"]
    cases = [
        (["--eval", "nohook"], "MODULE:FUNCTION"),
        (["--eval", f"{tmp_path / 'missing.py'}:f"], "no file"),
        (["--eval", f"{f}:nothing"], "no attribute 'nothing'"),
        (["--eval", "hf_ema_no_such_module:f"], "importing"),
        (["--eval", f"{f}:broken"], "raised RuntimeError for sigma_rel=0.0500: eval set not found"),
        (["--eval", f"{f}:not_a_dict"], "must return a non-empty dict"),
        (["--eval", f"{f}:distance"], "pick the one to optimise with --metric"),
        (["--eval", f"{f}:distance", "--metric", "acc"], "--metric 'acc' is not among"),
    ]
    for extra, message in cases:
        rc, _, err = _run(capsys, *base, *extra)
        assert rc == 1 and message in err, (extra, err)
        _one_line_error(err)
    rc, _, err = _run(capsys, "sweep", run, "--grid", 0.05, 0.1, 2.5, "--eval", f"{f}:one", "--out", tmp_path)
    assert rc == 2 and "NUM must be an integer" in err
    rc, _, err = _run(capsys, "sweep", run, "--eval", f"{f}:one", "--out", tmp_path / "o")
    assert rc == 2  # neither --sigma-rel nor --grid
    rc, _, err = _run(capsys, "sweep", run, "--sigma-rel", 0.4, "--eval", f"{f}:one", "--out", tmp_path / "o")
    assert rc == 1 and "--sigma-rel" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    rc, _, err = _run(
        capsys, "sweep", run, "--sigma-rel", 0.05, "--eval", f"{f}:one", "--out", tmp_path / "full"
    )
    assert rc == 1 and "--force" in err
    with pytest.raises(CLIError, match="eval set not found"):
        main([*map(str, base), "--eval", f"{f}:broken", "--debug"])
