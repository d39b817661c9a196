"""Accelerate integration on one process, plus the example end to end (2 processes via ``accelerate launch``).

Expected EMAs come from the independent NumPy reference over recorded parameter histories.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from hf_ema import EMAState
from tests.reference import decays_for, record, reference_ema, to_numpy

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_accelerate.py"
DECAY, DECAY_TYPE = 0.9, "threshold"


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)


def _train(acc, model, opt, ema, start, steps, history=None):
    for step in range(start, start + steps):
        x, y = _batch(step)
        acc.backward(nn.functional.mse_loss(model(x), y))
        opt.step()
        opt.zero_grad()
        ema.update()
        if history is not None:
            history.append(record(acc.unwrap_model(model).state_dict().items()))


def _setup(seed: int):
    acc = Accelerator(cpu=True)
    model = _model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt, EMAState(model, decay=DECAY, decay_type=DECAY_TYPE, accelerator=acc)


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for n, w in want.items():
        np.testing.assert_allclose(to_numpy(got[n]), w, rtol=1e-5, atol=1e-6, err_msg=n)


def test_save_state_load_state_round_trip_and_resume_single_process(tmp_path):
    acc, model, opt, ema = _setup(0)
    history = [record(acc.unwrap_model(model).state_dict().items())]
    _train(acc, model, opt, ema, 0, 6, history)
    _assert_close(ema.state_dict()["ema"], reference_ema(history, decays_for(DECAY_TYPE, DECAY, 6)))
    assert acc._custom_objects == []  # hooks, not register_for_checkpointing (whose files load by unpickling)

    acc_b, model_b, opt_b, ema_b = _setup(0)
    _train(acc_b, model_b, opt_b, ema_b, 0, 3)
    acc_b.save_state(str(tmp_path / "ckpt"))
    files = sorted(p.name for p in (tmp_path / "ckpt" / "ema_net").iterdir())
    assert files == ["ema_state.json", "model.safetensors"]
    assert json.loads((tmp_path / "ckpt" / "ema_net" / "ema_state.json").read_text())["step"] == 3
    _assert_close(
        load_file(str(tmp_path / "ckpt" / "ema_net" / "model.safetensors")),
        reference_ema(history[:4], decays_for(DECAY_TYPE, DECAY, 3)),
    )

    acc_c, model_c, opt_c, ema_c = _setup(42)  # other initial weights: everything must come from the files
    acc_c.load_state(str(tmp_path / "ckpt"))
    assert ema_c.step == 3
    _train(acc_c, model_c, opt_c, ema_c, 3, 3)
    for n, t in ema.state_dict()["ema"].items():
        torch.testing.assert_close(ema_c.state_dict()["ema"][n], t, rtol=0, atol=1e-7, msg=n)


def test_skipped_optimizer_step_is_not_counted():
    acc = Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)  # CPU has no fp16 scaler of its own: add one
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    ema = EMAState(model, decay=DECAY, decay_type=DECAY_TYPE, accelerator=acc)
    history = [record(model.state_dict().items())]
    for step, overflow in enumerate([False, True, False, True, False]):
        x, y = _batch(step)
        loss = nn.functional.mse_loss(model(x), y) * (float("inf") if overflow else 1.0)
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        assert acc.optimizer_step_was_skipped is overflow
        d = ema.update()
        if overflow:
            assert d is None
        else:
            history.append(record(model.state_dict().items()))
    assert ema.step == 3 and ema.num_updates == 3
    # the reference sees only the 3 real steps, with decays for steps 0, 1, 2
    _assert_close(ema.state_dict()["ema"], reference_ema(history, decays_for(DECAY_TYPE, DECAY, 3)))


def _run_example(args: list[str], nproc: int) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if nproc > 1:
        # `accelerate launch --cpu` always runs ONE process (its simple launcher; Accelerate 1.15). The multi-process
        # launcher (torchrun) with CUDA hidden makes the example ask Accelerate for a gloo MULTI_CPU group.
        env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(nproc),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "0",
        ]
    else:
        cmd = [sys.executable]
    proc = subprocess.run(
        [*cmd, str(EXAMPLE), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


COMMON = [
    "--ema",
    "--ema_decay",
    "0.9",
    "--ema_decay_type",
    "threshold",
    "--max_steps",
    "6",
    "--save_steps",
    "3",
    "--gradient_accumulation_steps",
    "2",
    "--per_device_batch_size",
    "16",
]


def test_example_single_process_in_process(tmp_path):
    sys.path.insert(0, str(EXAMPLE.parent))
    from train_accelerate import main

    metrics = main([*COMMON, "--output_dir", str(tmp_path / "one")])
    assert metrics["num_processes"] == 1
    assert metrics["ema_step"] == 6
    assert (tmp_path / "one" / "checkpoint_3" / "ema_net" / "model.safetensors").is_file()
    meta = json.loads((tmp_path / "one" / "checkpoint_6" / "ema_net" / "ema_state.json").read_text())
    assert meta["step"] == 6 and meta["num_updates"] == 6


def test_example_accelerate_launch_two_processes_then_resumes_exactly(tmp_path):
    nproc = 2
    common = COMMON
    _run_example([*common, "--output_dir", str(tmp_path / "full")], nproc)
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["num_processes"] == nproc  # really distributed (not nproc independent single-process runs)
    assert metrics["ema_step"] == 6  # one EMA update per optimizer step, not per micro-batch
    assert set(metrics["final"]) == {"step", "loss", "accuracy", "ema_loss", "ema_accuracy"}
    _run_example(
        [
            *common,
            "--output_dir",
            str(tmp_path / "resumed"),
            "--resume_from",
            str(tmp_path / "full" / "checkpoint_3"),
        ],
        nproc,
    )
    for f in ("ema_net/model.safetensors", "model.safetensors"):
        a = load_file(str(tmp_path / "full" / "checkpoint_6" / f))
        b = load_file(str(tmp_path / "resumed" / "checkpoint_6" / f))
        for n in a:
            assert torch.equal(a[n], b[n]), (f, n)
    meta = json.loads((tmp_path / "resumed" / "checkpoint_6" / "ema_net" / "ema_state.json").read_text())
    assert meta["step"] == 6
    # the ema_net folder is a loadable Hugging Face model
    from transformers import ViTForImageClassification

    m = ViTForImageClassification.from_pretrained(str(tmp_path / "resumed" / "checkpoint_6" / "ema_net"))
    ema = load_file(str(tmp_path / "resumed" / "checkpoint_6" / "ema_net" / "model.safetensors"))
    sd = m.state_dict()
    for n, t in ema.items():
        assert torch.equal(sd[n], t), n
