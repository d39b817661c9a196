"""Train a tiny ViT on scikit-learn digits with a plain Accelerate loop, keeping an EMA of its weights.

The defaults are those of ``examples/train_trainer.py``, so the two examples can be compared: the same data
(standardised digits, 75/25 split) and model (``tiny_vit()``), plain SGD (lr 0.03, momentum 0.9, constant, no
clipping), batch size 16 per process, 800 optimizer steps, evaluation every 50 steps, and the EMA with
``decay=0.995, decay_type="exp", beta=15``. Runs offline on the CPU, on one process or several::

    python examples/train_accelerate.py --output_dir out                      # one process (--ema is on by default)
    python examples/train_accelerate.py --output_dir out0 --no_ema            # the same run without the EMA
    accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py --output_dir out2 --save_steps 400
    accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py --output_dir out3 \\
        --resume_from out2/checkpoint_400
    torchrun --standalone --nproc_per_node 2 examples/train_accelerate.py --output_dir out4   # same as the 2nd

Several processes on a machine without CUDA: use the multi-process launcher as above (``--multi_gpu`` only picks
torchrun; the script then asks Accelerate for a gloo CPU group). ``accelerate launch --cpu --num_processes 2`` runs
ONE process with Accelerate 1.15 (its CPU launcher ignores ``--num_processes`` without an MPI hostfile).
``metrics.json`` records ``num_processes``.

Measured on 2 shared CPU cores, defaults, seed 0: one process 0.853 raw / 0.898 EMA accuracy (eval loss 0.464 /
0.333) in ~27 s; two processes (global batch 32) 0.947 raw / 0.958 EMA (0.168 / 0.125) in ~33 s. The Trainer example
gives 0.904 / 0.938 in the same one-process setting; plain SGD at this learning rate is noisy on purpose, and other
seeds move the raw accuracy by several points either way (which is the point of the EMA).

The EMA (``hf_ema.EMAState``) is updated once per optimizer step: with gradient accumulation
(``accelerator.accumulate``) only when ``accelerator.sync_gradients`` is true, and not at all when the optimizer
skipped the step (fp16 overflow). ``accelerator.save_state(dir)`` also writes ``dir/ema_net`` (safetensors +
JSON; loads with ``from_pretrained``) and ``accelerator.load_state(dir)`` restores it. Each evaluation reports the
loss and accuracy of the training weights and of the EMA weights; the script ends with a raw vs EMA table.
``metrics.json`` in ``--output_dir`` holds the results.
"""

from __future__ import annotations

import json
import os
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

# The Trainer example's data and model, so that both examples train the same thing.
from train_trainer import digits_datasets, tiny_vit

from hf_ema import EMAState
from hf_ema.args import EMAArguments


@dataclass
class ScriptArguments:
    output_dir: str = field(default="accelerate_out", metadata={"help": "Where checkpoints and metrics go."})
    max_steps: int = field(default=800, metadata={"help": "Optimizer steps to train for."})
    per_device_batch_size: int = field(default=16, metadata={"help": "Batch size per process."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step."}
    )
    learning_rate: float = field(default=0.03, metadata={"help": "SGD learning rate (large on purpose)."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    save_steps: int = field(
        default=0, metadata={"help": "save_state every N optimizer steps (0: only at the end)."}
    )
    eval_steps: int = field(
        default=50, metadata={"help": "Evaluate every N optimizer steps (0: only at the end)."}
    )
    resume_from: str | None = field(
        default=None, metadata={"help": "A checkpoint folder written by this script."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for the model, shuffling and dropout."})

    def __post_init__(self) -> None:
        for name in ("max_steps", "per_device_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.save_steps < 0 or self.eval_steps < 0:
            raise ValueError(
                f"--save_steps/--eval_steps must be >= 0, got {self.save_steps}/{self.eval_steps}"
            )
        if self.resume_from is not None and not Path(self.resume_from, "train_state.json").is_file():
            raise ValueError(
                f"--resume_from {self.resume_from!r} is not a checkpoint of this script (no train_state.json)"
            )


def ema_kwargs(args: EMAArguments) -> dict:
    kw = args.callback_kwargs()
    keys = (
        "decay",
        "decay_type",
        "beta",
        "total_steps",
        "update_every",
        "dtype",
        "buffers",
        "trainable_only",
    )
    return {k: kw[k] for k in keys} | {"device": kw.get("device")}


@torch.no_grad()
def evaluate_model(
    accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the whole eval set (every process sees the same numbers).

    Returns:
        ``(loss, accuracy)``.
    """
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for batch in loader:
        logits = model(pixel_values=batch["pixel_values"]).logits
        logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
        loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        total += int(labels.numel())
    model.train()
    return loss_sum / max(total, 1), correct / max(total, 1)


def print_table(history: list[dict], final: dict) -> None:
    """Raw (training weights) vs EMA loss and accuracy at every evaluation, then the final line."""
    nan = float("nan")
    print("\nstep   raw loss  raw acc |  EMA loss  EMA acc")
    for h in history:
        print(
            f"{h['step']:>4}   {h['loss']:8.4f}  {h['accuracy']:7.4f} |  "
            f"{h.get('ema_loss', nan):8.4f}  {h.get('ema_accuracy', nan):7.4f}"
        )
    print(
        f"\nfinal (step {final['step']}): raw acc {final['accuracy']:.4f} loss {final['loss']:.4f} | "
        f"EMA acc {final.get('ema_accuracy', nan):.4f} loss {final.get('ema_loss', nan):.4f}"
    )


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, EMAArguments]:
    """The script's and the EMA's flags; the EMA is on by default here, ``--no_ema`` (``--no-ema``) turns it off."""
    # allow_abbrev=False: a misspelt or shortened flag is an error, never silently another flag's prefix.
    parser = HfArgumentParser((ScriptArguments, EMAArguments), allow_abbrev=False)
    # the Trainer example's EMA settings (EMATrainerCallback(decay=0.995, decay_type="exp", beta=15))
    parser.set_defaults(ema=True, ema_decay=0.995, ema_decay_type="exp", ema_beta=15.0)
    args, ema_args = parser.parse_args_into_dataclasses(args=argv)
    return args, ema_args


def main(argv: list[str] | None = None) -> dict:
    args, ema_args = parse_args(argv)
    torch.set_num_threads(1)  # tiny model: more threads only add overhead on a shared CPU
    # Several processes without CUDA: Accelerate forms a gloo (MULTI_CPU) group only when told to use the CPU;
    # otherwise every process would silently train alone.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        cpu=world_size > 1 and not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"launched {world_size} processes but Accelerate formed a group of {accelerator.num_processes}"
        )
    set_seed(args.seed)
    train_ds, eval_ds = digits_datasets(args.seed)
    model = tiny_vit()
    # as the Trainer example: plain SGD with momentum, constant learning rate, no gradient clipping, no decay
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=args.momentum)
    train_dl = DataLoader(train_ds, batch_size=args.per_device_batch_size, shuffle=True)
    eval_dl = DataLoader(eval_ds, batch_size=256)
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
        row: dict = {"step": step}
        row["loss"], row["accuracy"] = evaluate_model(accelerator, model, eval_dl)
        if ema is not None:
            with ema.average_parameters():
                row["ema_loss"], row["ema_accuracy"] = evaluate_model(accelerator, model, eval_dl)
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
    metrics = {
        "final": final,
        "history": history,
        "ema_step": ema.step if ema is not None else None,
        "num_processes": accelerator.num_processes,
    }
    if accelerator.is_main_process:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        print_table(history, final)
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
