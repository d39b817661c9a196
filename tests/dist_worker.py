"""Multi-process worker for tests/test_distributed.py (run with ``torchrun --standalone --nproc_per_node 2``).

It trains tiny models with gloo on the CPU and *records*: parameter histories (full parameters gathered every
step, outside ``update()``), the EMA each rank holds, the gathered EMA, byte counts and collective counts. The
expected EMA is computed by the test from the recorded history with the independent NumPy reference; nothing
here compares the implementation against itself, except the resume runs (resumed vs. uninterrupted run).

Usage: ``dist_worker.py MODE OUT_DIR [IN_CKPT]`` with MODE ``ddp_fsdp`` or ``zero3``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import hf_ema.io
from hf_ema import EMAState
from tests._torchrun import exit_worker

torch.set_num_threads(1)

K = 4  # steps before the checkpoint; the uninterrupted run does 2 * K
DECAY, DECAY_TYPE = 0.9, "threshold"  # step-dependent decay: a wrong step count after resume shows


def make_model(seed: int) -> nn.Module:
    """6 -> 32 -> 7: the 7-row layer shards unevenly over 2 ranks (4 + 3 rows)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 7))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 6, generator=g), torch.randn(8, 7, generator=g)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


class ReadCounter:
    """Counts the elements read from ``ema_net`` files inside the block (every read goes through EMANetReader)."""

    def __init__(self) -> None:
        self.numel = 0

    def __enter__(self) -> ReadCounter:
        self._orig = hf_ema.io.EMANetReader.read

        def counting(reader, name, index=()):
            t = self._orig(reader, name, index)
            self.numel += t.numel()
            return t

        hf_ema.io.EMANetReader.read = counting
        return self

    def __exit__(self, *exc) -> None:
        hf_ema.io.EMANetReader.read = self._orig


class CollectiveCounter:
    """Counts collectives two ways: the default group's sequence number (sees every collective issued on it,
    functional ones included) and calls to patched ``torch.distributed`` functions."""

    NAMES = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "reduce_scatter_tensor",
        "reduce_scatter",
        "broadcast",
        "barrier",
        "all_to_all",
        "all_to_all_single",
        "reduce",
        "gather",
        "scatter",
        "send",
        "recv",
        "isend",
        "irecv",
        "all_gather_object",
        "broadcast_object_list",
    )

    def __init__(self) -> None:
        self.calls = 0
        self._orig: list[tuple[object, str, object]] = []
        self.pg = dist.distributed_c10d._get_default_group()

    def seq(self) -> int:
        return int(self.pg._get_sequence_number_for_group())

    def __enter__(self) -> CollectiveCounter:
        self.seq0 = self.seq()
        for mod in (dist, dist.distributed_c10d):
            for name in self.NAMES:
                fn = getattr(mod, name, None)
                if fn is None:
                    continue

                def wrapped(*a, _fn=fn, **k):
                    self.calls += 1
                    return _fn(*a, **k)

                self._orig.append((mod, name, fn))
                setattr(mod, name, wrapped)
        return self

    def __exit__(self, *exc: object) -> None:
        for mod, name, fn in reversed(self._orig):
            setattr(mod, name, fn)
        self.seq_delta = self.seq() - self.seq0


# ------------------------------------------------------------------------------------------------- DDP
def run_ddp(out: Path, rank: int) -> dict:
    from accelerate import Accelerator

    def train(steps: int, ckpt: Path | None, resume: Path | None, record: bool) -> tuple[EMAState, list]:
        acc = Accelerator(cpu=True)
        model = make_model(seed=0 if resume is None else 123)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        model, opt = acc.prepare(model, opt)
        ema = EMAState(model, decay=DECAY, decay_type=DECAY_TYPE, accelerator=acc)
        start = 0
        if resume is not None:
            acc.load_state(str(resume))
            start = ema.step
        history = [dict(acc.unwrap_model(model).state_dict())] if record else []
        history = [{k: v.clone() for k, v in h.items()} for h in history]
        for step in range(start, start + steps):
            x, y = batch(step, rank)
            loss = nn.functional.mse_loss(model(x), y)
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            ema.update()
            if record:
                history.append({k: v.clone() for k, v in acc.unwrap_model(model).state_dict().items()})
        if ckpt is not None:
            acc.save_state(str(ckpt))
        return ema, history

    ema, history = train(2 * K, None, None, record=True)
    save_tensors(out / f"ddp_ema_rank{rank}.safetensors", ema.state_dict()["ema"])
    if rank == 0:
        save_tensors(
            out / "ddp_history.safetensors",
            {f"{i}/{n}": t for i, h in enumerate(history) for n, t in h.items()},
        )
    # resume: K steps, save_state, fresh model (other seed) + EMA, load_state, K more steps
    train(K, out / "ddp_ckpt", None, record=False)
    resumed, _ = train(K, None, out / "ddp_ckpt", record=False)
    save_tensors(out / f"ddp_resumed_rank{rank}.safetensors", resumed.state_dict()["ema"])
    return {"ddp_resumed_step": resumed.step}


