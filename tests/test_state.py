"""EMAState engine: update math against the NumPy reference, precision, buffers, update_every, trainable_only,
swapping, copy_to, state_dict round trip / continuation, and argument validation.

Every expected EMA value is computed by ``tests/reference.py`` (float64 NumPy over the recorded history).
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from reference import (
    decays_for,
    drive,
    float_params,
    perturb_,
    record,
    reference_ema,
    threshold_decay,
    tiny_bn_net,
    tiny_mlp,
)
from safetensors.torch import load_file

from hf_ema import EMAState

ATOL = 2e-5  # float32 EMA vs float64 reference after a few hundred steps of O(1) values


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: equality of these is bitwise equality (tells -0.0 from 0.0, NaN payloads)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


def snapshot_bits(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: bits(v) for k, v in model.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs bitwise"


def assert_matches_reference(ema_sd: dict[str, torch.Tensor], expected: dict[str, np.ndarray], atol=ATOL):
    for name, want in expected.items():
        got = ema_sd[name].detach().cpu().to(torch.float64).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=name)


# --------------------------------------------------------------------------------------------------------
# Update math (fp32)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decay_type", "decay", "extra"),
    [
        ("constant", 0.9, {}),
        ("constant", 0.995, {}),
        ("threshold", 0.99, {}),
        ("exp", 0.999, {"total_steps": 300, "beta": 15.0}),
    ],
)
def test_fp32_update_matches_reference(decay_type, decay, extra):
    model = tiny_mlp(seed=1)
    ema = EMAState(model, decay=decay, decay_type=decay_type, **extra)
    assert ema.names == [n for n, _ in model.named_parameters()]
    history, returned = drive(ema, model, 300, seed=2, scale=0.05)
    kw = {"beta": extra["beta"]} if "beta" in extra else {}
    decays = decays_for(decay_type, decay, 300, extra.get("total_steps"), **kw)
    np.testing.assert_allclose(returned, decays, rtol=1e-12)
    expected = reference_ema(history, decays)
    sd = ema.ema_state_dict()
    assert all(sd[n].dtype == torch.float32 for n in expected)
    assert_matches_reference(sd, expected)
    # Non-trivial: the EMA is neither the first nor the last weights.
    for name in expected:
        assert np.abs(expected[name] - history[-1][name]).max() > 1e-3
        assert np.abs(expected[name] - history[0][name]).max() > 1e-3
    assert ema.step == 300
    assert ema.num_updates == 300


def test_real_optimizer_training_matches_reference():
    """Adam updates parameters in place; the EMA follows the recorded history."""
    torch.manual_seed(0)
    model = tiny_mlp(seed=3)
    x = torch.randn(64, 4)
    y = torch.randn(64, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    ema = EMAState(model, decay=0.98, decay_type="threshold")
    history = [float_params(model)]
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        ema.update()
        history.append(float_params(model))
    expected = reference_ema(history, decays_for("threshold", 0.98, 60))
    sd = ema.ema_state_dict()
    assert_matches_reference(sd, expected)
    for t in sd.values():
        assert not t.requires_grad


# --------------------------------------------------------------------------------------------------------
# Precision: fp32 EMA of bf16 / fp16 parameters
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16])
def test_fp32_ema_moves_where_low_precision_ema_cannot(param_dtype):
    """decay 0.9999: each step moves the EMA by 1e-4 of the gap, below half a bf16 ulp at 1.0 (2**-8)."""
    model = torch.nn.Linear(8, 8).to(param_dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    ema32 = EMAState(model, decay=0.9999)
    ema_low = EMAState(model, decay=0.9999, dtype=param_dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.0)
    for _ in range(100):
        ema32.update()
        ema_low.update()
    expected = 2.0 - 0.9999**100  # closed form of 100 updates from 1 towards 2 (= 1.00995...)
    for name, t in ema32.ema_state_dict().items():
        assert t.dtype == torch.float32
        # 100 fp32 roundings of ~6e-8 each: 1e-5 bounds them, 1000x below the 0.0099 the EMA must move.
        np.testing.assert_allclose(t.double().numpy(), expected, rtol=0, atol=1e-5, err_msg=name)
    assert expected - 1.0 > 0.009
    if param_dtype == torch.bfloat16:
        # A bf16 EMA is stuck at exactly 1.0: it cannot move at this decay.
        for name, t in ema_low.ema_state_dict().items():
            assert t.dtype == torch.bfloat16
            assert torch.all(t == 1.0), name
    for p in model.parameters():
        assert p.dtype == param_dtype  # the live weights keep their dtype


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_fp32_ema_matches_reference(param_dtype):
    model = tiny_mlp(seed=4, dtype=param_dtype)
    ema = EMAState(model, decay=0.99)
    history, _ = drive(ema, model, 200, seed=5, scale=0.05)
    expected = reference_ema(history, decays_for("constant", 0.99, 200))
    sd = ema.ema_state_dict()
    assert all(t.dtype == torch.float32 for t in sd.values())
    # History holds the exact low-precision values; the fp32 EMA must follow them to fp32 accuracy,
    # far tighter than one bf16 ulp (~4e-3 at 1.0).
    assert_matches_reference(sd, expected, atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# Buffers
# --------------------------------------------------------------------------------------------------------


def _train_bn(model, ema, steps=25, seed=0):
    """Real training of the BatchNorm net; returns the full state-dict history (params and buffers)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    history = [record(model.state_dict().items())]
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen) * 2 + 1
        y = torch.randn(16, 2, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        ema.update()
        history.append(record(model.state_dict().items()))
    return history


FLOAT_BUFFERS = ["1.running_mean", "1.running_var"]
INT_BUFFER = "1.num_batches_tracked"


def test_buffers_average():
    model = tiny_bn_net()
    ema = EMAState(model, decay=0.9, buffers="average")
    history = _train_bn(model, ema)
    param_names = [n for n, _ in model.named_parameters()]
    expected = reference_ema(history, decays_for("constant", 0.9, 25), names=param_names + FLOAT_BUFFERS)
    sd = ema.ema_state_dict()
    assert_matches_reference(sd, expected)
    # Averaged, not copied: the buffers' EMA differs from the live buffers.
    assert np.abs(expected["1.running_mean"] - history[-1]["1.running_mean"]).max() > 1e-3
    # Integer buffer copied, never averaged, and kept an integer.
    assert sd[INT_BUFFER].dtype == torch.int64
    assert int(sd[INT_BUFFER]) == 25 == int(model.state_dict()[INT_BUFFER])


def test_buffers_copy():
    model = tiny_bn_net()
    ema = EMAState(model, decay=0.9, buffers="copy")
    history = _train_bn(model, ema)
    param_names = [n for n, _ in model.named_parameters()]
    expected = reference_ema(
        history, decays_for("constant", 0.9, 25), names=param_names + FLOAT_BUFFERS, copy_names=FLOAT_BUFFERS
    )
    sd = ema.ema_state_dict()
    assert_matches_reference(sd, expected)
    live = model.state_dict()
    for name in FLOAT_BUFFERS:
        assert torch.equal(sd[name].to(live[name].dtype), live[name]), name
    assert int(sd[INT_BUFFER]) == 25


def test_buffers_ignore():
    model = tiny_bn_net()
    ema = EMAState(model, decay=0.9, buffers="ignore")
    assert not set(FLOAT_BUFFERS) & set(ema.names), ema.names
    history = _train_bn(model, ema)
    param_names = [n for n, _ in model.named_parameters()]
    expected = reference_ema(history, decays_for("constant", 0.9, 25), names=param_names)
    assert_matches_reference(ema.ema_state_dict(), expected)
    # Swapping/copying never touches ignored buffers.
    before = {n: model.state_dict()[n].clone() for n in FLOAT_BUFFERS}
    with ema.average_parameters():
        for n in FLOAT_BUFFERS:
            assert torch.equal(model.state_dict()[n], before[n])
    ema.copy_to()
    for n in FLOAT_BUFFERS:
        assert torch.equal(model.state_dict()[n], before[n])


def test_buffers_ignore_save_then_load(tmp_path):
    """ema_net holds the ignored buffers too (a complete model), and it loads back into an EMA that ignores them."""
    model = tiny_bn_net()
    ema = EMAState(model, decay=0.9, buffers="ignore")
    _train_bn(model, ema)
    ema.save(tmp_path)
    saved = load_file(str(tmp_path / "ema_net" / "model.safetensors"))
    assert set(FLOAT_BUFFERS) <= set(saved)
    want = {k: v.clone() for k, v in ema.state_dict()["ema"].items()}
    fresh = tiny_bn_net()
    buffers_before = {n: fresh.state_dict()[n].clone() for n in FLOAT_BUFFERS}
    for restored in (
        EMAState(fresh, decay=0.9, buffers="ignore").load(tmp_path),
        EMAState.load(tmp_path, fresh),
    ):
        assert restored.step == 25 and restored.names == ema.names
        got = restored.state_dict()["ema"]
        assert all(torch.equal(got[k], want[k]) for k in want)
        # the saved buffer values were not pushed into the fresh model either
        assert all(torch.equal(fresh.state_dict()[n], buffers_before[n]) for n in FLOAT_BUFFERS)


def test_buffers_swap_with_average_parameters():
    model = tiny_bn_net()
    ema = EMAState(model, decay=0.8, buffers="average")
    _train_bn(model, ema, steps=5)
    before = snapshot_bits(model)
    sd = {
        k: v.clone() for k, v in ema.ema_state_dict().items()
    }  # may alias the EMA storage that gets swapped
    with ema.average_parameters():
        live = model.state_dict()
        for n in FLOAT_BUFFERS:
            assert torch.equal(live[n], sd[n].to(live[n].dtype)), n
    assert_bitwise_equal(snapshot_bits(model), before)


# --------------------------------------------------------------------------------------------------------
# update_every
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_every", [2, 3])
def test_update_every(n_every):
    model = tiny_mlp(seed=6)
    ema = EMAState(model, decay=0.95, decay_type="threshold", update_every=n_every)
    init = {k: v.clone() for k, v in ema.ema_state_dict().items()}
    gen = torch.Generator().manual_seed(7)
    history = [float_params(model)]
    calls = 11
    for k in range(1, calls + 1):  # k: the 1-based optimizer step
        perturb_(model, gen, 0.1)
        got = ema.update()
        history.append(float_params(model))
        assert math.isclose(got, threshold_decay(0.95, k), rel_tol=1e-12), (k, got)
        if k < n_every:  # no averaging yet: EMA untouched, bitwise
            assert_bitwise_equal(
                {k2: bits(v) for k2, v in ema.ema_state_dict().items()},
                {k2: bits(v) for k2, v in init.items()},
            )
    assert ema.step == calls
    assert ema.num_updates == calls // n_every
    expected = reference_ema(history, decays_for("threshold", 0.95, calls), update_every=n_every)
    assert_matches_reference(ema.ema_state_dict(), expected)
    # Sanity of the reference: with every-call averaging the result would be different.
    every_call = reference_ema(history, decays_for("threshold", 0.95, calls), update_every=1)
    assert any(np.abs(every_call[n] - expected[n]).max() > 1e-3 for n in expected)


def test_update_every_keeps_horizon():
    """Static weights after a jump: N calls with d**N on the N-th equal N calls with d each (closed form)."""
    model = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMAState(model, decay=0.9, update_every=4)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(8):
        ema.update()
    np.testing.assert_allclose(ema.ema_state_dict()["weight"].double().numpy(), 1 - 0.9**8, rtol=1e-6)


# --------------------------------------------------------------------------------------------------------
# trainable_only, device
# --------------------------------------------------------------------------------------------------------


def test_trainable_only():
    model = tiny_mlp(seed=8)
    model[0].requires_grad_(False)
    ema = EMAState(model, decay=0.9, trainable_only=True)
    assert ema.names == ["2.weight", "2.bias"]
    history, _ = drive(ema, model, 40, seed=9)
    expected = reference_ema(history, decays_for("constant", 0.9, 40), names=["2.weight", "2.bias"])
    assert_matches_reference(ema.ema_state_dict(), expected)
    frozen_before = {k: bits(v) for k, v in model[0].state_dict().items()}
    ema.copy_to()
    assert {k: bits(v) for k, v in model[0].state_dict().items()}.keys() == frozen_before.keys()
    for k, v in model[0].state_dict().items():
        assert torch.equal(bits(v), frozen_before[k])
    for name in ("weight", "bias"):
        np.testing.assert_allclose(
            getattr(model[2], name).detach().double().numpy(), expected[f"2.{name}"], atol=ATOL
        )


def test_trainable_only_false_tracks_frozen_params():
    model = tiny_mlp(seed=8)
    model[0].requires_grad_(False)
    ema = EMAState(model, decay=0.9)
    assert ema.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    drive(ema, model, 5, seed=9)
    sd = ema.ema_state_dict()
    assert torch.equal(sd["0.weight"], model[0].weight.detach())  # frozen: its EMA is itself


def test_device_cpu():
    model = tiny_mlp(seed=10)
    ema = EMAState(model, decay=0.9, device="cpu")
    history, _ = drive(ema, model, 20, seed=11)
    sd = ema.ema_state_dict()
    assert all(t.device.type == "cpu" for t in sd.values())
    assert_matches_reference(sd, reference_ema(history, decays_for("constant", 0.9, 20)))


# --------------------------------------------------------------------------------------------------------
# average_parameters / swap / copy_to
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_average_parameters_restores_bitwise(param_dtype):
    model = tiny_mlp(seed=12, dtype=param_dtype)
    with torch.no_grad():
        model[0].bias[0] = -0.0  # a value whose bits differ from +0.0
    ema = EMAState(model, decay=0.9)
    drive(ema, model, 10, seed=13)
    before = snapshot_bits(model)
    ptrs = [p.data_ptr() for p in model.parameters()]
    ema_before = {k: bits(v) for k, v in ema.ema_state_dict().items()}
    with ema.average_parameters() as m:
        assert m is model or m is getattr(ema, "model", None)
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), ema.ema_state_dict()[name].to(param_dtype)), name
    assert_bitwise_equal(snapshot_bits(model), before)
    assert [p.data_ptr() for p in model.parameters()] == ptrs  # optimizer references stay valid
    assert_bitwise_equal({k: bits(v) for k, v in ema.ema_state_dict().items()}, ema_before)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_average_parameters_restores_after_exception(param_dtype):
    model = tiny_mlp(seed=14, dtype=param_dtype)
    ema = EMAState(model, decay=0.9)
    history1, _ = drive(ema, model, 10, seed=15)
    before = snapshot_bits(model)

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom), ema.average_parameters():
        assert not torch.equal(bits(model[0].weight), before["0.weight"])
        raise Boom("evaluation failed")
    assert_bitwise_equal(snapshot_bits(model), before)
    # The EMA still works after the failed block, as if the block had never run.
    history2, _ = drive(ema, model, 3, seed=16)
    assert ema.step == 13
    expected = reference_ema(history1 + history2[1:], decays_for("constant", 0.9, 13))
    assert_matches_reference(ema.ema_state_dict(), expected)


