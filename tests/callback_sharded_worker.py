"""2-rank worker for tests/test_callback_sharded.py: ``EMATrainerCallback`` on an FSDP2-sharded transformers model.

Run with ``torchrun --standalone --nproc_per_node 2 callback_sharded_worker.py OUT_DIR`` (gloo, CPU).

Accelerate 1.15 does not shard on the CPU (an FSDP plugin falls back to MULTI_CPU / DDP), so a Trainer cannot run
FSDP2 here. This worker builds the pieces the Trainer would hand the callback instead: a tiny
``BertForSequenceClassification`` sharded by hand with ``torch.distributed.fsdp.fully_shard`` (what Accelerate's
FSDP2 path does to ``trainer.model``), real ``TrainingArguments`` / ``TrainerState`` / ``TrainerControl``, and the
callback's events called in the Trainer's order, with ``model=`` and ``optimizer=`` in the keyword arguments as
``CallbackHandler`` passes them.

It only *records*: the full parameters gathered after each optimizer step (outside the callback), the EMA bytes
each rank holds, the model's weights around the evaluation swap, the evaluation logits, ``ema_net`` writes per
rank, and the EMA after a resume. The test computes the expected EMA with the NumPy reference.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import fully_shard
from transformers import TrainerControl, TrainerState, TrainingArguments

import hf_ema.state as ema_state_module
from hf_ema import EMATrainerCallback
from tests._torchrun import exit_worker
from tests.reference import tiny_bert

torch.set_num_threads(1)

DECAY, DECAY_TYPE = 0.9, "threshold"  # step-dependent decay: a wrong step count after resume shows
SAVE_STEP = 3  # checkpoint-3 is written after optimizer step 3
EVAL_STEP = 2  # an evaluation (with the EMA swapped in) follows optimizer step 2
MAX_STEPS = 6
SEQ = 8
_FULL = StateDictOptions(full_state_dict=True)  # every rank gets the full tensors (CPU already)


def sharded_bert(seed: int) -> torch.nn.Module:
    """tiny_bert(seed) without dropout (so a resumed run can repeat the same steps exactly), every encoder layer and
    the root sharded by FSDP2 over the 2 ranks."""
    model = tiny_bert(seed, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    return model


def batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    """A different batch per (step, rank), as a distributed sampler gives each rank its own samples."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {
        "input_ids": torch.randint(0, 40, (4, SEQ), generator=g),
        "labels": torch.randint(0, 2, (4,), generator=g),
    }


