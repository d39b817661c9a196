"""Swapping the EMA into the model: writes made inside ``average_parameters()`` are kept in the EMA on every path,
``copy_to`` inside the block, parameters sharing storage (tied / aliased / overlapping), non-contiguous parameters.

Expected values come from NumPy (tests/reference.py, or a NumPy forward pass for BatchNorm statistics).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import decays_for, drive, reference_ema, tiny_bn_net, tiny_mlp
from torch import nn

from hf_ema import EMAState

DECAY = 0.9
LOW = [
    torch.float32,
    torch.bfloat16,
]  # same dtype as the EMA: XOR exchange; bf16 model, fp32 EMA: backup path


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


def model_bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: bits(v) for k, v in model.state_dict().items()}


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs bitwise"


def ema_copy(ema: EMAState) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ema.ema_state_dict().items()}


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


# ------------------------------------------------------------------------------------ writes inside the block
@pytest.mark.parametrize("dtype", LOW)
def test_update_bn_inside_the_block_is_kept_in_the_ema(dtype):
    """Precise-BN: recompute the BatchNorm statistics for the EMA weights (``update_bn``) inside the block; the EMA
    keeps them, the EMA weights stay bitwise as they were, the training weights and statistics come back bitwise."""
    model = tiny_bn_net(seed=1).to(dtype)
    ema = EMAState(model, decay=DECAY)
    drive(ema, model, 5, seed=2, scale=0.2)
    before = ema_copy(ema)
    train = model_bits(model)
    x = (torch.randn(32, 4, generator=torch.Generator().manual_seed(3)) * 2 + 3).to(dtype)
    with ema.average_parameters():
        torch.optim.swa_utils.update_bn([x], model)
        w, b = np64(model[0].weight), np64(model[0].bias)  # the EMA weights, as the model holds them
    assert_same_bits(model_bits(model), train)
    # NumPy: the first layer's outputs for the EMA weights; update_bn leaves the statistics of this one batch
    h = np64(x) @ w.T + b
    mean, var = h.mean(axis=0), h.var(axis=0, ddof=1)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16 forward
    sd = ema.ema_state_dict()
    np.testing.assert_allclose(np64(sd["1.running_mean"]), mean, rtol=tol, atol=tol)
    np.testing.assert_allclose(np64(sd["1.running_var"]), var, rtol=tol, atol=tol)
    assert int(sd["1.num_batches_tracked"]) == 1
    assert (
        np.abs(mean - np64(before["1.running_mean"])).max() > 0.5
    )  # what an EMA that dropped the writes holds
    for name in ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"):
        assert torch.equal(sd[name], before[name]), name  # not written: full fp32 precision kept


def test_written_elements_of_a_bf16_model_are_kept_exactly_and_the_rest_keeps_fp32_precision():
    model = tiny_mlp(seed=4, dtype=torch.bfloat16)
    ema = EMAState(model, decay=DECAY)
    drive(ema, model, 5, seed=5)
    before = ema_copy(ema)
    w = before["0.weight"]
    assert not torch.equal(w, w.bfloat16().float())  # the fp32 EMA has bits that bf16 cannot hold
    with ema.average_parameters(), torch.no_grad():
        model[0].weight[1, 2] = 0.75
        model[2].bias.mul_(2.0)
    sd = ema.ema_state_dict()
    assert sd["0.weight"][1, 2].item() == 0.75
    unchanged = torch.ones_like(w, dtype=torch.bool)
    unchanged[1, 2] = False
    assert torch.equal(sd["0.weight"][unchanged], w[unchanged])
    # the doubled bias: the model's bf16 values, exactly (a bf16 value times 2 is exact, and widens exactly)
    np.testing.assert_array_equal(np64(sd["2.bias"]), 2.0 * np64(before["2.bias"].bfloat16()))
    for name in ("0.bias", "2.weight"):
        assert torch.equal(sd[name], before[name]), name
    ema.update()  # and training goes on


# -------------------------------------------------------------------------------------------- copy_to in the block
@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("dtype", LOW)
def test_copy_to_inside_the_block_keeps_the_ema_weights(dtype, explicit):
    model = tiny_mlp(seed=6, dtype=dtype)
    ema = EMAState(model, decay=DECAY)
    history, _ = drive(ema, model, 6, seed=7)
    want = reference_ema(history, decays_for("constant", DECAY, 6))
    before = ema_copy(ema)
    with ema.average_parameters():
        ema.copy_to(model if explicit else None)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    for name, p in model.named_parameters():  # the model keeps the EMA weights ...
        assert torch.equal(p.detach(), before[name].to(dtype)), name
        np.testing.assert_allclose(np64(p), want[name], atol=tol, err_msg=name)
    assert_same_bits(
        {k: bits(v) for k, v in ema.ema_state_dict().items()}, {k: bits(v) for k, v in before.items()}
    )
    # ... and update() goes on from there (the model now holds the EMA weights, then trains on)
    history2, _ = drive(ema, model, 3, seed=8)
    want2 = reference_ema(history + history2[1:], decays_for("constant", DECAY, 9))
    for name, t in ema.ema_state_dict().items():
        np.testing.assert_allclose(np64(t), want2[name], rtol=1e-5, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("dtype", LOW)
def test_copy_to_another_model_inside_the_block(dtype):
    model = tiny_mlp(seed=9, dtype=dtype)
    ema = EMAState(model, decay=DECAY)
    history, _ = drive(ema, model, 5, seed=10)
    want = reference_ema(history, decays_for("constant", DECAY, 5))
    train = model_bits(model)
    other = tiny_mlp(seed=99)
    with ema.average_parameters(), torch.no_grad():
        model[0].bias[3] = 0.5  # a write in the block: part of the EMA from now on
        ema.copy_to(other)
        assert ema.ema_state_dict()["0.bias"][3].item() == 0.5
    assert_same_bits(model_bits(model), train)
    want["0.bias"][3] = 0.5
    for name, p in other.named_parameters():
        np.testing.assert_allclose(np64(p), want[name], rtol=1e-5, atol=2e-5, err_msg=name)
    assert ema.ema_state_dict()["0.bias"][3].item() == 0.5


def test_swap_inside_the_block_is_not_undone_twice():
    model = tiny_mlp(seed=11)
    ema = EMAState(model, decay=DECAY)
    drive(ema, model, 3, seed=12)
    train, before = model_bits(model), ema_copy(ema)
    with ema.average_parameters():
        ema.swap()  # training weights back early
    assert_same_bits(model_bits(model), train)
    for k, v in ema.ema_state_dict().items():
        assert torch.equal(v, before[k]), k
    ema.update()


# ------------------------------------------------------------------------------------ tensors sharing storage
class SharedStorage(nn.Module):
    """Two ``Parameter`` objects on one storage (``a``, ``b``), and two on overlapping halves of another."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        t = torch.randn(5, 3, generator=gen).to(dtype)
        self.a = nn.Parameter(t)
        self.b = nn.Parameter(t)
        base = torch.randn(10, generator=gen).to(dtype)
        self.lo = nn.Parameter(base[:6])
        self.hi = nn.Parameter(base[4:])