def test_swap_twice_is_identity():
    model = tiny_mlp(seed=17)
    ema = EMAState(model, decay=0.9)
    drive(ema, model, 5, seed=18)
    before = snapshot_bits(model)
    ema_sd = {k: v.clone() for k, v in ema.ema_state_dict().items()}
    ema.swap()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), ema_sd[name])
    ema.swap()
    assert_bitwise_equal(snapshot_bits(model), before)


def test_copy_to():
    model = tiny_mlp(seed=19)
    ema = EMAState(model, decay=0.9)
    history, _ = drive(ema, model, 15, seed=20)
    expected = reference_ema(history, decays_for("constant", 0.9, 15))
    other = tiny_mlp(seed=99)
    model_before = snapshot_bits(model)
    ema.copy_to(other)
    assert_bitwise_equal(snapshot_bits(model), model_before)  # copy_to(other) leaves the tracked model alone
    for name, p in other.named_parameters():
        np.testing.assert_allclose(p.detach().double().numpy(), expected[name], atol=ATOL)
    ema.copy_to()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), ema.ema_state_dict()[name])


# --------------------------------------------------------------------------------------------------------
# state_dict / load_state_dict
# --------------------------------------------------------------------------------------------------------


def _noise(seed, model, steps):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) * 0.1 for p in model.parameters()] for _ in range(steps)]