# ------------------------------------------------------------------------------------------------- FSDP2
def run_fsdp(out: Path, rank: int, in_ckpt: Path | None) -> dict:
    from accelerate import Accelerator
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    full_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    info: dict = {}

    def sharded(seed: int) -> nn.Module:
        m = make_model(seed)
        fully_shard(m[0])
        fully_shard(m[2])
        fully_shard(m)
        return m

    def gathered(m: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in get_model_state_dict(m, options=full_opts).items()}

    def train(m, ema, start, steps, history, counts):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for step in range(start, start + steps):
            x, y = batch(step, rank)
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
            opt.zero_grad()
            with CollectiveCounter() as c:
                ema.update()
            counts.append((c.calls, c.seq_delta))
            if history is not None:
                history.append(gathered(m))  # a collective, outside update()

    # uninterrupted run with history, bytes and collective counts
    acc = Accelerator(cpu=True)  # Accelerate cannot shard on CPU: the model is sharded by hand, not prepared
    m = sharded(0)
    ema = EMAState(m, decay=DECAY, decay_type=DECAY_TYPE, accelerator=acc)
    info["param_types"] = sorted({type(p).__name__ for p in m.parameters()})
    info["ema_bytes"] = ema.num_bytes()
    info["full_bytes"] = sum(p.numel() for p in m.parameters()) * 4
    info["local_numel"] = sum(p.to_local().numel() for p in m.parameters())
    history = [gathered(m)]
    counts: list = []
    train(m, ema, 0, 2 * K, history, counts)
    info["update_collective_calls"] = sum(c[0] for c in counts)
    info["update_seq_delta"] = sum(c[1] for c in counts)
    full_ema = ema.ema_state_dict()
    info["ema_state_dict_len"] = len(full_ema)
    save_tensors(out / f"fsdp_local_ema_rank{rank}.safetensors", ema.state_dict()["ema"])
    # evaluation under the EMA works on shards: forward with the EMA swapped in, training weights back after
    x, _ = batch(999, 0)
    before = gathered(m)
    with ema.average_parameters():
        y_ema = m(x).detach()
    after = gathered(m)
    if rank == 0:
        save_tensors(out / "fsdp_gathered_ema.safetensors", full_ema)
        save_tensors(
            out / "fsdp_history.safetensors",
            {f"{i}/{n}": t for i, h in enumerate(history) for n, t in h.items()},
        )
        save_tensors(out / "fsdp_eval.safetensors", {"x": x, "y": y_ema})
        info["weights_restored_after_eval"] = all(torch.equal(before[k], after[k]) for k in before)

    # resume: K steps, save_state (writes ema_net gathered), fresh model + EMA, load_state, K more steps
    acc_b = Accelerator(cpu=True)
    m_b = sharded(0)
    ema_b = EMAState(m_b, decay=DECAY, decay_type=DECAY_TYPE, accelerator=acc_b)
    train(m_b, ema_b, 0, K, None, [])
    weights = get_model_state_dict(m_b, options=StateDictOptions(full_state_dict=True))
    weights = {k: v.clone() for k, v in weights.items()}
    acc_b.save_state(str(out / "fsdp_ckpt"))
    acc_c = Accelerator(cpu=True)
    m_c = sharded(123)
    set_model_state_dict(m_c, weights, options=StateDictOptions(full_state_dict=True))
    ema_c = EMAState(m_c, decay=DECAY, decay_type=DECAY_TYPE, accelerator=acc_c)
    acc_c.load_state(str(out / "fsdp_ckpt"))
    info["fsdp_resumed_loaded_step"] = ema_c.step
    train(m_c, ema_c, ema_c.step, K, None, [])
    resumed_full = ema_c.ema_state_dict()
    if rank == 0:
        save_tensors(out / "fsdp_resumed_gathered_ema.safetensors", resumed_full)

    # FSDP1 is refused with a clear message (its flat parameters do not map to the model's names)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(make_model(0), device_id=torch.device("cpu"))
    except Exception as e:  # FSDP1 may not build on a CPU-only torch: then there is nothing to refuse
        info["fsdp1"] = f"not constructible: {e!r}"[:200]
    else:
        try:
            EMAState(wrapped)
            info["fsdp1"] = "accepted"
        except ValueError as e:
            info["fsdp1"] = str(e)

    # cross world size: a checkpoint written by ONE process loads into this 2-rank sharded model
    if in_ckpt is not None:
        m_d = sharded(7)
        ema_d = EMAState(m_d, decay=DECAY, decay_type=DECAY_TYPE)
        with ReadCounter() as reads:
            ema_d.load(in_ckpt)
        info["cross_read_numel"] = reads.numel
        info["cross_local_numel"] = sum(t.numel() for t in ema_d.state_dict()["ema"].values())
        info["cross_loaded_step"] = ema_d.step
        save_tensors(out / f"cross_local_rank{rank}.safetensors", ema_d.state_dict()["ema"])
        g = ema_d.ema_state_dict()
        if rank == 0:
            save_tensors(out / "cross_gathered.safetensors", g)
    return info


