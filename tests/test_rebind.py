"""The EMA follows the model's tensors when they are replaced after it was built (``model.to``, ``param.data = ...``,
a replaced sub-module, ``fully_shard`` / ZeRO-3), and refuses, naming the tensors, when names or shapes change.

Expected values come from the NumPy float64 reference (tests/reference.py) over the recorded parameter history,
whose first snapshot is the model *as the EMA saw it when it was built*.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import decays_for, float_params, reference_ema, tiny_bn_net, tiny_mlp
from safetensors.torch import load_file
from torch import nn

from hf_ema import EMAState
from tests._torchrun import assert_close, assert_shards_stack_to, load_history, run_torchrun
from tests.dist_worker import DECAY as DIST_DECAY
from tests.dist_worker import DECAY_TYPE as DIST_DECAY_TYPE
from tests.dist_worker import K, make_model

ATOL = 2e-5
DECAY = 0.9
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def drive(ema: EMAState, model: nn.Module, steps: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Move every parameter in place (on whatever device and dtype it is now), ``update()`` after each step.
    Returns the parameter snapshots after each step (the caller supplies the first one)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_((torch.randn(p.shape, generator=gen) * 0.1).to(device=p.device, dtype=p.dtype))
        ema.update()
        out.append(float_params(model))
    return out


def assert_ema(ema: EMAState, history: list[dict[str, np.ndarray]]) -> None:
    """The EMA equals the reference over ``history`` (``history[0]``: the weights the EMA was built from), which
    has moved away from ``history[0]`` (so an EMA stuck on the tensors it was built on fails)."""
    want = reference_ema(history, decays_for("constant", DECAY, len(history) - 1))
    got = ema.ema_state_dict()
    for name, w in want.items():
        np.testing.assert_allclose(got[name].double().numpy(), w, rtol=1e-5, atol=ATOL, err_msg=name)
    assert max(np.abs(w - history[0][n]).max() for n, w in want.items()) > 1e-2


# ----------------------------------------------------------------------------------------- same names and shapes
@pytest.mark.parametrize("to", [torch.bfloat16, torch.float64])
def test_model_cast_after_build_is_followed(to, caplog):
    caplog.set_level(logging.INFO, logger="hf_ema.state")
    model = tiny_mlp(seed=1)
    h0 = float_params(model)
    ema = EMAState(model, decay=DECAY)
    model.to(to)
    history = [h0, *drive(ema, model, 6, seed=2)]
    assert_ema(ema, history)
    sd = {k: v.clone() for k, v in ema.ema_state_dict().items()}
    # an fp32 EMA stays fp32 for a bf16 model; fp64 parameters get an fp64 EMA (the dtype= rule)
    assert {t.dtype for t in sd.values()} == {torch.float32 if to == torch.bfloat16 else torch.float64}
    rebinds = [r for r in caplog.records if "re-bound" in r.getMessage()]
    assert len(rebinds) == 1 and rebinds[0].levelno == logging.INFO, [r.getMessage() for r in caplog.records]
    # average_parameters writes into the model's new tensors and restores them
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.average_parameters():
        for name, p in model.named_parameters():
            assert p.dtype == to and torch.equal(p.detach(), sd[name].to(to)), name
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def test_dtype_none_follows_the_parameters_dtype():
    model = tiny_mlp(seed=3)
    ema = EMAState(model, decay=DECAY, dtype=None)
    model.to(torch.bfloat16)
    ema.update()
    assert {t.dtype for t in ema.ema_state_dict().values()} == {torch.bfloat16}


def test_data_replacement_is_followed():
    model = tiny_mlp(seed=4)
    h0 = float_params(model)
    ema = EMAState(model, decay=DECAY)
    with torch.no_grad():
        # new storage (and values) under the same name
        model[0].weight.data = model[0].weight.data.clone() + 0.5
    history = [h0, *drive(ema, model, 5, seed=5)]
    assert_ema(ema, history)


def test_replaced_submodule_with_same_shapes_is_followed():
    model = tiny_mlp(seed=6)
    h0 = float_params(model)
    ema = EMAState(model, decay=DECAY)
    torch.manual_seed(9)
    model[2] = nn.Linear(16, 3)  # a new module object at the same path
    history = [h0, *drive(ema, model, 5, seed=7)]
    assert_ema(ema, history)
    sd = {k: v.clone() for k, v in ema.ema_state_dict().items()}
    with ema.average_parameters():
        assert torch.equal(model[2].weight.detach(), sd["2.weight"])


def test_weights_tied_after_build_share_one_ema():
    """``b.weight = a.weight`` after the EMA was built: both names now denote one tensor; the EMA keeps averaging it
    once (the first name's EMA), under both names, as the model's state_dict has both."""
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    h0 = float_params(model)
    ema = EMAState(model, decay=DECAY)
    model[2].weight = model[0].weight
    history = [h0, *drive(ema, model, 5, seed=15)]  # the tied tensor appears once, as 0.weight
    assert "2.weight" not in history[1]
    assert_ema(ema, [{k: v for k, v in h.items() if k != "2.weight"} for h in history])
    sd = ema.ema_state_dict()
    assert torch.equal(sd["2.weight"], sd["0.weight"])
    assert ema.num_bytes() == (16 + 4 + 4) * 4


def test_model_cast_inside_average_parameters():
    """Re-binding while the EMA is swapped in: the block's exit puts the training weights into the model's new
    tensors, and the EMA keeps its values."""
    model = tiny_mlp(seed=8)
    h0 = float_params(model)
    ema = EMAState(model, decay=DECAY)
    history = [h0, *drive(ema, model, 4, seed=9)]
    train = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema_sd = {n: t.clone() for n, t in ema.ema_state_dict().items()}
    with ema.average_parameters():
        model.to(torch.float64)
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), ema_sd[name].double()), name
    for name, p in model.named_parameters():
        assert p.dtype == torch.float64 and torch.equal(p.detach(), train[name].double()), name
    for name, t in ema.ema_state_dict().items():
        assert torch.equal(t, ema_sd[name].double()), name
    history += drive(ema, model, 3, seed=10)  # update() works and follows the fp64 tensors
    assert_ema(ema, history)


def test_ordinary_training_never_takes_the_slow_path(monkeypatch, tmp_path):
    """Optimizer steps, BatchNorm statistics updated in place, evaluation, copy_to, save: nothing is re-bound."""
    model = tiny_bn_net(seed=1)
    ema = EMAState(model, decay=DECAY)

    def fail() -> None:
        raise AssertionError("_rebind called although no tensor was replaced")

    monkeypatch.setattr(ema, "_rebind", fail)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    for _ in range(3):
        model.train()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        ema.update()
    with ema.average_parameters():
        model.eval()
        model(x)
    ema.copy_to(tiny_bn_net(seed=2))
    ema.save(tmp_path)
    assert ema.step == 3


# ---------------------------------------------------------------------------------------- names or shapes changed
def test_resize_token_embeddings_is_refused_naming_the_tensor():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=True
    )
    model = GPT2LMHeadModel(config)
    ema = EMAState(model, decay=DECAY)
    model.resize_token_embeddings(48)
    with pytest.raises(ValueError, match=r"transformer\.wte\.weight: \(40, 16\) -> \(48, 16\)") as err:
        ema.update()
    assert "Build the EMAState once the model is final" in str(err.value)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="shape changed"), ema.average_parameters():
        pass
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was swapped


def test_new_and_missing_tensors_are_refused():
    model = tiny_mlp(seed=11)
    ema = EMAState(model, decay=DECAY)
    model[1] = nn.Linear(16, 16)  # the Tanh becomes a layer with weights: 1.weight, 1.bias are new
    with pytest.raises(ValueError, match=r"new in the model: '1.weight', '1.bias'"):
        ema.update()
    model = tiny_mlp(seed=12)
    ema = EMAState(model, decay=DECAY)
    model[2] = nn.Identity()
    with pytest.raises(ValueError, match=r"no longer in the model: '2.weight', '2.bias'"):
        ema.update()
    model = tiny_mlp(seed=13)
    ema = EMAState(model, decay=DECAY)
    model[2] = nn.Linear(16, 5)
    with pytest.raises(ValueError, match=r"2.weight: \(3, 16\) -> \(5, 16\)"):
        ema.save(Path("/nonexistent-never-written"))


# ------------------------------------------------------------------------------------------------------- device
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_cuda_is_refused_at_construction():
    from hf_ema import EMATrainerCallback

    with pytest.raises(ValueError, match=r"`device`='cuda'.*no cuda device"):
        EMAState(tiny_mlp(), device="cuda")
    with pytest.raises(ValueError, match=r"`device`='cuda:0'.*no cuda device"):
        EMATrainerCallback(decay=0.9, device="cuda:0")


@cuda
def test_missing_cuda_index_is_refused():
    with pytest.raises(ValueError, match="device"):
        EMAState(tiny_mlp(), device=f"cuda:{torch.cuda.device_count()}")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_moved_to_cuda_after_build_moves_the_ema(dtype):
    model = tiny_mlp(seed=14)
    h0 = float_params(model)
    ema = EMAState(model, decay=DECAY)
    model.to("cuda", dtype)  # what accelerator.prepare(model) does on a GPU
    history = [h0, *drive(ema, model, 5, seed=15)]
    local = {k: v.clone() for k, v in ema.state_dict()["ema"].items()}  # state_dict() holds references
    assert all(t.device.type == "cuda" and t.dtype == torch.float32 for t in local.values())
    assert_ema(ema, history)
    with ema.average_parameters():
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), local[name].to(dtype)), name


@cuda
def test_pinned_cpu_ema_stays_on_cpu_when_the_model_moves_to_cuda():
    model = tiny_mlp(seed=16)
    h0 = float_params(model)
    ema = EMAState(model, decay=DECAY, device="cpu")
    model.to("cuda")
    history = [h0, *drive(ema, model, 5, seed=17)]
    assert all(t.device.type == "cpu" for t in ema.state_dict()["ema"].values())
    assert_ema(ema, history)
    sd = {k: v.clone() for k, v in ema.ema_state_dict().items()}
    with ema.average_parameters():
        for name, p in model.named_parameters():
            assert p.device.type == "cuda" and torch.equal(p.detach().cpu(), sd[name]), name


# ----------------------------------------------------------------------------------- sharded after construction
WORKER = Path(__file__).with_name("rebind_worker.py")
needs_gloo = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)


def _launch(mode: str, out: Path) -> dict[int, dict]:
    run_torchrun(WORKER, mode, str(out), timeout=240, label=f"{mode} rebind worker")
    return {r: json.loads((out / f"{mode}_info_rank{r}.json").read_text()) for r in (0, 1)}


def _check_sharded_run(out: Path, info: dict[int, dict], prefix: str) -> None:
    history = load_history(out / f"{prefix}_history.safetensors")
    assert len(history) == K + 1
    want = reference_ema(history, decays_for(DIST_DECAY_TYPE, DIST_DECAY, K))
    # the gathered EMA is the EMA of the training run (not the initial weights), and so is what save() wrote
    assert_close(load_file(str(out / f"{prefix}_gathered.safetensors")), want)
    assert_close(EMAState.load(out / f"{prefix}_ckpt", make_model(seed=3)).state_dict()["ema"], want)
    assert max(np.abs(w - history[0][n]).max() for n, w in want.items()) > 1e-3
    for r in (0, 1):
        rebinds = [m for m in info[r]["log"] if "re-bound" in m]
        assert len(rebinds) == 1 and "sharded" in rebinds[0], info[r]["log"]
        assert info[r]["ema_bytes"] <= 0.55 * info[r]["full_bytes"], info[r]  # each rank keeps its part only


@needs_gloo
def test_fully_shard_after_construction(tmp_path):
    info = _launch("fsdp", tmp_path)
    _check_sharded_run(tmp_path, info, "fsdp")
    for r in (0, 1):
        local = load_file(str(tmp_path / f"fsdp_local_rank{r}.safetensors"))
        assert info[r]["unsharded_type"] != "DTensor"
        assert info[r]["local_shapes_while_unsharded"] == {k: list(v.shape) for k, v in local.items()}
    assert_shards_stack_to(
        load_file(str(tmp_path / "fsdp_gathered.safetensors")), tmp_path, "fsdp_local_rank"
    )
    assert info[0]["restored"] and info[1]["restored"]


@needs_gloo
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_zero3_after_construction(tmp_path):
    info = _launch("zero3", tmp_path)
    assert info[0]["is_zero3"] is True
    _check_sharded_run(tmp_path, info, "zero3")