def _apply(model, noise_step):
    with torch.no_grad():
        for p, n in zip(model.parameters(), noise_step, strict=True):
            p.add_(n.to(p.dtype))


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_bitwise(param_dtype):
    kwargs = dict(decay=0.99, decay_type="exp", beta=7.0, total_steps=30, update_every=2)
    base = tiny_mlp(seed=21, dtype=param_dtype)
    noise = _noise(22, base, 20)

    # Uninterrupted run.
    model_a = copy.deepcopy(base)
    ema_a = EMAState(model_a, **kwargs)
    dec_a = []
    for step in noise:
        _apply(model_a, step)
        dec_a.append(ema_a.update())

    # Interrupted after 9 calls (mid update_every cycle), state_dict through JSON, a new EMAState with the same
    # settings (an EMAState keeps its own settings; the state dict gives the state).
    model_b = copy.deepcopy(base)
    ema_b = EMAState(model_b, **kwargs)
    for step in noise[:9]:
        _apply(model_b, step)
        ema_b.update()
    sd = ema_b.state_dict()
    meta = json.loads(json.dumps(sd["meta"]))  # metadata is JSON-able
    tensors = {k: v.clone() for k, v in sd["ema"].items()}
    model_c = copy.deepcopy(model_b)
    del ema_b, model_b
    ema_c = EMAState(model_c, **kwargs)
    ema_c.load_state_dict({"ema": tensors, "meta": meta})
    assert ema_c.step == 9
    assert ema_c.decay_type == "exp"
    assert ema_c.decay == 0.99
    assert ema_c.update_every == 2
    dec_c = []
    for step in noise[9:]:
        _apply(model_c, step)
        dec_c.append(ema_c.update())

    assert dec_c == dec_a[9:]
    assert ema_c.step == ema_a.step == 20
    assert ema_c.num_updates == ema_a.num_updates == 10
    sa, sc = ema_a.ema_state_dict(), ema_c.ema_state_dict()
    assert_bitwise_equal({k: bits(v) for k, v in sc.items()}, {k: bits(v) for k, v in sa.items()})


