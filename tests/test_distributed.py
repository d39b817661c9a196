"""Two-process tests (gloo, CPU): DDP, FSDP2 (``fully_shard``, DTensor parameters) and DeepSpeed ZeRO-3.

The worker (tests/dist_worker.py) is launched once per mode with ``torchrun --standalone`` (a free port is chosen
by the rendezvous) under a bounded timeout; it records parameter histories and EMA tensors to files, and the
expected EMA is computed here with the independent NumPy reference (tests/reference.py).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_ema import EMAState
from tests._torchrun import assert_close, assert_same_bits, assert_shards_stack_to, load_history, run_torchrun
from tests.dist_worker import DECAY, DECAY_TYPE, K, make_model
from tests.reference import decays_for, record, reference_ema

WORKER = Path(__file__).with_name("dist_worker.py")
TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)


def _launch(mode: str, out: Path, *extra: str) -> dict[int, dict]:
    run_torchrun(WORKER, mode, str(out), *extra, timeout=TIMEOUT_S, label=f"{mode} worker")
    return {r: json.loads((out / f"{mode}_info_rank{r}.json").read_text()) for r in (0, 1)}


def _expected(history: list[dict[str, np.ndarray]], steps: int) -> dict[str, np.ndarray]:
    return reference_ema(history[: steps + 1], decays_for(DECAY_TYPE, DECAY, steps))


@pytest.fixture(scope="module")
def single_process_ckpt(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """An ``ema_net`` written by ONE process (for the 1 -> 2 ranks load) and its reference EMA."""
    d = tmp_path_factory.mktemp("one_rank")
    model = make_model(seed=5)
    ema = EMAState(model, decay=DECAY, decay_type=DECAY_TYPE)
    history = [record(model.state_dict().items())]
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)) * 0.1)
        ema.update()
        history.append(record(model.state_dict().items()))
    ema.save(d)
    return d, reference_ema(history, decays_for(DECAY_TYPE, DECAY, 3))


@pytest.fixture(scope="module")
def ddp_fsdp(tmp_path_factory, single_process_ckpt) -> tuple[Path, dict[int, dict]]:
    out = tmp_path_factory.mktemp("ddp_fsdp")
    info = _launch("ddp_fsdp", out, str(single_process_ckpt[0]))
    return out, info


# --------------------------------------------------------------------------------------------------- DDP
def test_ddp_ema_identical_on_ranks_and_equal_to_reference(ddp_fsdp):
    out, _ = ddp_fsdp
    r0 = load_file(str(out / "ddp_ema_rank0.safetensors"))
    r1 = load_file(str(out / "ddp_ema_rank1.safetensors"))
    assert_same_bits(r0, r1)
    assert_close(r0, _expected(load_history(out / "ddp_history.safetensors"), 2 * K))


def test_ddp_save_state_load_state_resume_equals_uninterrupted(ddp_fsdp):
    out, info = ddp_fsdp
    assert (out / "ddp_ckpt" / "ema_net" / "model.safetensors").is_file()
    assert info[0]["ddp_resumed_step"] == info[1]["ddp_resumed_step"] == 2 * K
    for rank in (0, 1):
        full = load_file(str(out / f"ddp_ema_rank{rank}.safetensors"))
        resumed = load_file(str(out / f"ddp_resumed_rank{rank}.safetensors"))
        for name in full:
            torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=1e-7, msg=name)


# --------------------------------------------------------------------------------------------------- FSDP2
def test_fsdp2_gathered_ema_equals_ema_of_gathered_params(ddp_fsdp):
    out, info = ddp_fsdp
    assert info[0]["param_types"] == ["DTensor"]  # really sharded
    assert info[0]["ema_state_dict_len"] == 4 and info[1]["ema_state_dict_len"] == 0  # main process only
    gathered = load_file(str(out / "fsdp_gathered_ema.safetensors"))
    assert_close(gathered, _expected(load_history(out / "fsdp_history.safetensors"), 2 * K))


def test_fsdp2_ema_is_per_shard_about_half_the_bytes(ddp_fsdp):
    out, info = ddp_fsdp
    full = info[0]["full_bytes"]
    for rank in (0, 1):
        assert info[rank]["ema_bytes"] == 4 * info[rank]["local_numel"]
        assert info[rank]["ema_bytes"] <= 0.55 * full, (rank, info[rank]["ema_bytes"], full)
    assert info[0]["ema_bytes"] + info[1]["ema_bytes"] == full
    # the local EMA of each rank is its own rows of the gathered EMA (Shard(0): rank 0 first)
    assert_shards_stack_to(load_file(str(out / "fsdp_gathered_ema.safetensors")), out, "fsdp_local_ema_rank")


def test_fsdp2_update_issues_no_collective(ddp_fsdp):
    _, info = ddp_fsdp
    for rank in (0, 1):
        assert info[rank]["update_collective_calls"] == 0
        assert info[rank]["update_seq_delta"] == 0


def test_fsdp2_average_parameters_evaluates_on_shards(ddp_fsdp):
    out, info = ddp_fsdp
    assert info[0]["weights_restored_after_eval"] is True
    ev = load_file(str(out / "fsdp_eval.safetensors"))
    plain = make_model(seed=0)
    plain.load_state_dict(load_file(str(out / "fsdp_gathered_ema.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(ev["y"], plain(ev["x"]), rtol=1e-5, atol=1e-6)


def test_fsdp2_save_state_load_state_resume_equals_uninterrupted(ddp_fsdp):
    out, info = ddp_fsdp
    assert info[0]["fsdp_resumed_loaded_step"] == info[1]["fsdp_resumed_loaded_step"] == K
    full = load_file(str(out / "fsdp_gathered_ema.safetensors"))
    resumed = load_file(str(out / "fsdp_resumed_gathered_ema.safetensors"))
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=1e-7, msg=name)


def test_cross_world_size_two_ranks_save_one_rank_loads(ddp_fsdp):
    out, _ = ddp_fsdp
    ckpt = out / "fsdp_ckpt"
    assert sorted(p.name for p in (ckpt / "ema_net").iterdir()) == ["ema_state.json", "model.safetensors"]
    ema = EMAState.load(ckpt, make_model(seed=99))
    assert ema.step == K
    assert_close(ema.state_dict()["ema"], _expected(load_history(out / "fsdp_history.safetensors"), K))


def test_cross_world_size_one_rank_saves_two_ranks_load(ddp_fsdp, single_process_ckpt):
    out, info = ddp_fsdp
    _, expected = single_process_ckpt
    assert info[0]["cross_loaded_step"] == info[1]["cross_loaded_step"] == 3
    assert_close(load_file(str(out / "cross_gathered.safetensors")), expected)
    l0 = load_file(str(out / "cross_local_rank0.safetensors"))
    l1 = load_file(str(out / "cross_local_rank1.safetensors"))
    assert l0["2.weight"].shape == (4, 32) and l1["2.weight"].shape == (3, 32)  # uneven shards
    assert_close({n: torch.cat([l0[n], l1[n]]) for n in l0}, expected)
    # each rank read only its own shard from the file, not the whole model
    total = sum(v.size for v in expected.values())
    for r in (0, 1):
        assert info[r]["cross_read_numel"] == info[r]["cross_local_numel"] < 0.6 * total, info[r]
    assert info[0]["cross_local_numel"] + info[1]["cross_local_numel"] == total


def test_fsdp1_is_refused_with_a_clear_message(ddp_fsdp):
    _, info = ddp_fsdp
    msg = info[0]["fsdp1"]
    if msg.startswith("not constructible"):
        pytest.skip(reason=f"FSDP1 cannot be built on this CPU torch: {msg}")
    assert "FSDP1" in msg and "fully_shard" in msg, msg


# --------------------------------------------------------------------------------------------------- ZeRO-3
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_zero3_partition_ema_gather_and_scatter(tmp_path):
    info = _launch("zero3", tmp_path)
    assert info[0]["is_zero3"] is True
    full = info[0]["full_bytes"]
    for rank in (0, 1):
        assert info[rank]["update_collective_calls"] == 0 and info[rank]["update_seq_delta"] == 0
        assert info[rank]["ema_bytes"] <= 0.55 * full, (rank, info[rank]["ema_bytes"], full)
        assert info[rank]["reload_equal"] is True and info[rank]["reload_step"] == 2 * K
        assert info[rank]["reload_gathered_equal"] is True
        # the reload read only the rows holding this rank's partition (here 243-244 of the 455 elements)
        assert 0 < info[rank]["reload_read_numel"] <= 0.6 * full / 4, info[rank]
    gathered = load_file(str(tmp_path / "zero3_gathered_ema.safetensors"))
    assert_close(gathered, _expected(load_history(tmp_path / "zero3_history.safetensors"), 2 * K))
    # the folder written under ZeRO-3 is the plain model's: it loads into an unsharded model
    ema = EMAState.load(tmp_path / "zero3_ckpt", make_model(seed=3))
    assert_close(
        ema.state_dict()["ema"], _expected(load_history(tmp_path / "zero3_history.safetensors"), 2 * K)
    )


# ------------------------------------------------------------------------------ reading a rank's part (1 process)
class _FakeZero3Param(torch.Tensor):
    """Carries the attributes that mark a DeepSpeed ZeRO-3 parameter (its data is irrelevant here)."""


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (4, 1), (2, 3, 4), (0, 3)])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_read_local_zero3_reads_its_flat_range_from_few_rows(monkeypatch, shape, world):
    import math

    import hf_ema.distributed as du

    numel = math.prod(shape)
    n = max(1, -(-numel // world))  # DeepSpeed's partition size: ceil(numel / world), last partition padded
    full = torch.arange(numel, dtype=torch.float32).reshape(shape) + 1.0
    flat = np.concatenate([full.reshape(-1).numpy(), np.zeros(n * world - numel, np.float32)])  # padded
    row = numel // shape[0] if shape and shape[0] else max(numel, 1)
    for rank in range(world):
        source = torch.empty(0).as_subclass(_FakeZero3Param)
        source.ds_tensor, source.ds_id, source.ds_shape = torch.empty(n), 0, shape
        monkeypatch.setattr(du, "_zero3_layout", lambda s, rank=rank: (None, world, rank, n))
        reads: list[int] = []

        def read(index, reads=reads):
            reads.append(full[index].numel())
            return full[index].clone()

        got = du.read_local(source, shape, read)
        np.testing.assert_array_equal(got.numpy(), flat[rank * n : (rank + 1) * n], err_msg=f"rank {rank}")
        assert sum(reads) <= min(n, numel) + 2 * row, (rank, reads)  # its range plus at most two partial rows
    with pytest.raises(ValueError, match="full tensor has shape"):
        du.read_local(source, (*shape, 2), read)
