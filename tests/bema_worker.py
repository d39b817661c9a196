"""Two-process worker for tests/test_bema.py (``torchrun --standalone --nproc_per_node 2``): BEMA under FSDP2.

It trains a ``fully_shard``-ed model with gloo on the CPU and records: the gathered parameters after every step
(outside ``update()``), the gathered BEMA and uncorrected EMA, each rank's local ``theta_0``, whether an evaluation
swap restores the training weights, and a resumed run's final state. The test computes the expected BEMA from the
recorded history with its float64 reference of the authors' code.

Usage: ``bema_worker.py OUT_DIR``.
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

from hf_ema import EMAState
from tests._torchrun import exit_worker

torch.set_num_threads(1)

STEPS, STOP = 9, 5
KW = {"decay_type": "bema", "update_every": 2, "update_after": 3, "lag": 2}


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 7))  # 7 rows: 4 + 3 over two ranks


def main() -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    full_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def sharded(seed: int) -> nn.Module:
        m = make_model(seed)
        fully_shard(m[0])
        fully_shard(m[2])
        fully_shard(m)
        return m

    def gathered(m: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in get_model_state_dict(m, options=full_opts).items()}

    def train(m, ema, first, last, history):
        opt = torch.optim.SGD(m.parameters(), lr=0.2)
        for step in range(first, last + 1):
            g = torch.Generator().manual_seed(1000 * step + rank)
            x, y = torch.randn(8, 6, generator=g), torch.randn(8, 7, generator=g)
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
            opt.zero_grad()
            ema.update()
            if history is not None:
                history.append(gathered(m))

    info: dict = {}
    m = sharded(0)
    ema = EMAState(m, **KW)
    history = [gathered(m)]
    train(m, ema, 1, STEPS, history)
    bema = ema.ema_state_dict()  # gathered BEMA (a collective)
    files = ema._bias_files()  # gathered uncorrected EMA and theta_0 (a collective)
    local_theta0 = ema.state_dict()["theta0"]
    info["local_theta0_numel"] = sum(t.numel() for t in local_theta0.values())
    info["full_numel"] = sum(p.numel() for p in make_model(0).parameters())
    info["theta0_step"] = ema._bias.taken_step
    before = gathered(m)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(7))
    with ema.average_parameters():
        y_eval = m(x).detach()
        inside = gathered(m)
    after = gathered(m)
    info["restored"] = all(torch.equal(before[k], after[k]) for k in before)
    info["inside_is_bema"] = rank != 0 or all(torch.equal(inside[k], bema[k]) for k in bema)
    if rank == 0:
        save_file(
            {f"{i}/{n}": t.contiguous() for i, h in enumerate(history) for n, t in h.items()},
            str(out / "history.safetensors"),
        )
        save_file({k: v.contiguous() for k, v in bema.items()}, str(out / "bema.safetensors"))
        save_file({"y": y_eval}, str(out / "eval.safetensors"))

    # resume: STOP steps, save, fresh sharded model with the same weights, load, the remaining steps
    m_b = sharded(0)
    ema_b = EMAState(m_b, **KW)
    train(m_b, ema_b, 1, STOP, None)
    weights = {
        k: v.clone()
        for k, v in get_model_state_dict(m_b, options=StateDictOptions(full_state_dict=True)).items()
    }
    ema_b.save(out / "ckpt")
    m_c = sharded(123)
    set_model_state_dict(m_c, weights, options=StateDictOptions(full_state_dict=True))
    ema_c = EMAState.load(out / "ckpt", m_c)
    info["resumed_step"] = ema_c.step
    train(m_c, ema_c, STOP + 1, STEPS, None)
    a, b = ema.state_dict(), ema_c.state_dict()
    info["resume_bitwise"] = all(
        torch.equal(a[part][k], b[part][k]) for part in ("ema", "theta0") for k in a[part]
    )
    bema_c = ema_c.ema_state_dict()
    if rank == 0:
        info["resume_bema_bitwise"] = all(torch.equal(bema[k], bema_c[k]) for k in bema)
        info["files"] = sorted(p.name for p in (out / "ckpt" / "ema_net").iterdir())
        info["file_names_ok"] = sorted(files) == ["bema_ema.safetensors", "bema_theta0.safetensors"]
    (out / f"info_rank{rank}.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
    exit_worker()