def test_load_state_dict_mismatched_shapes_lists_names():
    sd = EMAState(tiny_mlp(), decay=0.9).state_dict()
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Linear(4, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3))
    ema = EMAState(other, decay=0.9)
    with pytest.raises((ValueError, RuntimeError, KeyError)) as info:
        ema.load_state_dict(sd)
    msg = str(info.value)
    for name in ("0.weight", "0.bias", "2.weight"):
        assert name in msg, msg


def test_load_state_dict_mismatched_names_lists_names():
    sd = EMAState(tiny_mlp(), decay=0.9).state_dict()
    torch.manual_seed(0)
    other = torch.nn.Sequential(
        torch.nn.Linear(4, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 3),
        torch.nn.Tanh(),
        torch.nn.Linear(3, 3),
    )
    ema = EMAState(other, decay=0.9)
    with pytest.raises((ValueError, RuntimeError, KeyError)) as info:
        ema.load_state_dict(sd)
    msg = str(info.value)
    assert "4.weight" in msg and "4.bias" in msg, msg


def test_load_state_dict_is_not_partially_applied_on_error():
    model = tiny_mlp()
    ema = EMAState(model, decay=0.9)
    drive(ema, model, 3)
    before = {k: bits(v) for k, v in ema.ema_state_dict().items()}
    sd = EMAState(tiny_mlp(seed=5), decay=0.9).state_dict()
    sd["ema"] = dict(sd["ema"])
    sd["ema"]["2.bias"] = torch.zeros(99)
    with pytest.raises((ValueError, RuntimeError, KeyError), match=r"2\.bias"):
        ema.load_state_dict(sd)
    assert_bitwise_equal({k: bits(v) for k, v in ema.ema_state_dict().items()}, before)
    assert ema.step == 3