def eval_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4242)
    return {"input_ids": torch.randint(0, 40, (5, SEQ), generator=g)}


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict, gathered from the shards (a collective: every rank calls it)."""
    return {k: v.clone() for k, v in get_model_state_dict(model, options=_FULL).items()}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def train_steps(
    cb: EMATrainerCallback,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    args: TrainingArguments,
    state: TrainerState,
    control: TrainerControl,
    rank: int,
    stop: int,
    history: list[dict[str, torch.Tensor]] | None,
    on_step: Callable[[TrainerState, TrainerControl | None], None] | None = None,
) -> None:
    """Optimizer steps ``state.global_step + 1 .. stop`` with the callback's per-step events in the Trainer's order."""
    while state.global_step < stop:
        cb.on_step_begin(args, state, control, model=model, optimizer=opt)
        model.train()
        loss = model(**batch(state.global_step, rank)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        state.global_step += 1
        if history is not None:
            history.append(gathered(model))  # a collective, outside every callback event
        if on_step is not None:
            on_step(state, control)  # what DefaultFlowCallback decides before this callback's on_step_end
        cb.on_step_end(args, state, control, model=model, optimizer=opt)
        if on_step is not None:
            on_step(state, None)  # evaluation / save that _maybe_log_save_evaluate runs after on_step_end


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {}

    writes: list[str] = []
    original_save = ema_state_module.save_ema_net

    def counting_save(directory: str | os.PathLike, *a: object, **k: object) -> Path:
        writes.append(str(directory))
        return original_save(directory, *a, **k)

    ema_state_module.save_ema_net = counting_save

    run_dir = out / "run"
    args = TrainingArguments(output_dir=str(run_dir), use_cpu=True, report_to="none", max_steps=MAX_STEPS)
    state = TrainerState(
        max_steps=MAX_STEPS, is_local_process_zero=rank == 0, is_world_process_zero=rank == 0
    )
    control = TrainerControl()

    model = sharded_bert(seed=0)
    info["param_types"] = sorted({type(p).__name__ for p in model.parameters()})
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    cb = EMATrainerCallback(decay=DECAY, decay_type=DECAY_TYPE)
    cb.on_train_begin(args, state, control, model=model, optimizer=opt)
    ema = cb.ema
    assert ema is not None
    info["ema_bytes"] = ema.num_bytes()
    info["local_param_numel"] = sum(p.to_local().numel() for p in model.parameters())
    info["full_param_numel"] = sum(p.numel() for p in model.parameters())
    info["ema_names"] = ema.names
    info["total_steps"] = ema.total_steps

    history = [gathered(model)]
    at_save: dict[str, torch.Tensor] = {}

    def events(st: TrainerState, ctl: TrainerControl | None) -> None:
        """The Trainer's per-step decisions (``ctl`` given) and its evaluate / save work (``ctl`` None)."""
        if ctl is not None:  # before on_step_end: the flow callback announces an evaluation
            ctl.should_evaluate = st.global_step == EVAL_STEP
            return
        if control.should_evaluate:
            under = gathered(model)  # the model must hold the EMA now
            model.eval()
            with torch.no_grad():
                logits = model(**eval_batch()).logits
            cb.on_evaluate(args, st, control, metrics={"eval_loss": 0.0}, model=model)
            after = gathered(model)
            control.should_evaluate = False
            if rank == 0:
                save_tensors(out / "eval_under_swap.safetensors", under)
                save_tensors(out / "eval_logits.safetensors", {"x": eval_batch()["input_ids"], "y": logits})
                info["restored_bitwise"] = all(torch.equal(history[-1][k], after[k]) for k in after)
                info["swapped_in"] = any(not torch.equal(history[-1][k], under[k]) for k in under)
            info["swapped_after_evaluate"] = ema._swapped
        if st.global_step == SAVE_STEP:
            ckpt = run_dir / f"checkpoint-{st.global_step}"
            if rank == 0:  # what Trainer._save_checkpoint writes (the regular weights are not needed here)
                ckpt.mkdir(parents=True, exist_ok=True)
                st.save_to_json(str(ckpt / "trainer_state.json"))
            dist.barrier()
            cb.on_save(args, st, control, model=model)
            at_save.update(gathered(model))  # training weights at step 3, for the resumed run
            dist.barrier()  # rank 0 has finished writing ema_net before anyone reads it

    train_steps(cb, model, opt, args, state, control, rank, MAX_STEPS, history, events)
    info["writes"] = writes
    info["ema_step"] = ema.step
    final_ema = ema.ema_state_dict()  # gathered; main process only
    info["ema_state_dict_len"] = len(final_ema)
    local_ema = {k: v.clone() for k, v in ema.state_dict()["ema"].items()}
    save_tensors(out / f"local_ema_rank{rank}.safetensors", local_ema)
    cb.on_train_end(args, state, control, model=model)
    end_weights = gathered(model)
    if rank == 0:
        save_tensors(out / "final_ema.safetensors", final_ema)
        save_tensors(out / "end_weights.safetensors", end_weights)
        save_tensors(
            out / "history.safetensors", {f"{i}/{n}": t for i, h in enumerate(history) for n, t in h.items()}
        )

    # Resume: a new sharded model (other seed) given the step-3 training weights, a new callback, global_step=3.
    model_r = sharded_bert(seed=123)
    set_model_state_dict(model_r, at_save, options=_FULL)
    opt_r = torch.optim.SGD(model_r.parameters(), lr=0.5)
    args_r = TrainingArguments(output_dir=str(run_dir), use_cpu=True, report_to="none", max_steps=MAX_STEPS)
    state_r = TrainerState(
        max_steps=MAX_STEPS,
        global_step=SAVE_STEP,
        is_local_process_zero=rank == 0,
        is_world_process_zero=rank == 0,
    )
    cb_r = EMATrainerCallback(decay=DECAY, decay_type=DECAY_TYPE)
    cb_r.on_train_begin(args_r, state_r, TrainerControl(), model=model_r, optimizer=opt_r)
    assert cb_r.ema is not None
    info["resumed_step"] = cb_r.ema.step
    restored = cb_r.ema.ema_state_dict()
    train_steps(cb_r, model_r, opt_r, args_r, state_r, TrainerControl(), rank, MAX_STEPS, None)
    resumed_final = cb_r.ema.ema_state_dict()
    save_tensors(out / f"resumed_local_rank{rank}.safetensors", cb_r.ema.state_dict()["ema"])
    if rank == 0:
        save_tensors(out / "resumed_restored.safetensors", restored)
        save_tensors(out / "resumed_final.safetensors", resumed_final)
    info["resumed_final_step"] = cb_r.ema.step
    (out / f"info_rank{rank}.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    exit_worker()
