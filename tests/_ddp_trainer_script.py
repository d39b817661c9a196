"""Run by test_callback.py under ``torch.distributed.run`` with 2 CPU processes (gloo): Trainer wraps the model in DDP.

Each rank writes its EMA, its recorded weight history and its leak list to ``<out>/rank<r>.safetensors`` / ``.json``.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
torch.set_num_threads(1)

from _trainer_utils import Recorder, TinyNet, ToyDataset, training_args  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import Trainer  # noqa: E402

from hf_ema import EMATrainerCallback  # noqa: E402
from tests._torchrun import exit_worker  # noqa: E402


def main(out: str) -> None:
    model = TinyNet(seed=0)
    rec = Recorder(model)
    cb = EMATrainerCallback(decay=0.7, decay_type="threshold")
    args = training_args(
        os.path.join(out, "run"),
        max_steps=8,
        per_device_train_batch_size=4,
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="steps",
        save_steps=4,
        ddp_backend="gloo",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ToyDataset(64),
        eval_dataset=ToyDataset(32, seed=1),
        callbacks=[rec, cb],
    )
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    wrapped = type(trainer.model_wrapped).__name__
    tensors = {f"ema.{k}": v.contiguous() for k, v in cb.ema.state_dict()["ema"].items()}
    for i, h in enumerate(rec.history):
        tensors.update({f"hist{i}.{k}": v for k, v in h.items()})
    save_file(tensors, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "leaks": rec.leaks,
                "steps": len(rec.history) - 1,
                "wrapped": wrapped,
                "evals": sorted(rec.eval_weights),
            },
            f,
        )


if __name__ == "__main__":
    main(sys.argv[1])
    exit_worker()
