"""Knowledge distillation with the Trainer: a frozen teacher, a student, and an EMA of the student only.

The teacher is a plain attribute of the Trainer subclass, not part of ``trainer.model``, so the EMA callback never
sees it: only the student is averaged, evaluated with its EMA, and written to ``checkpoint-N/ema_net``. (If your
teacher lives inside the model, pass ``trainable_only=True`` after freezing it with ``requires_grad_(False)``.)

Loss: ``alpha * CE(student, y) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))``.

Run (about a minute on 2 CPU cores)::

    HF_HUB_OFFLINE=1 python examples/distill_trainer.py
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from train_trainer import accuracy, digits_datasets, tiny_vit

from hf_ema import EMATrainerCallback
from hf_ema.io import load_ema_net


class DistillationTrainer(Trainer):
    """A Trainer whose loss mixes the labels with a frozen teacher's soft predictions."""

    def __init__(self, *args, teacher: nn.Module, alpha: float = 0.5, temperature: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(pixel_values=inputs["pixel_values"]).logits
        t = self.temperature
        kd = (
            nn.functional.kl_div(
                (outputs.logits / t).log_softmax(-1),
                (teacher_logits / t).log_softmax(-1),
                log_target=True,
                reduction="batchmean",
            )
            * t
            * t
        )
        loss = self.alpha * outputs.loss + (1 - self.alpha) * kd
        return (loss, outputs) if return_outputs else loss


def base_args(output_dir: str, max_steps: int, lr: float, **kw) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=256,
        learning_rate=lr,
        optim="sgd",
        optim_args="momentum=0.9",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        **kw,
    )


def main(output_dir: str = "runs/digits_distill", teacher_steps: int = 800, student_steps: int = 600) -> dict:
    torch.set_num_threads(1)
    train, test = digits_datasets(seed=0)

    torch.manual_seed(0)
    teacher = tiny_vit(hidden_size=32, num_layers=2)  # the model of train_trainer.py
    Trainer(
        model=teacher,
        args=base_args(os.path.join(output_dir, "teacher"), teacher_steps, 0.03, save_strategy="no"),
        train_dataset=train,
    ).train()
    teacher_acc = Trainer(
        model=teacher,
        args=base_args(os.path.join(output_dir, "teacher"), 1, 0.03),
        eval_dataset=test,
        compute_metrics=accuracy,
    ).evaluate()["eval_accuracy"]
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}

    torch.manual_seed(1)
    student = tiny_vit(hidden_size=16, num_layers=1)
    ema = EMATrainerCallback(decay=0.995, decay_type="exp", beta=15, eval_both=True)
    trainer = DistillationTrainer(
        model=student,
        args=base_args(
            os.path.join(output_dir, "student"),
            student_steps,
            0.03,
            eval_strategy="steps",
            eval_steps=student_steps // 4,
            save_strategy="steps",
            save_steps=student_steps,
            save_total_limit=1,
        ),
        train_dataset=train,
        eval_dataset=test,
        compute_metrics=accuracy,
        teacher=teacher,
    )
    trainer.add_callback(ema)
    trainer.train()

    teacher_untouched = all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    tensors, _ = load_ema_net(os.path.join(output_dir, "student", f"checkpoint-{student_steps}"))
    student_only = set(tensors) == set(student.state_dict())
    last = [h for h in trainer.state.log_history if "eval_raw_accuracy" in h][-1]
    ema_last = [h for h in trainer.state.log_history if "eval_accuracy" in h and h["step"] == last["step"]][
        -1
    ]
    result = {
        "teacher_accuracy": teacher_acc,
        "student_raw_accuracy": last["eval_raw_accuracy"],
        "student_ema_accuracy": ema_last["eval_accuracy"],
        "teacher_untouched": teacher_untouched,
        "ema_net_holds_student_only": student_only,
    }
    print(
        f"\nteacher acc {teacher_acc:.4f} | student (step {last['step']}): raw acc {last['eval_raw_accuracy']:.4f}, "
        f"EMA acc {ema_last['eval_accuracy']:.4f}\nteacher weights untouched: {teacher_untouched}; "
        f"ema_net holds the student's {len(tensors)} tensors only: {student_only}"
    )
    return result


if __name__ == "__main__":
    main()