# ------------------------------------------------------------------------------------------------- ZeRO-3
def run_zero3(out: Path, rank: int) -> dict:
    import deepspeed

    info: dict = {}
    cfg = {
        "train_micro_batch_size_per_gpu": 8,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
    }
    model = make_model(0)
    engine, _opt, _, _ = deepspeed.initialize(
        model=model, config=cfg, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)
    )
    ema = EMAState(engine, decay=DECAY, decay_type=DECAY_TYPE)
    params = list(engine.module.parameters())
    info["is_zero3"] = all(hasattr(p, "ds_tensor") for p in params)
    info["ema_bytes"] = ema.num_bytes()
    info["full_bytes"] = sum(p.ds_numel for p in params) * 4

    def gathered() -> dict[str, torch.Tensor]:
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().clone().cpu() for n, p in engine.module.named_parameters()}

    history = [gathered()]
    counts = []
    for step in range(2 * K):
        x, y = batch(step, rank)
        loss = nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        with CollectiveCounter() as c:
            ema.update()
        counts.append((c.calls, c.seq_delta))
        history.append(gathered())
    info["update_collective_calls"] = sum(c[0] for c in counts)
    info["update_seq_delta"] = sum(c[1] for c in counts)
    full_ema = ema.ema_state_dict()
    ema.save(out / "zero3_ckpt")
    dist.barrier()
    # load the full ema_net back into the partitions of a fresh EMA (scatter) and compare with the live one
    ema2 = EMAState(engine, decay=DECAY, decay_type=DECAY_TYPE)
    with ReadCounter() as reads:
        ema2.load(out / "zero3_ckpt")
    info["reload_read_numel"] = reads.numel
    info["reload_local_numel"] = sum(t.numel() for t in ema2.state_dict()["ema"].values())
    a, b = ema.state_dict()["ema"], ema2.state_dict()["ema"]
    # compare the real elements of each partition; the tail of the last one is padding with no meaning
    sizes = {n: p.ds_numel for n, p in engine.module.named_parameters()}
    valid = {n: max(0, min(a[n].numel(), sizes[n] - rank * a[n].numel())) for n in a}
    info["reload_equal"] = all(torch.equal(a[k][: valid[k]], b[k][: valid[k]]) for k in a)
    info["reload_gathered_equal"] = all(torch.equal(full_ema[k], v) for k, v in ema2.ema_state_dict().items())
    info["reload_step"] = ema2.step
    if rank == 0:
        save_tensors(out / "zero3_gathered_ema.safetensors", full_ema)
        save_tensors(
            out / "zero3_history.safetensors",
            {f"{i}/{n}": t for i, h in enumerate(history) for n, t in h.items()},
        )
    return info


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    in_ckpt = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    if mode == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    out.mkdir(parents=True, exist_ok=True)
    if mode == "ddp_fsdp":
        info = run_ddp(out, rank)
        info.update(run_fsdp(out, rank, in_ckpt))
    elif mode == "zero3":
        info = run_zero3(out, rank)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    (out / f"{mode}_info_rank{rank}.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
    exit_worker()