def test_load_state_dict_with_invalid_meta_changes_nothing():
    model = tiny_mlp()
    ema = EMAState(model, decay=0.9)
    drive(ema, model, 3)
    before = {k: bits(v) for k, v in ema.ema_state_dict().items()}
    sd = copy.deepcopy(ema.state_dict())
    sd["meta"]["step"] = 50
    sd["meta"]["decay"] = 1.5  # invalid: must be refused before anything is applied
    with pytest.raises(ValueError, match="decay"):
        ema.load_state_dict(sd)
    assert ema.step == 3 and ema.decay == 0.9
    assert_bitwise_equal({k: bits(v) for k, v in ema.ema_state_dict().items()}, before)


@pytest.mark.parametrize("decay_type", ["constant", "threshold", "exp"])
def test_misspelled_schedule_argument_is_refused(decay_type):
    with pytest.raises(ValueError, match="betta"):
        EMAState(tiny_mlp(), decay=0.9, decay_type=decay_type, total_steps=10, betta=3)


@pytest.mark.parametrize("arg", ["trainable_only", "side_stream"])
def test_boolean_options_must_be_bool(arg):
    with pytest.raises(TypeError, match=arg):
        EMAState(tiny_mlp(), decay=0.9, **{arg: "yes"})


# --------------------------------------------------------------------------------------------------------
# Bad arguments: the exception names the argument and the value
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 1, -1, 1.5, 0.0, 1.0, float("nan")])
def test_bad_decay_value(bad):
    with pytest.raises(ValueError) as info:
        EMAState(tiny_mlp(), decay=bad)
    msg = str(info.value)
    assert "decay" in msg and (repr(bad) in msg or str(bad) in msg), msg


