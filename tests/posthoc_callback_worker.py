"""2-rank worker for tests/test_posthoc_callback.py: ``PostHocEMACallback`` on an FSDP2-sharded model (gloo, CPU).

Run with ``torchrun --standalone --nproc_per_node 2 posthoc_callback_worker.py OUT_DIR``.

As in tests/callback_sharded_worker.py (Accelerate does not shard on the CPU, so a Trainer cannot run FSDP2 here),
the model is sharded by hand with ``fully_shard`` and the callback's events are called in the Trainer's order with
real ``TrainingArguments`` / ``TrainerState`` / ``TrainerControl``. The worker

1. trains ``MAX_STEPS`` SGD steps with the callback (a snapshot every ``EVERY`` steps, fp32 files), writing
   ``checkpoint-SAVE_STEP`` on the way, and records the full parameters after every step (gathered outside the
   callback) and the collectives issued inside ``on_step_end`` on steps without a snapshot;
2. keeps a byte copy of the finished run folder (``uninterrupted/``);
3. resumes from ``checkpoint-SAVE_STEP`` with a new model (other seed, loaded with that step's weights) and a new
   callback into the same run folder, and trains to ``MAX_STEPS`` again.

The test compares the resumed run folder with the copy, and synthesises from it vs from a one-process replay.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import fully_shard
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_ema import PostHocEMACallback
from tests._torchrun import exit_worker
from tests.dist_worker import CollectiveCounter, batch, make_model, save_tensors

torch.set_num_threads(1)

MAX_STEPS, EVERY, SAVE_STEP = 6, 2, 3
CALLBACK_KWARGS = {"snapshot_every": EVERY, "snapshot_dtype": "float32"}
_FULL = StateDictOptions(full_state_dict=True)


def sharded_model(seed: int) -> nn.Module:
    model = make_model(seed)  # 6 -> 32 -> 7: the 7-row layer shards unevenly (4 + 3 rows)
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    return model


def gathered(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in get_model_state_dict(model, options=_FULL).items()}


def train(cb, model, opt, args, state, control, rank, history=None, collectives=None, on_save=None) -> None:
    """Optimizer steps ``state.global_step + 1 .. MAX_STEPS`` with the callback's events in the Trainer's order."""
    while state.global_step < MAX_STEPS:
        cb.on_step_begin(args, state, control, model=model, optimizer=opt)
        x, y = batch(state.global_step, rank)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        state.global_step += 1
        if history is not None:
            history.update({f"{state.global_step}/{k}": v for k, v in gathered(model).items()})
        with CollectiveCounter() as c:
            cb.on_step_end(args, state, control, model=model, optimizer=opt)
        if collectives is not None and state.global_step % EVERY and state.global_step != MAX_STEPS:
            collectives.append([c.calls, c.seq_delta])
        if on_save is not None and state.global_step == SAVE_STEP:
            on_save(state)
    cb.on_train_end(args, state, control, model=model, optimizer=opt)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    info: dict = {}
    output_dir = out / "trainer"
    run_dir = out / "run"
    args = TrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to="none", max_steps=MAX_STEPS)

    def new_state(step: int) -> TrainerState:
        return TrainerState(
            max_steps=MAX_STEPS,
            global_step=step,
            is_local_process_zero=rank == 0,
            is_world_process_zero=rank == 0,
        )

    # 1. uninterrupted run, checkpoint at SAVE_STEP
    model = sharded_model(seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cb = PostHocEMACallback(run_dir=run_dir, run_id="fsdp2", **CALLBACK_KWARGS)
    state, control = new_state(0), TrainerControl()
    cb.on_train_begin(args, state, control, model=model, optimizer=opt)
    info["sharded"] = all(p.is_sharded for p in cb.posthoc.profiles)
    info["profile_bytes"] = [p.num_bytes() for p in cb.posthoc.profiles]
    info["local_numel"] = sum(p.to_local().numel() for p in model.parameters())
    at_save: dict[str, torch.Tensor] = {}

    def save(st: TrainerState) -> None:
        ckpt = output_dir / f"checkpoint-{st.global_step}"
        if rank == 0:  # what Trainer._save_checkpoint writes first (the regular weights are not needed here)
            ckpt.mkdir(parents=True, exist_ok=True)
            st.save_to_json(str(ckpt / "trainer_state.json"))
        dist.barrier()
        cb.on_save(args, st, control, model=model)
        at_save.update(gathered(model))
        dist.barrier()

    history: dict[str, torch.Tensor] = {}
    collectives: list[list[int]] = []
    train(cb, model, opt, args, state, control, rank, history, collectives, save)
    info["collectives_in_update"] = collectives
    info["run_id"] = cb.posthoc.run_id
    dist.barrier()
    if rank == 0:
        save_tensors(out / "history.safetensors", history)
        shutil.copytree(run_dir, out / "uninterrupted")
    dist.barrier()

    # 3. resume from checkpoint-SAVE_STEP: new model (other seed) given that step's weights, new callback
    model_r = sharded_model(seed=99)
    set_model_state_dict(model_r, at_save, options=_FULL)
    opt_r = torch.optim.SGD(model_r.parameters(), lr=0.1)
    cb_r = PostHocEMACallback(run_dir=run_dir, **CALLBACK_KWARGS)  # run id: restored from the checkpoint
    state_r = new_state(SAVE_STEP)
    cb_r.on_train_begin(args, state_r, TrainerControl(), model=model_r, optimizer=opt_r)
    info["resumed_step"] = cb_r.posthoc.step
    info["resumed_run_id"] = cb_r.posthoc.run_id
    if rank == 0:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        info["steps_after_load"] = sorted({e["step"] for e in manifest["snapshots"]})
    train(cb_r, model_r, opt_r, args, state_r, TrainerControl(), rank)
    (out / f"info_rank{rank}.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    exit_worker()
