"""Every EMA swap, restore and ``copy_to`` reaches the weights the next forward reads (2 processes, gloo, CPU).

FSDP2 and ZeRO-3 keep full copies of some parameters between forwards, and a forward reads those, not the local
shards the EMA engine writes: FSDP2 leaves a group unsharded after forward when ``reshard_after_forward=False``
(Accelerate's group of embeddings, final norm and head, and the root by FSDP2's default); ZeRO-3 keeps parameters
below its persistence threshold gathered across steps. tests/sharded_swap_worker.py trains a tiny GPT-2 in these
layouts and records logits of forwards in every order (raw then EMA, EMA then raw, after a training step, after
``copy_to``) and the full training weights after every step, of the same run with and without those forwards.
Expected logits come from a plain single-process model given the recorded training weights or their EMA from the
NumPy reference (tests/reference.py), never from the implementation.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests._torchrun import assert_same_bits, load_history, run_torchrun
from tests.reference import decays_for, reference_ema
from tests.sharded_swap_worker import (
    DECAY,
    DECAY_TYPE,
    EVAL_EVERY,
    FIRST,
    STEPS,
    TRAINER_STEPS,
    TokenDataset,
    probe,
    tiny_gpt2,
)

WORKER = Path(__file__).with_name("sharded_swap_worker.py")
TIMEOUT_S = 85  # each two-process run must finish well within 90 s

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)


@functools.cache
def _deepspeed_import_error() -> str | None:
    """Why ``import deepspeed`` fails on this machine (in a fresh process, on the CPU accelerator), or None."""
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", "import deepspeed"], env=env, capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"deepspeed is installed but does not import: {tail}"
    return None


def _needs_deepspeed() -> None:
    why = _deepspeed_import_error()
    if why is not None:
        pytest.skip(reason=why)


def _launch(mode: str, out: Path) -> dict[int, dict]:
    run_torchrun(WORKER, mode, str(out), timeout=TIMEOUT_S, label=f"{mode} worker")
    return {r: json.loads((out / f"{mode}_info_rank{r}.json").read_text()) for r in (0, 1)}


def _plain_logits(weights: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """Logits of an unsharded, single-process GPT-2 holding ``weights`` (float64 arrays, rounded to float32)."""
    model = tiny_gpt2(seed=99)
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v).float() for k, v in weights.items()}, strict=False
    )
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # head tied to wte
    assert model.lm_head.weight is model.transformer.wte.weight
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits


def _assert_logits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------- FSDP2 and ZeRO-3
@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory) -> tuple[str, Path, dict[int, dict]]:
    out = tmp_path_factory.mktemp("fsdp2")
    return "fsdp2", out, _launch("fsdp2", out)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> tuple[str, Path, dict[int, dict]]:
    _needs_deepspeed()
    out = tmp_path_factory.mktemp("zero3")
    return "zero3", out, _launch("zero3", out)


@pytest.fixture(params=["fsdp2", "zero3"])
def engine_run(request) -> tuple[str, Path, dict[int, dict]]:
    return request.getfixturevalue(f"{request.param}_run")


def test_forwards_read_the_ema_inside_and_the_training_weights_outside(engine_run):
    mode, out, info = engine_run
    assert info[0]["copy_to_other_error"] is None and info[1]["copy_to_other_error"] is None
    history = load_history(out / f"{mode}_eval_history.safetensors")
    assert len(history) == STEPS + 1
    rec = load_file(str(out / f"{mode}_logits.safetensors"))
    x = rec.pop("x")
    expected_names = {
        f"raw{FIRST}a", f"ema{FIRST}a", f"raw{FIRST}b", f"ema{FIRST}b", f"raw{FIRST}c",
        f"ema{FIRST + 1}a", f"raw{FIRST + 1}a",
        f"other{STEPS}a", f"other{STEPS}b", f"raw{STEPS}a", f"copy{STEPS}a", f"copy{STEPS}b",
    }  # fmt: skip
    assert set(rec) == expected_names
    for name, got in sorted(rec.items()):
        kind, step = re.fullmatch(r"(raw|ema|copy|other)(\d+)[abc]", name).groups()
        step = int(step)
        raw = _plain_logits(history[step], x)
        ema = _plain_logits(reference_ema(history[: step + 1], decays_for(DECAY_TYPE, DECAY, step)), x)
        assert (ema - raw).abs().max() > 1e-2  # the two weight sets are told apart
        if name == f"other{STEPS}a":  # another model (seed 7) before copy_to: its own initial weights
            assert (got - raw).abs().max() > 1e-2 and (got - ema).abs().max() > 1e-2
            continue
        _assert_logits(got, raw if kind == "raw" else ema, f"{mode} {name}")


def test_the_layouts_keep_full_copies_that_a_forward_reads(engine_run):
    """Guards the other tests: right before the first swap, the model really holds full copies of parameters."""
    mode, _, info = engine_run
    held = set(info[0]["held_full_before_swap"])
    assert held == set(info[1]["held_full_before_swap"])
    if mode == "fsdp2":  # Accelerate's reshard_after_forward=False group and the root stay unsharded
        assert held == {
            "transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"
        }  # fmt: skip
    else:  # the persistent parameters, and the (not persistent) token embedding, still gathered from the forward
        assert held == set(info[0]["persistent"]) | {"transformer.wte.weight"}


def test_training_is_bitwise_the_same_with_ema_forwards_in_between(engine_run):
    mode, out, _ = engine_run
    plain = load_file(str(out / f"{mode}_plain_history.safetensors"))
    with_evals = load_file(str(out / f"{mode}_eval_history.safetensors"))
    assert len(load_history(out / f"{mode}_plain_history.safetensors")) == STEPS + 1
    assert_same_bits(with_evals, plain)


def test_zero3_layout_has_persistent_and_released_parameters(zero3_run):
    _, _, info = zero3_run
    assert info[0]["not_persistent"] == ["transformer.wte.weight"]  # 100,500 elements: released after use
    assert len(info[0]["persistent"]) > 10  # everything else stays gathered between steps
    # after copy_to, the parameters that stay gathered hold the EMA's full tensors
    assert set(info[0]["persistent"]) <= set(info[0]["available_after_copy_to"])
    assert info[0]["available_hold_ema"] is True


# ------------------------------------------------------------------------------------------- Trainer + ZeRO-3
@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    _needs_deepspeed()
    out = tmp_path_factory.mktemp("trainer_zero3")
    return out, _launch("trainer_zero3", out)


def test_trainer_zero3_really_runs_zero3(trainer_run):
    _, info = trainer_run
    assert info[0]["eval_engine"] == info[1]["eval_engine"] == "DeepSpeedEngine"
    assert len(info[0]["eval_persistent"]) > 10


def test_trainer_zero3_evaluation_leaves_training_bitwise_unchanged(trainer_run):
    out, info = trainer_run
    plain = load_file(str(out / "trainer_plain_history.safetensors"))
    with_evals = load_file(str(out / "trainer_eval_history.safetensors"))
    assert len(load_history(out / "trainer_eval_history.safetensors")) == TRAINER_STEPS + 1
    assert_same_bits(with_evals, plain)
    for rank in (0, 1):  # the gathered parameters a training forward reads were the training weights
        assert info[rank]["eval_stale"] == [] and info[rank]["plain_stale"] == []


def test_trainer_zero3_evaluation_reads_the_ema(trainer_run):
    out, info = trainer_run
    history = load_history(out / "trainer_eval_history.safetensors")
    logits = {int(k): v for k, v in load_file(str(out / "trainer_eval_logits.safetensors")).items()}
    assert sorted(logits) == info[0]["eval_evals"]
    assert set(range(EVAL_EVERY, TRAINER_STEPS + 1, EVAL_EVERY)) <= set(logits)  # (and one at the last step)
    ids = TokenDataset(8, seed=2).ids  # the eval set, 4 sequences per rank, gathered in order
    for step, got in logits.items():
        ema = reference_ema(history[: step + 1], decays_for(DECAY_TYPE, DECAY, step))
        want, raw = _plain_logits(ema, ids), _plain_logits(history[step], ids)
        assert (want - raw).abs().max() > 1e-2
        _assert_logits(got, want, f"evaluation at step {step}")


def test_trainer_zero3_model_holds_the_ema_after_train(trainer_run):
    out, info = trainer_run
    history = load_history(out / "trainer_eval_history.safetensors")
    want = reference_ema(history, decays_for(DECAY_TYPE, DECAY, TRAINER_STEPS))
    ema = load_file(str(out / "trainer_eval_ema.safetensors"))
    assert set(want) <= set(ema)
    for name, w in want.items():
        np.testing.assert_allclose(ema[name].double().numpy(), w, rtol=1e-5, atol=1e-6, err_msg=name)
    end = load_file(str(out / "trainer_eval_end.safetensors"))
    assert torch.equal(end["x"], probe())
    _assert_logits(end["y"], _plain_logits(want, end["x"]), "forward after train() with replace_at_end")
    # the parameters ZeRO-3 keeps gathered hold the EMA's full tensors
    assert set(info[0]["eval_persistent"]) <= set(info[0]["eval_available_at_end"])
    assert info[0]["eval_available_hold_ema"] is True


# ------------------------------------------------------------------------------------------ single process
class _Status:
    """Stands for DeepSpeed's ``ZeroParamStatus`` member (only its ``name`` is read)."""

    def __init__(self, name: str) -> None:
        self.name = name


