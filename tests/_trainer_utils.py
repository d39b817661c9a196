"""Helpers for the Trainer tests: tiny data, tiny models, and a recorder callback that never imports hf_ema.

The recorder is the independent witness: it snapshots the training weights right after every optimizer step
(``on_optimizer_step``, where the EMA callback does nothing) and checks, at the start of every step and right before
every optimizer step, that the model holds exactly those weights again. Put it *before* the EMA callback in the
callback list, so that in every event it sees the model as the EMA callback left it at the previous event.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback, TrainingArguments


class ToyDataset(torch.utils.data.Dataset):
    """A fixed, noisy 3-class problem in 4 features (``x``, ``labels``), or token ids for the tiny BERT."""

    def __init__(self, n: int = 64, seed: int = 0, tokens: bool = False, vocab: int = 40, seq: int = 8):
        g = torch.Generator().manual_seed(seed)
        self.tokens = tokens
        if tokens:
            self.ids = torch.randint(1, vocab, (n, seq), generator=g)
            self.labels = (self.ids[:, 0] % 2).long()
            flip = torch.rand(n, generator=g) < 0.2
            self.labels[flip] = 1 - self.labels[flip]
        else:
            self.x = torch.randn(n, 4, generator=g)
            w = torch.randn(4, 3, generator=g)
            self.labels = (self.x @ w + 0.8 * torch.randn(n, 3, generator=g)).argmax(-1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        if self.tokens:
            return {
                "input_ids": self.ids[i],
                "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i],
            }
        return {"x": self.x[i], "labels": self.labels[i]}


class TinyNet(nn.Module):
    """A plain ``nn.Module`` (not a PreTrainedModel) that the Trainer can drive: returns ``{"loss", "logits"}``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(4, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.fc2(torch.tanh(self.fc1(x)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of the model's named parameters (bitwise copies)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Recorder(TrainerCallback):
    """Records the training weights after each optimizer step and checks nothing else is in the model later."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.history: list[dict[str, torch.Tensor]] = []  # [0]: at train begin; [k]: after optimizer step k-1
        self.start_step = 0
        self.leaks: list[str] = []
        self.eval_weights: dict[int, dict[str, torch.Tensor]] = {}
        self.eval_metrics: dict[int, dict[str, float]] = {}
        self.substeps = 0
        self.all_evals: list[tuple[int, list[str], dict[str, torch.Tensor]]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.history = [snapshot(self.model)]
        self.start_step = state.global_step

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.history.append(snapshot(self.model))

    def _check(self, where, state):
        if not same_bits(snapshot(self.model), self.history[-1]):
            self.leaks.append(f"{where} at global_step {state.global_step}")

    def on_step_begin(self, args, state, control, **kwargs):
        self._check("on_step_begin", state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._check("on_pre_optimizer_step", state)

    def on_substep_end(self, args, state, control, **kwargs):
        self.substeps += 1

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if (
            metrics is not None
            and any(k.startswith("eval_raw") for k in metrics)
            and state.global_step in self.eval_metrics
        ):
            return  # the nested evaluation of the training weights (eval_both)
        self.eval_weights[state.global_step] = snapshot(self.model)
        self.eval_metrics[state.global_step] = dict(metrics or {})
        self.all_evals.append((state.global_step, sorted(metrics or {}), snapshot(self.model)))


def training_args(output_dir, **overrides) -> TrainingArguments:
    """Small, deterministic CPU settings: plain SGD at a constant, large learning rate (noisy weights)."""
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=32,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_steps=20,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        save_safetensors=True,
    )
    kwargs.update(overrides)
    if "save_safetensors" not in TrainingArguments.__dataclass_fields__:
        kwargs.pop("save_safetensors")
    return TrainingArguments(**kwargs)
