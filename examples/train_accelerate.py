"""Train a tiny ViT on scikit-learn digits with a plain Accelerate loop, keeping an EMA of its weights.

Runs offline on the CPU, on one process or several::

    python examples/train_accelerate.py --ema --ema_decay 0.99 --ema_decay_type threshold --output_dir out
    accelerate launch --cpu --num_processes 2 examples/train_accelerate.py --ema --output_dir out
    accelerate launch --cpu --num_processes 2 examples/train_accelerate.py --ema --output_dir out2 \\
        --resume_from out/checkpoint_20

The EMA (``hf_ema.EMAState``) is updated once per optimizer step: with gradient accumulation
(``accelerator.accumulate``) only when ``accelerator.sync_gradients`` is true, and not at all when the optimizer
skipped the step (fp16 overflow). ``accelerator.save_state(dir)`` also writes ``dir/ema_net`` (safetensors +
JSON; loads with ``from_pretrained``) and ``accelerator.load_state(dir)`` restores it. Evaluation reports the
accuracy of the training weights and of the EMA weights. ``metrics.json`` in ``--output_dir`` holds the results.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import digits_datasets, tiny_vit

from hf_ema import EMAState
from hf_ema.args import EMAArguments


@dataclass
class ScriptArguments:
    output_dir: str = field(default="accelerate_out", metadata={"help": "Where checkpoints and metrics go."})
    max_steps: int = field(default=60, metadata={"help": "Optimizer steps to train for."})
    per_device_batch_size: int = field(default=32, metadata={"help": "Batch size per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate."})
    save_steps: int = field(default=0, metadata={"help": "save_state every N optimizer steps (0: only at the end)."})
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N optimizer steps (0: only at the end)."})
    resume_from: str | None = field(default=None, metadata={"help": "A checkpoint folder written by this script."})
    seed: int = field(default=0, metadata={"help": "Seed for the model, shuffling and dropout."})

    def __post_init__(self) -> None:
        for name in ("max_steps", "per_device_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.save_steps < 0 or self.eval_steps < 0:
            raise ValueError(f"--save_steps/--eval_steps must be >= 0, got {self.save_steps}/{self.eval_steps}")
        if self.resume_from is not None and not Path(self.resume_from, "train_state.json").is_file():
            raise ValueError(
                f"--resume_from {self.resume_from!r} is not a checkpoint of this script (no train_state.json)"
            )


def ema_kwargs(args: EMAArguments) -> dict:
    kw = args.callback_kwargs()
    keys = ("decay", "decay_type", "beta", "total_steps", "update_every", "dtype", "buffers", "trainable_only")
    return {k: kw[k] for k in keys} | {"device": kw.get("device")}


@torch.no_grad()
def accuracy(accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for batch in loader:
        logits = model(pixel_values=batch["pixel_values"]).logits
        preds, labels = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
        correct += int((preds == labels).sum())
        total += int(labels.numel())
    model.train()
    return correct / max(total, 1)


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ScriptArguments, EMAArguments))
    args, ema_args = parser.parse_args_into_dataclasses(args=argv)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    train_ds, eval_ds = digits_datasets()
    model = tiny_vit(seed=args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    train_dl = DataLoader(train_ds, batch_size=args.per_device_batch_size, shuffle=True, drop_last=True)
    eval_dl = DataLoader(eval_ds, batch_size=128)
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)

    ema = None
    if ema_args.ema:
        kwargs = ema_kwargs(ema_args)
        kwargs["total_steps"] = kwargs["total_steps"] or args.max_steps
        # after prepare(): unwraps DDP, registers with save_state/load_state, skips steps the optimizer skipped
        ema = EMAState(model, accelerator=accelerator, **kwargs)

    step, epoch, batches_done = 0, 0, 0
    if args.resume_from is not None:
        accelerator.load_state(args.resume_from)  # also restores the EMA from <resume_from>/ema_net
        state = json.loads(Path(args.resume_from, "train_state.json").read_text())
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
        if ema is not None and ema.step != step:
            raise RuntimeError(f"EMA step {ema.step} != optimizer step {step} after resuming")

    out = Path(args.output_dir)
    history: list[dict] = []

    def save(tag: str) -> None:
        ckpt = out / tag
        accelerator.save_state(str(ckpt))
        if accelerator.is_main_process:
            state = {"step": step, "epoch": epoch, "batches_done": batches_done}
            (ckpt / "train_state.json").write_text(json.dumps(state))
        accelerator.wait_for_everyone()

    def evaluate() -> dict:
        row = {"step": step, "accuracy": accuracy(accelerator, model, eval_dl)}
        if ema is not None:
            with ema.average_parameters():
                row["ema_accuracy"] = accuracy(accelerator, model, eval_dl)
        accelerator.print(json.dumps(row))
        history.append(row)
        return row

    model.train()
    while step < args.max_steps:
        train_dl.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_dl, batches_done) if batches_done else train_dl
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            batches_done += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            if ema is not None:
                ema.update()  # once per optimizer step; a step the optimizer skipped is not counted
            if args.eval_steps and step % args.eval_steps == 0:
                evaluate()
            if args.save_steps and step % args.save_steps == 0 and step < args.max_steps:
                save(f"checkpoint_{step}")
            if step >= args.max_steps:
                break
        else:
            epoch, batches_done = epoch + 1, 0

    final = evaluate() if not history or history[-1]["step"] != step else history[-1]
    save(f"checkpoint_{step}")
    metrics = {"final": final, "history": history, "ema_step": ema.step if ema is not None else None}
    if accelerator.is_main_process:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
