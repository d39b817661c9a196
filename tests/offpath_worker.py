"""Two-process worker for tests/test_offpath.py: an ``EMAState`` built BEFORE ``accelerator.prepare`` (the order
many Accelerate scripts use), gradient accumulation, ``save_state`` / ``load_state`` mid-run.

Usage: ``torchrun --nproc_per_node 2 tests/offpath_worker.py OUT [main_only_save]``. Writes, per rank ``r``:

* ``hist{r}.safetensors``: the full parameters at the EMA's creation point (after prepare), after each optimizer
  step of the first leg, then after each step of the resumed leg (``{i}/{name}``);
* ``ema{r}.safetensors``: the resumed EMA at the end; ``meta{r}.json``: its step and number of averagings;
* ``unseeded{r}.safetensors``: the EMA (``ema/...``) after one step of a model initialised differently on each rank
  (as a script that seeds nothing does), EMA built before prepare, and the parameters after that step
  (``param/...``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_ema import EMAState
from tests._torchrun import exit_worker

DECAY, UPDATE_EVERY, ACCUM = 0.7, 2, 2
FIRST, SECOND = 3, 3  # optimizer steps before save_state, and after load_state


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def loader(rank: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(100 + rank)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 2, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4)


def params(acc: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in acc.unwrap_model(model).named_parameters()}


def leg(seed: int, steps: int, resume: str | None, history: list) -> EMAState:
    acc = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    model = make_model(seed)
    # Built before prepare: the order of many user scripts.
    ema = EMAState(model, decay=DECAY, decay_type="threshold", update_every=UPDATE_EVERY, accelerator=acc)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    model, opt, data = acc.prepare(model, opt, loader(acc.process_index))
    if resume is not None:
        acc.load_state(resume)
    else:
        history.append(params(acc, model))
    done = 0
    for x, y in data:
        with acc.accumulate(model):
            acc.backward(nn.functional.mse_loss(model(x), y))
            opt.step()
            opt.zero_grad()
        if acc.sync_gradients:
            ema.update()
            done += 1
            history.append(params(acc, model))
            if done == steps:
                break
    if resume is None:
        acc.save_state(str(OUT / "ckpt"))
    return ema


def per_rank_init(rank: int) -> dict[str, torch.Tensor]:
    """One optimizer step of a model initialised differently on each rank, EMA built before prepare."""
    acc = Accelerator(cpu=True)
    model = make_model(seed=10 + rank)
    ema = EMAState(model, decay=0.5, accelerator=acc, name="unseeded")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(rank))
    acc.backward(model(x).pow(2).mean())
    opt.step()
    ema.update()
    out = {f"ema/{k}": v.clone() for k, v in ema.state_dict()["ema"].items()}
    out.update({f"param/{k}": v for k, v in params(acc, model).items()})
    return out


def main_only_save(out: Path) -> None:
    """``accelerator.save_state`` called on the main process only, as diffusers' training scripts do under DDP
    (Accelerate itself needs no other rank there); the other rank trains on. Writes ``done{r}.json`` when the run
    got through, and the main process's EMA at the save as ``saved_ema.safetensors``."""
    acc = Accelerator(cpu=True)
    model = make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    ema = EMAState(model, decay=0.5, accelerator=acc, name="mainonly")
    for step in range(1, 5):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(10 * step + acc.process_index))
        acc.backward(model(x).pow(2).mean())
        opt.step()
        opt.zero_grad()
        ema.update()
        if step == 2 and acc.is_main_process:
            acc.save_state(str(out / "main_only"))
            tensors = {k: v.clone().contiguous() for k, v in ema.state_dict()["ema"].items()}
            save_file(tensors, str(out / "saved_ema.safetensors"))
    (out / f"done{acc.process_index}.json").write_text(json.dumps({"step": ema.step}))


if __name__ == "__main__":
    OUT = Path(sys.argv[1])
    if sys.argv[2:] == ["main_only_save"]:
        main_only_save(OUT)
        exit_worker()
    history: list[dict[str, torch.Tensor]] = []
    leg(seed=0, steps=FIRST, resume=None, history=history)
    ema = leg(seed=123, steps=SECOND, resume=str(OUT / "ckpt"), history=history)
    rank = torch.distributed.get_rank()
    flat = {f"{i}/{k}": v.contiguous() for i, h in enumerate(history) for k, v in h.items()}
    save_file(flat, str(OUT / f"hist{rank}.safetensors"))
    save_file(
        {k: v.contiguous() for k, v in ema.state_dict()["ema"].items()}, str(OUT / f"ema{rank}.safetensors")
    )
    (OUT / f"meta{rank}.json").write_text(json.dumps({"step": ema.step, "num_updates": ema.num_updates}))
    save_file(per_rank_init(rank), str(OUT / f"unseeded{rank}.safetensors"))
    exit_worker()
