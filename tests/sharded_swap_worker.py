"""2-rank worker for tests/test_sharded_swap.py: does every EMA swap reach the weights the next forward reads?

Run with ``torchrun --standalone --nproc_per_node 2 sharded_swap_worker.py MODE OUT_DIR`` (gloo, CPU), MODE one of:

* ``fsdp2``: a tiny GPT-2 sharded as Accelerate's FSDP2 preparation does (each block its own group; embeddings,
  final norm and tied head one group with ``reshard_after_forward=False``; the root, holding the position
  embeddings, with FSDP2's root default, which keeps it unsharded after forward too);
* ``zero3``: the same model under ``deepspeed.initialize`` with ZeRO-3 and DeepSpeed's default persistence threshold
  (every tensor but the 100,500-element token embedding stays gathered between steps);
* ``trainer_zero3``: a ``transformers.Trainer`` with ZeRO-3 through Accelerate (the set-up the issue names), once
  with an evaluation every 4 steps and once without.

Each engine mode runs the same script twice, with and without forwards under the EMA in the middle of training,
and records: the full training weights after every optimizer step (gathered without touching the framework's own
state: FSDP2 ``DTensor.full_tensor`` of the sharded parameters, an ``all_gather`` of the ZeRO-3 partitions), and the
logits of forwards on a fixed input with the EMA or the training weights in. The test computes what those forwards
should give from the recorded weights, with the NumPy EMA reference and a plain single-process model.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator at import
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from safetensors.torch import save_file

torch.set_num_threads(1)

DECAY, DECAY_TYPE = 0.9, "threshold"
# token embedding 6700 x 15 = 100,500 elements: above ZeRO-3's default persistence threshold (1e5)
VOCAB = 6700
SEQ = 8
LR = 0.5
STEPS = 6  # engine modes: optimizer steps in all
FIRST = 3  # engine modes: forwards under the EMA after step FIRST and after step FIRST + 1
TRAINER_STEPS, EVAL_EVERY = 10, 4


def tiny_gpt2(seed: int):
    """A 2-layer GPT-2 with hidden size 15 and tied head, without dropout (train and eval forwards agree)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=15,  # odd sizes (ln_f: 15, c_attn.bias: 45): ZeRO-3 pads the last partition
        n_layer=2,
        n_head=3,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (4, SEQ), generator=g)


def probe() -> torch.Tensor:
    """The fixed input of every recorded forward."""
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(4242))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def zero3_full(p: torch.Tensor) -> torch.Tensor:
    """The full tensor of a ZeRO-3 parameter, from an ``all_gather`` of the partitions (DeepSpeed state untouched)."""
    part = p.ds_tensor.detach().reshape(-1)
    parts = [torch.empty_like(part) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, part)
    return torch.cat(parts)[: p.ds_numel].reshape(p.ds_shape).clone()