def _fake_zero3_param(status: str, secondary: bool = False) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_tensor, p.ds_id, p.ds_status = torch.zeros(3), 0, _Status(status)
    p.ds_secondary_tensor = torch.zeros(3) if secondary else None
    return p


def test_write_is_refused_while_a_zero3_gather_is_in_flight():
    from hf_ema import EMAState

    model = torch.nn.Linear(2, 2)
    ema = EMAState(model, decay=0.5)
    model.register_parameter("gathering", _fake_zero3_param("INFLIGHT"))
    before = {k: v.clone() for k, v in model.state_dict().items() if k != "gathering"}
    with pytest.raises(RuntimeError, match=r"ZeRO-3 is gathering 1 of its parameters \(\['gathering'\]\)"):
        ema.swap()
    assert not ema._swapped
    assert_same_bits(
        {k: v for k, v in model.state_dict().items() if k != "gathering"}, before
    )  # nothing written


def test_zero3_secondary_partitions_of_written_parameters_are_dropped():
    from hf_ema.distributed import after_local_write

    released = _fake_zero3_param("NOT_AVAILABLE", secondary=True)  # not gathered: no collective needed
    after_local_write([released, torch.nn.Parameter(torch.ones(2))])
    assert released.ds_secondary_tensor is None  # the next gather reads the written primary partitions