@pytest.mark.parametrize("dtype", LOW)
def test_parameters_sharing_storage_are_restored_and_averaged(dtype, tmp_path):
    model = SharedStorage(dtype)
    assert model.a is not model.b and model.a.data_ptr() == model.b.data_ptr()
    ema = EMAState(model, decay=DECAY)
    assert ema.names == ["a", "b", "lo", "hi"]
    history, _ = drive(ema, model, 5, seed=13)
    want = reference_ema(history, decays_for("constant", DECAY, 5))
    train = model_bits(model)
    with ema.average_parameters():
        for name in ("a", "b"):
            np.testing.assert_allclose(np64(getattr(model, name)), want[name], rtol=1e-2, atol=1e-2)
        with torch.no_grad():
            model.a[0, 0] = 2.0
    assert_same_bits(model_bits(model), train)
    sd = ema.ema_state_dict()
    assert sd["a"][0, 0].item() == sd["b"][0, 0].item() == 2.0  # the write is kept under both names
    want["a"][0, 0] = want["b"][0, 0] = 2.0
    for name, t in sd.items():
        np.testing.assert_allclose(np64(t), want[name], rtol=1e-5, atol=2e-5, err_msg=name)
    assert ema.num_bytes() == (15 + 6 + 6) * 4  # a and b share one fp32 EMA tensor
    ema.save(tmp_path)
    loaded = EMAState.load(tmp_path, SharedStorage(dtype)).ema_state_dict()
    for name, t in sd.items():
        assert torch.equal(loaded[name], t), name


def test_tied_gpt2_embedding_and_lm_head():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=True
    )
    model = GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    ema = EMAState(model, decay=0.5)
    assert "lm_head.weight" not in ema.names  # one tensor, tracked once
    history, _ = drive(ema, model, 4, seed=1, scale=0.05)
    want = reference_ema(history, decays_for("constant", 0.5, 4))
    train = model_bits(model)
    ids = torch.tensor([[1, 5, 7, 2]])
    with ema.average_parameters():
        np.testing.assert_allclose(np64(model.lm_head.weight), want["transformer.wte.weight"], atol=2e-5)
        for name, p in model.named_parameters():
            np.testing.assert_allclose(np64(p), want[name], atol=2e-5, err_msg=name)
        model(ids)
        assert model.lm_head.weight is model.transformer.wte.weight
    assert_same_bits(model_bits(model), train)


# ------------------------------------------------------------------------------------------------ non-contiguous
class Strided(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.t = nn.Parameter(torch.randn(6, 4, generator=gen).to(dtype).t())  # transposed
        self.s = nn.Parameter(torch.randn(4, 10, generator=gen).to(dtype)[:, ::2])  # every other column


@pytest.mark.parametrize("dtype", LOW)
def test_non_contiguous_parameters_swap_bitwise(dtype):
    model = Strided(dtype)
    assert not model.t.is_contiguous() and not model.s.is_contiguous()
    strides = {n: p.stride() for n, p in model.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    ema = EMAState(model, decay=DECAY)
    history, _ = drive(ema, model, 5, seed=14)
    want = reference_ema(history, decays_for("constant", DECAY, 5))
    train = model_bits(model)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    with ema.average_parameters():
        for name, p in model.named_parameters():
            np.testing.assert_allclose(np64(p), want[name], atol=tol, err_msg=name)
        with torch.no_grad():
            model.s[1, 2] = 0.25
    assert_same_bits(model_bits(model), train)
    assert {n: p.stride() for n, p in model.named_parameters()} == strides
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    sd = ema.ema_state_dict()
    assert sd["s"][1, 2].item() == 0.25
    want["s"][1, 2] = 0.25
    for name, t in sd.items():
        np.testing.assert_allclose(np64(t), want[name], rtol=1e-5, atol=2e-5, err_msg=name)
