"""Post-hoc EMA on scikit-learn's digits: train once, then choose the EMA length (sigma_rel) after training.

The same tiny ViT and noisy SGD as ``examples/train_trainer.py`` (its helpers are imported, not copied). During
training ``PostHocEMACallback`` keeps two power-function EMA profiles (sigma_rel 0.05 and 0.10, EDM2's choice) and
writes a bfloat16 snapshot of each every 5% of training to ``<output_dir>/posthoc``. Afterwards
``hf_ema.synthesize`` rebuilds the EMA of each sigma_rel in ``--sweep`` from those snapshots (no retraining), each
is evaluated, and the script prints a table and plots eval loss / accuracy against sigma_rel to
``<output_dir>/posthoc_sweep.png``. Here the eval split both picks and reports the best sigma_rel, to keep the
example short; in real use pick it on a validation split.

Run (about 40 s on 2 CPU cores)::

    HF_HUB_OFFLINE=1 python examples/train_posthoc.py
    HF_HUB_OFFLINE=1 python examples/train_posthoc.py --max_steps 400 --ema_sigma_rels 0.03 0.15 --ema_snapshot_every 20

All ``EMAArguments`` flags work (``--ema_sigma_rels``, ``--ema_snapshot_every``, ``--ema_snapshot_dtype``; ``--ema``
adds an ``EMATrainerCallback`` alongside).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_trainer import accuracy, digits_datasets, tiny_vit  # the sibling example

from hf_ema import EMAArguments, synthesize  # (train_trainer put the repo root on sys.path)
from hf_ema.posthoc import read_manifest

# Fit residual above which a synthesised EMA only approximates the profile asked for (too narrow for the snapshot
# spacing, or wider than the tracked profiles reach).
POOR_FIT = 0.05


@dataclass
class PostHocExampleArguments:
    output_dir: str = field(
        default="runs/digits_posthoc", metadata={"help": "Where the snapshots and the plot go."}
    )
    max_steps: int = field(default=800, metadata={"help": "Optimizer steps."})
    learning_rate: float = field(default=0.03, metadata={"help": "SGD learning rate (large on purpose)."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    sweep: list[float] = field(
        default_factory=lambda: [0.01, 0.02, 0.03, 0.05, 0.07, 0.10, 0.13, 0.17, 0.22, 0.28],
        metadata={"help": "The sigma_rel values synthesised and evaluated after training."},
    )
    plot: bool = field(default=True, metadata={"help": "Write posthoc_sweep.png."})


def plot_sweep(rows: list[dict], raw: dict, tracked: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, name in ((axes[0], "loss", "eval loss"), (axes[1], "accuracy", "eval accuracy")):
        ax.plot([r["sigma_rel"] for r in rows], [r[key] for r in rows], "o-", label="synthesised EMA")
        marks = [r for r in rows if any(abs(r["sigma_rel"] - s) < 1e-9 for s in tracked)]
        ax.plot(
            [r["sigma_rel"] for r in marks],
            [r[key] for r in marks],
            "s",
            ms=10,
            mfc="none",
            label="tracked profiles",
        )
        poor = [r for r in rows if r["residual"] > POOR_FIT]
        if poor:
            ax.plot(
                [r["sigma_rel"] for r in poor],
                [r[key] for r in poor],
                "x",
                color="red",
                ms=9,
                label=f"poor fit (residual > {POOR_FIT:.0%})",
            )
        ax.axhline(raw[key], color="gray", ls="--", label="training weights (raw)")
        ax.set_xlabel("sigma_rel (EMA width relative to training time)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Post-hoc EMA: one training run, every sigma_rel afterwards")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((PostHocExampleArguments, EMAArguments))
    parser.set_defaults(ema_posthoc=True, ema_snapshot_every=0.05)
    ex, ema_args = parser.parse_args_into_dataclasses(argv)
    torch.set_num_threads(1)  # tiny model: more threads only add overhead on a shared CPU
    torch.manual_seed(ex.seed)
    train, test = digits_datasets(ex.seed)
    run_dir = ema_args.ema_posthoc_dir or os.path.join(ex.output_dir, "posthoc")
    if os.path.isdir(
        run_dir
    ):  # this example's own folder: a rerun is a new run (the callback refuses mixing)
        shutil.rmtree(run_dir)

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
        eval_strategy="no",
        save_strategy="no",
        logging_steps=max(1, ex.max_steps // 4),
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=ex.seed,
        dataloader_num_workers=0,
    )
    # Equivalent: callbacks=[PostHocEMACallback(sigma_rels=(0.05, 0.10), snapshot_every=0.05)]
    callbacks = ema_args.callbacks()
    model = tiny_vit()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=test,
        compute_metrics=accuracy,
        callbacks=callbacks,
    )
    trainer.train()
    raw_metrics = trainer.evaluate()
    raw = {"loss": raw_metrics["eval_loss"], "accuracy": raw_metrics["eval_accuracy"]}

    # After training, in this or any other process: the EMA of any width, from the snapshots alone.
    manifest = read_manifest(run_dir)
    tracked = [p["sigma_rel"] for p in manifest["profiles"]]
    results = synthesize(run_dir, sigma_rel=ex.sweep, progress=False)
    eval_model = tiny_vit()
    evaluator = Trainer(model=eval_model, args=args, eval_dataset=test, compute_metrics=accuracy)
    rows = []
    for res in results:
        eval_model.load_state_dict(res.tensors)
        m = evaluator.evaluate()
        rows.append(
            {
                "sigma_rel": res.sigma_rel,
                "residual": res.residual,
                "loss": m["eval_loss"],
                "accuracy": m["eval_accuracy"],
            }
        )

    files = [os.path.join(run_dir, f) for e in manifest["snapshots"] for f in e["files"]]
    disk = sum(os.path.getsize(f) for f in files)
    steps = sorted({e["step"] for e in manifest["snapshots"]})
    print(
        f"\n{len(steps)} snapshots x {len(tracked)} profiles (sigma_rel {tracked}) at steps {steps[0]}..{steps[-1]}: "
        f"{len(files)} files, {disk / 2**20:.1f} MiB in {run_dir}"
    )
    print("\nsigma_rel  fit residual  eval loss  eval acc")
    print(f"{'raw':>9}  {'':>12}  {raw['loss']:9.4f}  {raw['accuracy']:8.4f}")
    for r in rows:
        mark = "  (tracked)" if any(abs(r["sigma_rel"] - s) < 1e-9 for s in tracked) else ""
        mark += "  (poor fit)" if r["residual"] > POOR_FIT else ""
        print(f"{r['sigma_rel']:9.3f}  {r['residual']:12.2e}  {r['loss']:9.4f}  {r['accuracy']:8.4f}{mark}")
    best = min((r for r in rows if r["residual"] <= POOR_FIT), key=lambda r: r["loss"], default=rows[0])
    print(
        f"\nlowest eval loss at sigma_rel={best['sigma_rel']:.3f}: loss {best['loss']:.4f}, acc "
        f"{best['accuracy']:.4f} (raw weights: loss {raw['loss']:.4f}, acc {raw['accuracy']:.4f})"
    )
    print(
        f"keep it: synthesize({run_dir!r}, sigma_rel=[{best['sigma_rel']}], out_dir=...) writes an ema_net folder"
    )
    if ex.plot:
        path = os.path.join(ex.output_dir, "posthoc_sweep.png")
        plot_sweep(rows, raw, tracked, path)
        print(f"plot: {path}")
    return {
        "raw": raw,
        "sweep": rows,
        "best": best,
        "snapshot_steps": steps,
        "disk_bytes": disk,
        "run_dir": run_dir,
    }


if __name__ == "__main__":
    main()