@pytest.mark.parametrize("bad", ["a", None, [0.9]])
def test_bad_decay_type_of_value(bad):
    with pytest.raises((TypeError, ValueError), match="decay") as info:
        EMAState(tiny_mlp(), decay=bad)
    assert repr(bad) in str(info.value) or type(bad).__name__ in str(info.value)


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_update_every_value(bad):
    with pytest.raises(ValueError, match="update_every") as info:
        EMAState(tiny_mlp(), update_every=bad)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("bad", [1.5, "2"])
def test_bad_update_every_type(bad):
    with pytest.raises((TypeError, ValueError), match="update_every"):
        EMAState(tiny_mlp(), update_every=bad)


@pytest.mark.parametrize("bad", ["averages", "all", "", None])
def test_bad_buffers_mode(bad):
    with pytest.raises((ValueError, TypeError), match="buffers") as info:
        EMAState(tiny_bn_net(), buffers=bad)
    msg = str(info.value)
    for mode in ("average", "copy", "ignore"):
        assert mode in msg, msg


@pytest.mark.parametrize("bad", [torch.int64, torch.bool, "not_a_dtype", 3])
def test_bad_dtype(bad):
    with pytest.raises((ValueError, TypeError), match="dtype"):
        EMAState(tiny_mlp(), dtype=bad)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model"):
        EMAState({"weight": torch.zeros(3)})


def test_average_parameters_with_tied_weights_restores_bitwise():
    """Tied embeddings / LM head share one tensor: swapping must not swap it twice."""
    from reference import tiny_bert_config
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config(tie_word_embeddings=True)).eval()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    ema = EMAState(model, decay=0.5)
    history, _ = drive(ema, model, 4, seed=1, scale=0.05)
    expected = reference_ema(history, decays_for("constant", 0.5, 4))
    before = snapshot_bits(model)
    with ema.average_parameters():
        for name, p in model.named_parameters():
            np.testing.assert_allclose(p.detach().double().numpy(), expected[name], atol=ATOL, err_msg=name)
        assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert_bitwise_equal(snapshot_bits(model), before)


