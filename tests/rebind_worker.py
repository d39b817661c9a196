"""Two-process worker for tests/test_rebind.py (``torchrun --standalone --nproc_per_node 2``, gloo, CPU).

The EMA is built on the plain model, *then* the model is sharded (``fully_shard`` or DeepSpeed ZeRO-3), the order
many Accelerate scripts use. The worker trains a few steps and records the full parameters after each step (gathered
outside ``update()``), each rank's EMA, the gathered EMA and the saved ``ema_net``; the test compares them with the
NumPy reference over that history.

Usage: ``rebind_worker.py MODE OUT_DIR`` with MODE ``fsdp`` or ``zero3``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from hf_ema import EMAState
from tests._torchrun import exit_worker
from tests.dist_worker import DECAY, DECAY_TYPE, K, batch, make_model

torch.set_num_threads(1)


class Messages(logging.Handler):
    """Collects the records that ``hf_ema.state`` logs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        logger = logging.getLogger("hf_ema.state")
        logger.setLevel(logging.INFO)
        logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def run_fsdp(out: Path, rank: int) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    log = Messages()
    m = make_model(0)
    ema = EMAState(m, decay=DECAY, decay_type=DECAY_TYPE)  # built on the plain model ...
    history = [{k: v.detach().clone() for k, v in m.state_dict().items()}]
    fully_shard(m[0])  # ... which is sharded afterwards
    fully_shard(m[2])
    fully_shard(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for step in range(K):
        x, y = batch(step, rank)
        nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        history.append({k: v.clone() for k, v in get_model_state_dict(m, options=opts).items()})
    info = {
        "log": log.lines,
        "ema_bytes": ema.num_bytes(),
        "full_bytes": sum(t.numel() for t in history[0].values()) * 4,
        "is_sharded": ema.is_sharded,
    }
    save_tensors(out / f"fsdp_local_rank{rank}.safetensors", ema.state_dict()["ema"])
    # while a module is unsharded, FSDP2 registers plain full-size parameters on it: not a re-bind
    m[0].unshard()
    info["unsharded_type"] = type(m[0].weight).__name__
    info["local_shapes_while_unsharded"] = {k: list(v.shape) for k, v in ema.state_dict()["ema"].items()}
    m[0].reshard()
    gathered = ema.ema_state_dict()
    ema.save(out / "fsdp_ckpt")
    # evaluation on the shards, training weights back after
    before = get_model_state_dict(m, options=opts)
    with ema.average_parameters():
        m(batch(999, 0)[0])
    after = get_model_state_dict(m, options=opts)
    info["restored"] = all(torch.equal(before[k], after[k]) for k in before)
    if rank == 0:
        save_tensors(out / "fsdp_gathered.safetensors", gathered)
        save_tensors(
            out / "fsdp_history.safetensors",
            {f"{i}/{n}": t for i, h in enumerate(history) for n, t in h.items()},
        )
    return info


def run_zero3(out: Path, rank: int) -> dict:
    import deepspeed

    cfg = {
        "train_micro_batch_size_per_gpu": 8,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
    }
    log = Messages()
    model = make_model(0)
    # built before deepspeed.initialize partitions the parameters
    ema = EMAState(model, decay=DECAY, decay_type=DECAY_TYPE)
    history = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    engine, _, _, _ = deepspeed.initialize(
        model=model, config=cfg, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)
    )
    params = list(engine.module.parameters())
    info = {"is_zero3": all(hasattr(p, "ds_tensor") for p in params)}
    for step in range(K):
        x, y = batch(step, rank)
        engine.backward(nn.functional.mse_loss(engine(x), y))
        engine.step()
        ema.update()
        with deepspeed.zero.GatheredParameters(params):
            history.append({n: p.detach().clone().cpu() for n, p in engine.module.named_parameters()})
    info["log"] = log.lines
    info["ema_bytes"] = ema.num_bytes()
    info["full_bytes"] = sum(p.ds_numel for p in params) * 4
    gathered = ema.ema_state_dict()
    ema.save(out / "zero3_ckpt")
    if rank == 0:
        save_tensors(out / "zero3_gathered.safetensors", gathered)
        save_tensors(
            out / "zero3_history.safetensors",
            {f"{i}/{n}": t for i, h in enumerate(history) for n, t in h.items()},
        )
    return info


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    out.mkdir(parents=True, exist_ok=True)
    info = run_zero3(out, rank) if mode == "zero3" else run_fsdp(out, rank)
    (out / f"{mode}_info_rank{rank}.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
    exit_worker()
