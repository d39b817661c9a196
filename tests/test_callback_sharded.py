"""``EMATrainerCallback`` on an FSDP2-sharded transformers model, 2 processes (gloo, CPU).

Accelerate 1.15 does not shard on the CPU: with an FSDP plugin and ``cpu=True`` it runs MULTI_CPU (DDP), so a
``Trainer`` cannot be run with FSDP2 here. The callback's sharded path is therefore tested with the lower-level
pieces: tests/callback_sharded_worker.py shards a tiny ``BertForSequenceClassification`` by hand with
``fully_shard`` (as Accelerate's FSDP2 path does to ``trainer.model``) and calls the callback's events in the
Trainer's order with real ``TrainingArguments`` / ``TrainerState`` / ``TrainerControl``. What is not covered: the
Trainer's own FSDP2 plumbing (Accelerate's preparation, the Trainer's FSDP checkpoint writing), which needs GPUs.

Expected EMAs come from the NumPy reference (tests/reference.py) over the full parameters the worker gathered
after every optimizer step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests._torchrun import assert_close, assert_same_bits, assert_shards_stack_to, load_history, run_torchrun
from tests.callback_sharded_worker import DECAY, DECAY_TYPE, EVAL_STEP, MAX_STEPS, SAVE_STEP
from tests.reference import decays_for, reference_ema, tiny_bert, to_numpy

WORKER = Path(__file__).with_name("callback_sharded_worker.py")
TIMEOUT_S = 180

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    out = tmp_path_factory.mktemp("callback_fsdp2")
    run_torchrun(WORKER, str(out), timeout=TIMEOUT_S)
    return out, {r: json.loads((out / f"info_rank{r}.json").read_text()) for r in (0, 1)}


def _expected(out: Path, steps: int) -> dict[str, np.ndarray]:
    history = load_history(out / "history.safetensors")
    assert len(history) == MAX_STEPS + 1
    return reference_ema(history[: steps + 1], decays_for(DECAY_TYPE, DECAY, steps))


def _model_names() -> list[str]:
    return sorted(tiny_bert(0).state_dict())


def test_ema_is_kept_per_shard(run):
    out, info = run
    assert info[0]["param_types"] == ["DTensor"]  # really sharded
    full_bytes = 4 * info[0]["full_param_numel"]
    for rank in (0, 1):
        assert (
            info[rank]["ema_bytes"] == 4 * info[rank]["local_param_numel"]
        )  # fp32 EMA of the local shard only
        assert info[rank]["ema_bytes"] <= 0.55 * full_bytes, (rank, info[rank]["ema_bytes"], full_bytes)
    assert info[0]["ema_bytes"] + info[1]["ema_bytes"] == full_bytes
    # each rank's EMA is its own rows of the gathered EMA (Shard(0), rank 0 first)
    l0 = assert_shards_stack_to(load_file(str(out / "final_ema.safetensors")), out, "local_ema_rank")
    assert l0["bert.embeddings.word_embeddings.weight"].shape == (20, 16)


def test_gathered_ema_equals_reference_of_gathered_parameters(run):
    out, info = run
    assert info[0]["total_steps"] == MAX_STEPS  # taken from state.max_steps
    assert info[0]["ema_step"] == info[1]["ema_step"] == MAX_STEPS
    assert info[0]["ema_state_dict_len"] == len(_model_names()) and info[1]["ema_state_dict_len"] == 0
    assert_close(load_file(str(out / "final_ema.safetensors")), _expected(out, MAX_STEPS))


def test_evaluation_uses_the_ema_and_restores_training_weights_bitwise(run):
    out, info = run
    expected = _expected(out, EVAL_STEP)
    # between the swap (end of on_step_end) and on_evaluate the model holds the EMA of step EVAL_STEP
    assert info[0]["swapped_in"] is True
    assert_close(load_file(str(out / "eval_under_swap.safetensors")), expected)
    # the sharded forward under the swap equals a plain, unsharded model loaded with the reference EMA
    plain = tiny_bert(seed=99)
    plain.load_state_dict({k: torch.from_numpy(v).float() for k, v in expected.items()})
    ev = load_file(str(out / "eval_logits.safetensors"))
    with torch.no_grad():
        want = plain(input_ids=ev["x"]).logits
    torch.testing.assert_close(ev["y"], want, rtol=1e-5, atol=1e-5)
    # on_evaluate put the training weights back, bitwise, on every shard
    assert info[0]["restored_bitwise"] is True
    assert info[0]["swapped_after_evaluate"] is False and info[1]["swapped_after_evaluate"] is False


def test_checkpoint_ema_net_written_once_with_full_tensors_and_loads_with_from_pretrained(run):
    out, info = run
    ckpt = out / "run" / f"checkpoint-{SAVE_STEP}"
    assert info[0]["writes"] == [str(ckpt)] and info[1]["writes"] == []  # main process only, once
    ema_net = ckpt / "ema_net"
    assert sorted(p.name for p in ema_net.iterdir()) == ["config.json", "ema_state.json", "model.safetensors"]
    saved = load_file(str(ema_net / "model.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in tiny_bert(0).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in saved.items()} == shapes  # full tensors, the model's own names
    assert_close(saved, _expected(out, SAVE_STEP))
    assert json.loads((ema_net / "ema_state.json").read_text())["step"] == SAVE_STEP
    from transformers import BertForSequenceClassification

    loaded = BertForSequenceClassification.from_pretrained(str(ema_net))
    sd = loaded.state_dict()
    for name, t in saved.items():
        assert torch.equal(sd[name], t), name


def test_resume_restores_the_sharded_ema(run):
    out, info = run
    assert info[0]["resumed_step"] == info[1]["resumed_step"] == SAVE_STEP
    restored = load_file(str(out / "resumed_restored.safetensors"))
    saved = load_file(str(out / "run" / f"checkpoint-{SAVE_STEP}" / "ema_net" / "model.safetensors"))
    assert sorted(restored) == sorted(saved)
    for name in saved:
        assert torch.equal(restored[name], saved[name]), name
    # continuing from step 3 with the same data gives the uninterrupted run's EMA (and the reference)
    assert info[0]["resumed_final_step"] == MAX_STEPS
    final = load_file(str(out / "final_ema.safetensors"))
    resumed = load_file(str(out / "resumed_final.safetensors"))
    for name in final:
        torch.testing.assert_close(resumed[name], final[name], rtol=0, atol=1e-7, msg=name)
    assert_close(resumed, _expected(out, MAX_STEPS))
    assert_shards_stack_to(resumed, out, "resumed_local_rank")


def test_model_holds_the_ema_at_train_end(run):
    out, _ = run
    final = load_file(str(out / "final_ema.safetensors"))
    end = load_file(str(out / "end_weights.safetensors"))
    assert_same_bits(end, final)
    history = load_history(out / "history.safetensors")
    assert not np.array_equal(history[-1]["classifier.weight"], to_numpy(end["classifier.weight"]))