def test_update_inside_average_parameters_is_refused():
    model = tiny_mlp()
    ema = EMAState(model, decay=0.9)
    before = snapshot_bits(model)
    with ema.average_parameters(), pytest.raises(RuntimeError):
        ema.update()
    assert_bitwise_equal(snapshot_bits(model), before)
    assert ema.step == 0


class _BigLowPrecision(torch.nn.Module):
    """More than 2**20 low-precision elements in several tensors (work is cut into chunks across tensors)."""

    def __init__(self, dtype, non_contiguous=False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.big = torch.nn.Parameter(torch.randn(1031, 1024, generator=gen).to(dtype))
        self.small = torch.nn.Parameter(torch.randn(7, generator=gen).to(dtype))
        self.mid = torch.nn.Parameter(torch.randn(300, 301, generator=gen).to(dtype))
        if non_contiguous:
            self.tr = torch.nn.Parameter(torch.randn(6, 9, generator=gen).to(dtype).t())
            assert not self.tr.is_contiguous()


@pytest.mark.parametrize("non_contiguous", [False, True])
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16])
def test_large_low_precision_params_fp32_ema_matches_reference(param_dtype, non_contiguous):
    model = _BigLowPrecision(param_dtype, non_contiguous)
    ema = EMAState(model, decay=0.7)
    history, _ = drive(ema, model, 3, seed=1, scale=0.05)
    expected = reference_ema(history, decays_for("constant", 0.7, 3))
    sd = ema.ema_state_dict()
    assert_matches_reference(sd, expected, atol=1e-5)
    for name, p in model.named_parameters():  # the live weights are untouched by the update
        np.testing.assert_array_equal(p.detach().double().numpy(), history[-1][name])


def test_numpy_scalars_are_accepted():
    """Hyper-parameters often arrive as NumPy scalars (sweeps, configs): they are numbers like any other."""
    ema = EMAState(
        tiny_mlp(),
        decay=np.float32(0.5),
        decay_type="exp",
        total_steps=np.int64(40),
        update_every=np.int64(2),
    )
    assert ema.update_every == 2 and ema.total_steps == 40
    ema.update()
    got = ema.update()
    assert math.isclose(got, float(np.float32(0.5)) * (1 - math.exp(-15.0 * 2 / 40)), rel_tol=1e-12)  # step 2


def test_device_argument_matches_the_parameters_device_by_type_and_index():
    from hf_ema.state import _same_device

    assert _same_device(torch.device("cpu"), torch.device("cpu"))
    assert not _same_device(torch.device("cuda"), torch.device("cpu"))
    assert _same_device(torch.device("cuda:1"), torch.device("cuda:1"))
    assert not _same_device(torch.device("cuda:0"), torch.device("cuda:1"))
    # device="cpu" for CPU parameters is no offload: the EMA lives beside them, no staging copy
    ema = EMAState(tiny_mlp(), decay=0.9, device="cpu")
    assert not ema._offload


def test_skip_to_continues_the_schedule_without_averaging():
    model = tiny_mlp()
    ema = EMAState(model, decay=0.999, decay_type="threshold", update_every=2)
    before = {k: v.clone() for k, v in ema.ema_state_dict().items()}
    ema.skip_to(10)
    assert (ema.step, ema.num_updates) == (10, 5)
    assert all(torch.equal(ema.ema_state_dict()[k], v) for k, v in before.items())  # nothing averaged
    assert ema.update() == threshold_decay(0.999, 11)  # the schedule goes on at step 11 (10 done + this one)
    assert (ema.step, ema.num_updates) == (11, 5)
    assert ema.update() == threshold_decay(0.999, 12)
    assert (ema.step, ema.num_updates) == (12, 6)  # step 12 is an averaging step of update_every=2
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="step"):
            ema.skip_to(bad)
