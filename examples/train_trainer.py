"""Train a tiny Vision Transformer on scikit-learn's handwritten digits with the Trainer and an EMA of its weights.

Everything runs offline: the data ships with scikit-learn, the model is built from a config. Plain SGD with a large
learning rate and small batches makes the training weights noisy, which is where an EMA helps. Every evaluation
reports the EMA weights (``eval_*``) and, with ``--ema_eval_both`` (on by default here), the training weights
(``eval_raw_*``). The script prints both and plots them to ``<output_dir>/ema_vs_raw.png``.

Run (about 30 s on 2 CPU cores; prints e.g. raw acc 0.90 vs EMA acc 0.94 at step 800)::

    HF_HUB_OFFLINE=1 python examples/train_trainer.py
    HF_HUB_OFFLINE=1 python examples/train_trainer.py --max_steps 300 --ema_decay 0.99 --ema_decay_type threshold

All ``EMAArguments`` flags work (``--ema_decay``, ``--ema_decay_type``, ``--ema_beta``, ``--ema_update_every``...).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from transformers import HfArgumentParser, Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hf_ema import EMAArguments, EMATrainerCallback, load_model


@dataclass
class ExampleArguments:
    output_dir: str = field(
        default="runs/digits_ema", metadata={"help": "Where checkpoints and the plot go."}
    )
    max_steps: int = field(default=800, metadata={"help": "Optimizer steps."})
    eval_steps: int = field(default=50, metadata={"help": "Evaluate every N steps."})
    learning_rate: float = field(default=0.03, metadata={"help": "SGD learning rate (large on purpose)."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    plot: bool = field(default=True, metadata={"help": "Write ema_vs_raw.png."})


def digits_datasets(seed: int) -> tuple[Dataset, Dataset]:
    digits = load_digits()
    x = ((digits.images / 16.0 - 0.3) / 0.4).astype(np.float32)[:, None]  # (N, 1, 8, 8), roughly standardised
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.25, random_state=seed)
    train = Dataset.from_dict({"pixel_values": x_tr, "labels": y_tr}).with_format("torch")
    test = Dataset.from_dict({"pixel_values": x_te, "labels": y_te}).with_format("torch")
    return train, test


def tiny_vit(hidden_size: int = 32, num_layers: int = 2) -> ViTForImageClassification:
    """A ViT for 8x8 one-channel images (16 patches of 2x2), built from a config: nothing is downloaded."""
    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.2,
    )
    return ViTForImageClassification(config)


def accuracy(pred) -> dict[str, float]:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def plot(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ema = [(h["step"], h["eval_loss"], h["eval_accuracy"]) for h in history if "eval_loss" in h]
    raw = [(h["step"], h["eval_raw_loss"], h["eval_raw_accuracy"]) for h in history if "eval_raw_loss" in h]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, col, name in ((axes[0], 1, "eval loss"), (axes[1], 2, "eval accuracy")):
        ax.plot([r[0] for r in raw], [r[col] for r in raw], "o-", label="training weights (raw)")
        ax.plot([r[0] for r in ema], [r[col] for r in ema], "s-", label="EMA weights")
        ax.set_xlabel("optimizer step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ExampleArguments, EMAArguments))
    parser.set_defaults(ema=True, ema_decay=0.995, ema_decay_type="exp", ema_beta=15.0, ema_eval_both=True)
    ex, ema_args = parser.parse_args_into_dataclasses(argv)
    torch.set_num_threads(1)  # tiny model: more threads only add overhead on a shared CPU
    torch.manual_seed(ex.seed)
    train, test = digits_datasets(ex.seed)

    args = TrainingArguments(
        output_dir=ex.output_dir,
        max_steps=ex.max_steps,
        per_device_train_batch_size=ex.batch_size,
        per_device_eval_batch_size=256,
        learning_rate=ex.learning_rate,
        optim="sgd",
        optim_args=f"momentum={ex.momentum}",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        eval_strategy="steps",
        eval_steps=ex.eval_steps,
        save_strategy="steps",
        save_steps=ex.max_steps,
        save_total_limit=1,
        logging_steps=ex.eval_steps,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=ex.seed,
        dataloader_num_workers=0,
    )
    # Equivalent: EMATrainerCallback(decay=0.995, decay_type="exp", beta=15, eval_both=True)
    callbacks = [EMATrainerCallback.from_args(ema_args)] if ema_args.ema else []
    trainer = Trainer(
        model=tiny_vit(),
        args=args,
        train_dataset=train,
        eval_dataset=test,
        compute_metrics=accuracy,
        callbacks=callbacks,
    )
    trainer.train()

    history = trainer.state.log_history
    print("\nstep   raw loss  raw acc |  EMA loss  EMA acc")
    raw_by_step = {h["step"]: h for h in history if "eval_raw_loss" in h}
    for h in history:
        if "eval_loss" in h:
            r = raw_by_step.get(h["step"], {})
            print(
                f"{h['step']:>4}   {r.get('eval_raw_loss', float('nan')):8.4f}  {r.get('eval_raw_accuracy', float('nan')):7.4f}"
                f" |  {h['eval_loss']:8.4f}  {h['eval_accuracy']:7.4f}"
            )
    result: dict[str, float] = {}
    if callbacks:
        # The model now holds the EMA (replace_at_end); the checkpoint's ema_net loads the same weights.
        final = trainer.evaluate()
        ckpt = os.path.join(ex.output_dir, f"checkpoint-{ex.max_steps}")
        reloaded = load_model(ViTForImageClassification, ckpt)
        again = Trainer(model=reloaded, args=args, eval_dataset=test, compute_metrics=accuracy).evaluate()
        last_raw = raw_by_step[max(raw_by_step)] if raw_by_step else {}
        result = {
            "raw_accuracy": last_raw.get("eval_raw_accuracy", float("nan")),
            "ema_accuracy": final["eval_accuracy"],
            "ema_accuracy_reloaded": again["eval_accuracy"],
            "raw_loss": last_raw.get("eval_raw_loss", float("nan")),
            "ema_loss": final["eval_loss"],
        }
        print(
            f"\nfinal: raw acc {result['raw_accuracy']:.4f} loss {result['raw_loss']:.4f} | "
            f"EMA acc {result['ema_accuracy']:.4f} loss {result['ema_loss']:.4f} "
            f"(reloaded from {ckpt}/ema_net: acc {result['ema_accuracy_reloaded']:.4f})"
        )
        if ex.plot and raw_by_step:
            path = os.path.join(ex.output_dir, "ema_vs_raw.png")
            plot(history, path)
            print(f"plot: {path}")
    return result


if __name__ == "__main__":
    main()
