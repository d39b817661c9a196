"""Two-process FSDP2 worker for tests/test_posthoc.py (``torchrun --standalone --nproc_per_node 2``, gloo, CPU).

Trains a ``fully_shard``-ed tiny model for a few SGD steps with two PostHocEMA on it, one per snapshot layout
(``gathered``: the main process writes full tensors; ``per_rank``: every rank writes its shard), counts the
collectives issued inside ``update()`` on steps without a snapshot, and records the full parameters after every step
(gathered outside ``update()``) so that the test can compute the expected EMAs itself.

Usage: ``posthoc_worker.py OUT_DIR``.
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
from torch import nn

from hf_ema import PostHocEMA
from tests._torchrun import exit_worker
from tests.dist_worker import CollectiveCounter, batch, make_model, save_tensors

torch.set_num_threads(1)
STEPS, EVERY = 6, 3


def main() -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = make_model(seed=3)
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    gathered = PostHocEMA(model, out / "gathered", snapshot_every=EVERY, snapshot_dtype="float32")
    per_rank = PostHocEMA(
        model, out / "per_rank", snapshot_every=EVERY, snapshot_dtype="float32", layout="per_rank"
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    full_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    history = {}
    collectives = []
    for step in range(1, STEPS + 1):
        x, y = batch(step, rank)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        with CollectiveCounter() as c:
            gathered.update()
            per_rank.update()
        if step % EVERY:  # (a snapshot step of the gathered layout gathers, by design)
            collectives.append([c.calls, c.seq_delta])
        full = get_model_state_dict(model, options=full_opts)
        history.update({f"{step}/{k}": v.clone() for k, v in full.items()})
    gathered.close()
    per_rank.close()
    if rank == 0:
        save_tensors(out / "history.safetensors", history)
    info = {
        "collectives_in_update": collectives,
        "run_ids": [gathered.run_id, per_rank.run_id],
        "sharded": gathered._sharded,
    }
    (out / f"info_rank{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
    exit_worker()