# ------------------------------------------------------------------------------------------------- engine modes
def fsdp2_setup(seed: int):
    """(forward module, train step, full-weights reader, EMA target) for a GPT-2 sharded as Accelerate does."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_gpt2(seed)
    for block in model.transformer.h:
        fully_shard(block)
    wte, head = model.transformer.wte, model.lm_head
    assert wte.weight is head.weight  # tied: one group for final norm, embedding and head, as Accelerate does
    fully_shard([model.transformer.ln_f, wte, head], reshard_after_forward=False)
    fully_shard(model)  # root (position embeddings): FSDP2's default keeps the root unsharded after forward
    sharded = dict(model.named_parameters())  # the DTensors, kept: while unsharded the module holds others
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step(i: int, rank: int) -> None:
        model.train()
        ids = batch(i, rank)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    def full() -> dict[str, torch.Tensor]:
        return {n: p.full_tensor().clone() for n, p in sharded.items()}

    return model, step, full, model


def zero3_setup(seed: int):
    import deepspeed

    model = tiny_gpt2(seed)
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 3},  # default stage3_param_persistence_threshold (1e5)
        "zero_allow_untested_optimizer": True,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, config=cfg, optimizer=torch.optim.SGD(model.parameters(), lr=LR)
    )
    params = dict(engine.module.named_parameters())

    def step(i: int, rank: int) -> None:
        engine.train()
        ids = batch(i, rank)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    def full() -> dict[str, torch.Tensor]:
        return {n: zero3_full(p) for n, p in params.items()}

    return engine, step, full, engine


def held_full(model: torch.nn.Module) -> list[str]:
    """Names of the parameters whose full tensor the module holds right now, which a forward reads as they are:
    FSDP2 parameters left unsharded (the module then holds a plain tensor instead of the ``DTensor``), ZeRO-3
    parameters left gathered."""
    module = getattr(model, "module", model)
    return sorted(
        n
        for n, p in module.named_parameters()
        if (hasattr(p, "ds_status") and p.ds_status.name == "AVAILABLE")
        or (not hasattr(p, "ds_status") and type(p).__name__ != "DTensor")
    )


def run_engine(mode: str, out: Path, rank: int) -> dict:
    from hf_ema import EMAState

    setup = fsdp2_setup if mode == "fsdp2" else zero3_setup
    info: dict = {}
    x = probe()
    for with_evals in (False, True):
        fwd_module, step, full, target = setup(seed=0)
        ema = EMAState(target, decay=DECAY, decay_type=DECAY_TYPE)
        logits: dict[str, torch.Tensor] = {}

        def forward(name: str, module: torch.nn.Module = fwd_module, logits: dict = logits) -> None:
            module.eval()
            with torch.no_grad():
                logits[name] = module(input_ids=x).logits.clone()

        history = [full()]
        for i in range(STEPS):
            step(i, rank)
            ema.update()
            history.append(full())
            if not with_evals:
                continue
            if i + 1 == FIRST:  # a raw forward, then EMA, raw, EMA, raw
                forward(f"raw{i + 1}a")
                info["held_full_before_swap"] = held_full(fwd_module)
                with ema.average_parameters():
                    forward(f"ema{i + 1}a")
                forward(f"raw{i + 1}b")
                with ema.average_parameters():
                    forward(f"ema{i + 1}b")
                forward(f"raw{i + 1}c")
            elif i + 1 == FIRST + 1:  # straight after a training step: EMA first, then raw
                with ema.average_parameters():
                    forward(f"ema{i + 1}a")
                forward(f"raw{i + 1}a")
        tag = "eval" if with_evals else "plain"
        if with_evals:
            if mode == "zero3":
                info["persistent"] = sorted(n for n, p in target.module.named_parameters() if p.ds_persist)
                info["not_persistent"] = sorted(
                    n for n, p in target.module.named_parameters() if not p.ds_persist
                )
            # copy_to into another model of the same layout, after a raw forward of it
            other, _, _, _ = setup(seed=7)
            forward(f"other{STEPS}a", other)
            try:  # (recorded, not raised: the checks below still run and report on their own)
                ema.copy_to(other)
                info["copy_to_other_error"] = None
                forward(f"other{STEPS}b", other)
            except RuntimeError as e:
                info["copy_to_other_error"] = repr(e)[:300]
            # copy_to after a raw forward: the model keeps the EMA for good
            forward(f"raw{STEPS}a")
            ema.copy_to()
            forward(f"copy{STEPS}a")
            forward(f"copy{STEPS}b")
            if mode == "zero3":  # what a forward reads of the gathered parameters: the EMA's full tensors
                gathered_ema = ema.ema_state_dict()  # a collective; only the main process gets the tensors
                avail = {
                    n: p.data.clone()
                    for n, p in target.module.named_parameters()
                    if p.ds_status.name == "AVAILABLE"
                }
                info["available_after_copy_to"] = sorted(avail)
                if rank == 0:
                    info["available_hold_ema"] = all(
                        torch.equal(v, gathered_ema[n]) for n, v in avail.items()
                    )
        if rank == 0:
            save_tensors(
                out / f"{mode}_{tag}_history.safetensors",
                {f"{i}/{n}": t for i, h in enumerate(history) for n, t in h.items()},
            )
            if logits:
                save_tensors(out / f"{mode}_logits.safetensors", {"x": x, **logits})
    return info


# ------------------------------------------------------------------------------------------------- Trainer + ZeRO-3
class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run_trainer(out: Path, rank: int) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_ema import EMATrainerCallback

    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        # default persistence threshold: every tensor but the token embedding stays gathered between steps
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
    }

    class Recorder(TrainerCallback):
        """Listed before the EMA callback. After each optimizer step: the full training weights (gathered from the
        partitions). At each step's start: whether every gathered parameter (what the forward reads) holds exactly
        its partitions' values. At each evaluation: the logits it computed (from ``compute_metrics``)."""

        def __init__(self, engine_params: Callable[[], dict[str, torch.Tensor]]):
            self.params = engine_params
            self.history: list[dict[str, torch.Tensor]] = []
            self.stale: list[str] = []
            self.evals: dict[int, torch.Tensor] = {}
            self.last_logits: torch.Tensor | None = None

        def compute_metrics(self, prediction) -> dict[str, float]:
            self.last_logits = torch.as_tensor(prediction.predictions)
            return {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.history.append({n: zero3_full(p) for n, p in self.params().items()})

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.history.append({n: zero3_full(p) for n, p in self.params().items()})

        def on_step_begin(self, args, state, control, **kwargs):
            for n, p in self.params().items():
                full = zero3_full(p)
                if p.ds_status.name == "AVAILABLE" and not torch.equal(p.data, full):
                    self.stale.append(f"{n} at step {state.global_step}")

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.evals[state.global_step] = self.last_logits

    info: dict = {}
    for with_evals in (False, True):
        tag = "eval" if with_evals else "plain"
        if (
            with_evals
        ):  # a second Accelerator may not bring a DeepSpeed plugin: start over from the process group
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=False)
            GradientState._reset_state()
        model = tiny_gpt2(seed=0)
        args = TrainingArguments(
            output_dir=str(out / f"trainer_{tag}"),
            deepspeed=ds_config,
            accelerator_config={"use_configured_state": True},
            per_device_train_batch_size=4,
            per_device_eval_batch_size=4,
            learning_rate=LR,
            optim="sgd",
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=0.0,
            max_steps=TRAINER_STEPS,
            eval_strategy="steps" if with_evals else "no",
            eval_steps=EVAL_EVERY,
            save_strategy="no",
            logging_steps=1,
            report_to="none",
            disable_tqdm=True,
            seed=0,
            dataloader_num_workers=0,
        )
        holder: dict = {}
        recorder = Recorder(
            lambda holder=holder: dict(holder["trainer"].model_wrapped.module.named_parameters())
        )
        ema_cb = EMATrainerCallback(decay=DECAY, decay_type=DECAY_TYPE, replace_at_end=True)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=TokenDataset(64, seed=1),
            eval_dataset=TokenDataset(8, seed=2),
            callbacks=[recorder, ema_cb],
            compute_metrics=recorder.compute_metrics,
            preprocess_logits_for_metrics=lambda logits, labels: (
                logits[0] if isinstance(logits, tuple) else logits
            ),
        )
        holder["trainer"] = trainer
        trainer.train()
        engine = trainer.model_wrapped
        info[f"{tag}_engine"] = type(engine).__name__
        info[f"{tag}_stale"] = recorder.stale
        info[f"{tag}_evals"] = sorted(recorder.evals)
        named = dict(engine.module.named_parameters())
        info[f"{tag}_persistent"] = sorted(n for n, p in named.items() if p.ds_persist)
        # after train() with replace_at_end: what a forward reads must be the EMA
        engine.eval()
        with torch.no_grad():
            end_logits = engine(input_ids=probe()).logits.clone()
        final_ema = ema_cb.ema.ema_state_dict()
        avail = {n: p.data.clone() for n, p in named.items() if p.ds_status.name == "AVAILABLE"}
        info[f"{tag}_available_at_end"] = sorted(avail)
        if rank == 0:
            info[f"{tag}_available_hold_ema"] = all(torch.equal(v, final_ema[n]) for n, v in avail.items())
            save_tensors(
                out / f"trainer_{tag}_history.safetensors",
                {f"{i}/{n}": t for i, h in enumerate(recorder.history) for n, t in h.items()},
            )
            save_tensors(out / f"trainer_{tag}_end.safetensors", {"x": probe(), "y": end_logits})
            save_tensors(out / f"trainer_{tag}_ema.safetensors", final_ema)
            if recorder.evals:  # the logits of the evaluation set, gathered from both ranks, by step
                save_tensors(
                    out / "trainer_eval_logits.safetensors", {str(k): v for k, v in recorder.evals.items()}
                )
    return info


def main(mode: str, out: Path) -> None:
    if mode == "trainer_zero3":
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        from accelerate import PartialState

        PartialState(backend="gloo")
    elif mode == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    out.mkdir(parents=True, exist_ok=True)
    info = run_trainer(out, rank) if mode == "trainer_zero3" else run_engine(mode, out, rank)
    (out / f"{mode}_info_rank{rank}.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    from tests._torchrun import exit_worker

    main(sys.argv[1], Path(sys.argv[2]))
    exit_worker()
