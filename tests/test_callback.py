"""EMATrainerCallback with a real ``transformers.Trainer`` on tiny models (CPU, a few dozen steps each).

The expected EMA is always computed by ``reference.reference_ema`` (NumPy, float64) from the training weights that
``_trainer_utils.Recorder`` snapshots after every optimizer step, never by hf_ema itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _trainer_utils import Recorder, TinyNet, ToyDataset, same_bits, snapshot, training_args
from reference import decays_for, reference_ema, tiny_bert
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback

from hf_ema import EMATrainerCallback, load_model

RTOL, ATOL = 1e-5, 1e-6


def np_hist(history):
    return [{k: v.double().numpy() for k, v in h.items()} for h in history]


def assert_close_to(tensors, ref, names=None):
    names = list(ref) if names is None else names
    for n in names:
        got = tensors[n].detach().double().cpu().numpy()
        np.testing.assert_allclose(got, ref[n], rtol=RTOL, atol=ATOL, err_msg=n)


def far_from(tensors, ref, min_diff=1e-3):
    """The largest absolute difference is well above the comparison tolerance (the check can fail)."""
    return max(float(np.abs(tensors[n].detach().double().numpy() - ref[n]).max()) for n in ref) > min_diff


def run(
    tmp_path,
    model,
    cb,
    data=None,
    eval_data=None,
    trainer_cls=Trainer,
    resume=None,
    before=(),
    after=(),
    trainer_kwargs=None,
    **args,
):
    """Train with callbacks ``[*before, Recorder(model), cb, *after]``; ``args`` go to ``training_args``."""
    rec = Recorder(model)
    trainer = trainer_cls(
        model=model,
        args=training_args(tmp_path, **args),
        train_dataset=data if data is not None else ToyDataset(64),
        eval_dataset=eval_data,
        callbacks=[*before, rec, cb, *after],
        **(trainer_kwargs or {}),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, rec


# ----------------------------------------------------------------------------------------------- EMA values
@pytest.mark.parametrize(("decay_type", "kw"), [("constant", {}), ("threshold", {}), ("exp", {"beta": 4.0})])
def test_ema_equals_reference_for_each_schedule(tmp_path, decay_type, kw):
    model = TinyNet()
    cb = EMATrainerCallback(decay=0.8, decay_type=decay_type, **kw)
    trainer, rec = run(
        tmp_path,
        model,
        cb,
        eval_data=ToyDataset(32, seed=1),
        eval_strategy="steps",
        eval_steps=5,
        max_steps=20,
    )
    assert len(rec.history) == 21 and cb.ema.step == 20
    ref = reference_ema(np_hist(rec.history), decays_for(decay_type, 0.8, 20, 20, **kw))
    state = cb.ema.state_dict()["ema"]
    assert_close_to(state, ref)
    assert far_from(rec.history[-1], ref) and far_from(rec.history[0], ref)
    # No EMA weights reached a forward/backward or an optimizer step, though 4 evaluations swapped them in.
    assert sorted(rec.eval_weights) == [5, 10, 15, 20]
    assert rec.leaks == []
    # Each evaluation saw the EMA of that step.
    for step, weights in rec.eval_weights.items():
        ref_k = reference_ema(np_hist(rec.history[: step + 1]), decays_for(decay_type, 0.8, step, 20, **kw))
        assert_close_to(weights, ref_k)
    # The logged decay is the schedule's value at the logged (1-based) step.
    logged = {h["step"]: h["ema_decay"] for h in trainer.state.log_history if "ema_decay" in h}
    assert sorted(logged) == list(range(1, 21))
    want = decays_for(decay_type, 0.8, 20, 20, **kw)
    assert [logged[s] for s in range(1, 21)] == pytest.approx(want, rel=1e-12)
    # End of training: the model holds the EMA, so save_model() writes it.
    assert_close_to(dict(model.named_parameters()), ref)
    trainer.save_model(str(tmp_path / "final"))
    final = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert all(torch.equal(final[n], t) for n, t in state.items())


class LogSpy(TrainerCallback):
    """Stands in for a reporting integration (TensorBoard, W&B...): the Trainer lists those before user callbacks."""

    def __init__(self):
        self.logs: list[dict[str, float]] = []
        self.trainer = None  # when set: also count the EMA log hooks in its callback list at each log

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({**(logs or {}), "at_step": state.global_step})
        if self.trainer is not None:
            names = [type(c).__name__ for c in self.trainer.callback_handler.callbacks]
            self.logs[-1]["hooks"] = names.count("_EMADecayLog")


def test_ema_decay_reaches_reporting_callbacks_listed_before_it(tmp_path):
    model = TinyNet()
    spy = LogSpy()
    cb = EMATrainerCallback(decay=0.8, decay_type="threshold")
    trainer, _ = run(tmp_path, model, cb, before=[spy], max_steps=6, logging_steps=2)
    sent = {log["at_step"]: log for log in spy.logs if "loss" in log}
    assert sorted(sent) == [2, 4, 6]
    assert [sent[s]["ema_decay"] for s in (2, 4, 6)] == pytest.approx(
        [decays_for("threshold", 0.8, 6)[s - 1] for s in (2, 4, 6)], rel=1e-12
    )
    # The log hook leaves with the training run: the callback list is the user's again, and a second train()
    # installs exactly one hook.
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert "_EMADecayLog" not in names and names.count("EMATrainerCallback") == 1
    spy.logs.clear()
    spy.trainer = trainer
    trainer.args.max_steps = 8
    trainer.train()
    assert {log["hooks"] for log in spy.logs} == {1}
    assert [log["ema_decay"] for log in spy.logs if "loss" in log] == pytest.approx(
        [decays_for("threshold", 0.8, 8)[s - 1] for s in (2, 4, 6, 8)], rel=1e-12
    )


def test_replace_at_end_false_keeps_training_weights(tmp_path):
    model = TinyNet()
    cb = EMATrainerCallback(decay=0.8, replace_at_end=False)
    _, rec = run(tmp_path, model, cb, max_steps=8)
    assert same_bits(snapshot(model), rec.history[-1])
    ref = reference_ema(np_hist(rec.history), decays_for("constant", 0.8, 8))
    assert_close_to(cb.ema.state_dict()["ema"], ref)


def test_gradient_accumulation_one_update_per_optimizer_step(tmp_path):
    model = TinyNet()
    cb = EMATrainerCallback(decay=0.7, decay_type="threshold", update_every=2)
    _, rec = run(
        tmp_path, model, cb, gradient_accumulation_steps=4, per_device_train_batch_size=4, max_steps=6
    )
    # 6 optimizer steps of 4 micro-batches each: 18 micro-batches in between, 6 EMA steps, 3 averages.
    assert rec.substeps == 18
    assert len(rec.history) == 7
    assert cb.ema.step == 6 and cb.ema.num_updates == 3
    ref = reference_ema(np_hist(rec.history), decays_for("threshold", 0.7, 6), update_every=2)
    assert_close_to(cb.ema.state_dict()["ema"], ref)
    assert far_from(rec.history[-1], ref)


class FakeOverflowAtStep(TrainerCallback):
    """Makes optimizer step ``index`` (0-based) a no-op that reports itself skipped, as an fp16 overflow does."""

    def __init__(self, index: int):
        self.index = index

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        if state.global_step == self.index:
            for p in model.parameters():
                p.grad = None  # plain SGD without momentum: the step leaves the weights as they are
            optimizer._is_overflow = True

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        optimizer._is_overflow = False


def test_skipped_optimizer_step_is_neither_counted_nor_averaged(tmp_path):
    model = TinyNet()
    cb = EMATrainerCallback(decay=0.9, decay_type="threshold")
    _, rec = run(tmp_path, model, cb, before=[FakeOverflowAtStep(3)], max_steps=10)
    assert same_bits(rec.history[4], rec.history[3])  # step 3 really left the weights alone
    assert cb.ema.step == 9
    kept = rec.history[:4] + rec.history[5:]
    ref = reference_ema(np_hist(kept), decays_for("threshold", 0.9, 9))
    assert_close_to(cb.ema.state_dict()["ema"], ref)
    wrong = reference_ema(np_hist(rec.history), decays_for("threshold", 0.9, 10))
    assert far_from(cb.ema.state_dict()["ema"], wrong, min_diff=1e-4)


# ----------------------------------------------------------------------------------------------- evaluation
def _eval_loss(model, tmp_path, eval_data):
    trainer = Trainer(model=model, args=training_args(tmp_path / "separate"), eval_dataset=eval_data)
    return trainer.evaluate()["eval_loss"]


def _with_weights(make, weights):
    model = make()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.as_tensor(np.asarray(weights[n]), dtype=p.dtype))
    return model


def test_checkpoints_eval_metrics_and_eval_both_with_pretrained_model(tmp_path):
    """Tiny BERT: every evaluation is the EMA's, eval_both reports the training weights, ema_net loads."""
    data = ToyDataset(64, tokens=True)
    eval_data = ToyDataset(32, seed=1, tokens=True)
    model = tiny_bert(seed=0)
    cb = EMATrainerCallback(decay=0.7, decay_type="threshold", eval_both=True)
    out = tmp_path / "out"
    trainer, rec = run(
        out,
        model,
        cb,
        data=data,
        eval_data=eval_data,
        max_steps=15,
        eval_strategy="steps",
        eval_steps=5,
        save_strategy="steps",
        save_steps=5,
        save_total_limit=2,
        learning_rate=0.3,
    )
    assert rec.leaks == []
    decays = decays_for("threshold", 0.7, 15)
    logs = {h["step"]: h for h in trainer.state.log_history if "eval_loss" in h}
    raw_logs = {h["step"]: h for h in trainer.state.log_history if "eval_raw_loss" in h}
    assert sorted(logs) == sorted(raw_logs) == [5, 10, 15]
    for step in (5, 10, 15):
        ref = reference_ema(np_hist(rec.history[: step + 1]), decays[:step])
        ema_model = _with_weights(lambda: tiny_bert(seed=0), ref)
        assert logs[step]["eval_loss"] == pytest.approx(_eval_loss(ema_model, tmp_path, eval_data), rel=1e-5)
        raw_model = _with_weights(lambda: tiny_bert(seed=0), np_hist([rec.history[step]])[0])
        raw = _eval_loss(raw_model, tmp_path, eval_data)
        assert raw_logs[step]["eval_raw_loss"] == pytest.approx(raw, rel=1e-5)
        assert abs(raw - logs[step]["eval_loss"]) > 1e-4  # the two evaluations really differ
        # eval_both's metrics also reach the metrics dict the Trainer got back (and log history)
        assert rec.eval_metrics[step]["eval_loss"] == logs[step]["eval_loss"]
    # save_total_limit=2: checkpoint-5 rotated away with its ema_net; the others have theirs.
    assert sorted(os.listdir(out)) == ["checkpoint-10", "checkpoint-15"]
    for step in (10, 15):
        ckpt = out / f"checkpoint-{step}"
        # the checkpoint's regular weights are the training weights, bitwise
        saved = load_file(str(ckpt / "model.safetensors"))
        for n, t in rec.history[step].items():
            assert torch.equal(saved[n], t), n
        # ema_net: a full model that AutoModel... loads, holding the EMA of that step
        loaded = AutoModelForSequenceClassification.from_pretrained(str(ckpt / "ema_net"))
        ref = reference_ema(np_hist(rec.history[: step + 1]), decays[:step])
        assert_close_to(dict(loaded.named_parameters()), ref)
        meta = json.loads((ckpt / "ema_net" / "ema_state.json").read_text())
        assert meta["step"] == step
        via_helper = load_model(AutoModelForSequenceClassification, ckpt)
        assert same_bits(snapshot(via_helper), snapshot(loaded))


def test_epoch_eval_strategy_uses_ema(tmp_path):
    model = TinyNet()
    cb = EMATrainerCallback(decay=0.8, decay_type="constant")
    # 64 samples / batch 8 = 8 steps per epoch, 2 epochs
    _, rec = run(
        tmp_path,
        model,
        cb,
        eval_data=ToyDataset(32, seed=1),
        max_steps=-1,
        num_train_epochs=2,
        eval_strategy="epoch",
    )
    assert sorted(rec.eval_weights) == [8, 16] and rec.leaks == []
    for step in (8, 16):
        ref = reference_ema(np_hist(rec.history[: step + 1]), decays_for("constant", 0.8, step))
        assert_close_to(rec.eval_weights[step], ref)
        assert far_from(rec.history[step], ref)


class CancelEvalAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_evaluate = False


def test_cancelled_evaluation_never_lets_ema_weights_train(tmp_path, caplog):
    """A callback after ours cancels an announced evaluation: the training weights still come back in time."""
    model = TinyNet()
    cb = EMATrainerCallback(decay=0.8)
    with caplog.at_level(logging.WARNING, logger="hf_ema.callback"):
        _, rec = run(
            tmp_path,
            model,
            cb,
            eval_data=ToyDataset(32, seed=1),
            after=[CancelEvalAt(4)],
            max_steps=8,
            eval_strategy="steps",
            eval_steps=4,
        )
    assert sorted(rec.eval_weights) == [8]
    # the recorder (before us) saw the EMA still in at the start of step 5, but never at an optimizer step
    assert rec.leaks == ["on_step_begin at global_step 4"]
    assert any("did not run" in r.getMessage() for r in caplog.records)
    ref = reference_ema(np_hist(rec.history), decays_for("constant", 0.8, 8))
    assert_close_to(cb.ema.state_dict()["ema"], ref)


def test_several_eval_datasets_all_see_the_ema(tmp_path):
    model = TinyNet()
    cb = EMATrainerCallback(decay=0.8)
    evals = {"a": ToyDataset(32, seed=1), "b": ToyDataset(16, seed=2)}
    _, rec = run(tmp_path, model, cb, eval_data=evals, max_steps=10, eval_strategy="steps", eval_steps=5)
    assert [(s, any(k.startswith("eval_a_") for k in m)) for s, m, _ in rec.all_evals] == [
        (5, True),
        (5, False),
        (10, True),
        (10, False),
    ]
    for step, _, weights in rec.all_evals:
        ref = reference_ema(np_hist(rec.history[: step + 1]), decays_for("constant", 0.8, step))
        assert_close_to(weights, ref)
    assert rec.leaks == []


def test_model_init_trainer_uses_the_model_it_trains(tmp_path):
    """With model_init the Trainer builds a new model in train(); the EMA must follow that one."""
    cb = EMATrainerCallback(decay=0.8, replace_at_end=False)
    holder = {}

    def model_init():
        holder["model"] = TinyNet(seed=len(holder))
        return holder["model"]

    trainer = Trainer(
        model_init=model_init,
        args=training_args(tmp_path, max_steps=6),
        train_dataset=ToyDataset(64),
        callbacks=[cb],
    )
    first = trainer.model
    trainer.train()
    assert trainer.model is holder["model"] and trainer.model is not first  # train() built a second model
    assert cb.ema.model is trainer.model and cb.ema.step == 6


# ----------------------------------------------------------------------------------------------- resume
def _trainer_cannot_load_its_rng_state() -> bool:
    """Old Trainers (e.g. 4.46) call ``torch.load(rng_file)`` without ``weights_only``; torch >= 2.6 refuses it."""
    import inspect

    src = inspect.getsource(Trainer._load_rng_state)
    new_torch = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 6)
    return new_torch and "torch.load(rng_file)" in src


@pytest.mark.skipif(
    _trainer_cannot_load_its_rng_state(),
    reason="this transformers Trainer cannot resume under torch>=2.6 (torch.load of rng_state.pth, weights_only)",
)
def test_resume_equals_uninterrupted_run_bitwise(tmp_path, caplog):
    kw = dict(max_steps=16, save_strategy="steps", save_steps=4, eval_data=ToyDataset(32, seed=1))
    full_model = TinyNet()
    full_cb = EMATrainerCallback(decay=0.8, decay_type="exp", beta=5.0)
    run(tmp_path / "full", full_model, full_cb, **kw)
    full_ema = {k: v.clone() for k, v in full_cb.ema.state_dict()["ema"].items()}

    # Resume from checkpoint-8 (copied to a fresh output dir), with an evaluation right at the start.
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-8", out / "checkpoint-8")
    model = TinyNet(seed=123)  # different init: everything must come from the checkpoint
    cb = EMATrainerCallback(decay=0.8, decay_type="exp", beta=5.0)
    _, rec = run(out, model, cb, resume=str(out / "checkpoint-8"), eval_on_start=True, **kw)
    assert rec.start_step == 8 and cb.ema.step == 16
    for k, v in full_ema.items():
        assert torch.equal(cb.ema.state_dict()["ema"][k], v), k
    # eval_on_start after resuming saw the checkpoint's EMA, not the resumed training weights
    saved_ema = load_file(str(out / "checkpoint-8" / "ema_net" / "model.safetensors"))
    assert same_bits(rec.eval_weights[8], {k: saved_ema[k] for k in rec.eval_weights[8]})
    assert not same_bits(rec.eval_weights[8], rec.history[0])
    assert rec.leaks == []

    # A checkpoint without ema_net: an error before any step, naming the checkpoint and the way out ...
    out2 = tmp_path / "no_ema"
    out2.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-8", out2 / "checkpoint-8")
    shutil.rmtree(out2 / "checkpoint-8" / "ema_net")
    stopped = Recorder(TinyNet(seed=5))
    with pytest.raises(ValueError, match="allow_ema_restart=True") as info:
        run(out2, stopped.model, EMATrainerCallback(decay=0.8), before=[stopped], resume=True, **kw)
    assert str(out2 / "checkpoint-8") in str(info.value) and "no `ema_net`" in str(info.value)
    assert len(stopped.history) == 1  # no optimizer step ran
    # ... unless allow_ema_restart=True: a warning, and the EMA starts from the loaded weights.
    cb2 = EMATrainerCallback(decay=0.8, decay_type="exp", beta=5.0, allow_ema_restart=True)
    with caplog.at_level(logging.WARNING, logger="hf_ema.callback"):
        _, rec2 = run(out2, TinyNet(seed=5), cb2, resume=True, **kw)
    assert any("no `ema_net`" in r.getMessage() for r in caplog.records)
    ref = reference_ema(np_hist(rec2.history), decays_for("exp", 0.8, 16, 16, beta=5.0)[8:])
    assert_close_to(cb2.ema.state_dict()["ema"], ref)


# ----------------------------------------------------------------------------------------------- best model
def test_checkpoint_pushed_to_hub_carries_its_ema_net(tmp_path, monkeypatch):
    """With ``push_to_hub`` the Trainer uploads each checkpoint before ``on_save``: the upload must hold ema_net."""
    import concurrent.futures
    from types import SimpleNamespace

    import transformers.trainer as trainer_module

    if not hasattr(trainer_module, "hf_api"):
        pytest.skip(
            reason="this transformers version pushes through other functions (no offline stand-in here)"
        )
    uploads = []

    class OfflineHub:  # records what each upload would send, when it is started
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=f"user/{repo_id}")

        def upload_folder(self, *, folder_path, path_in_repo=None, **kwargs):
            folder = Path(folder_path)
            ema = folder / "ema_net"
            uploads.append(
                {
                    "to": path_in_repo,
                    "ema_step": json.loads((ema / "ema_state.json").read_text())["step"]
                    if ema.is_dir()
                    else None,
                    "ema": load_file(str(ema / "model.safetensors")) if ema.is_dir() else None,
                    "inode": (ema / "model.safetensors").stat().st_ino if ema.is_dir() else None,
                }
            )
            done = concurrent.futures.Future()
            done.set_result(None)
            return done

    monkeypatch.setattr(trainer_module, "hf_api", lambda *a, **k: OfflineHub())
    # An earlier run into the same output_dir (other data) leaves checkpoint-3/6 with its own ema_net: the pushed
    # checkpoints must carry this run's EMA, not those.
    run(
        tmp_path,
        TinyNet(seed=1),
        EMATrainerCallback(decay=0.8),
        data=ToyDataset(64, seed=5),
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
    )
    model = TinyNet()
    cb = EMATrainerCallback(decay=0.8, decay_type="threshold")
    _, rec = run(
        tmp_path,
        model,
        cb,
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        push_to_hub=True,
        hub_strategy="checkpoint",
        hub_model_id="ema-test",
    )
    pushed = [u for u in uploads if u["to"] == "last-checkpoint"]
    assert [u["ema_step"] for u in pushed] == [3, 6]
    for u, step in zip(pushed, (3, 6), strict=True):
        assert_close_to(
            u["ema"], reference_ema(np_hist(rec.history[: step + 1]), decays_for("threshold", 0.8, step))
        )
        # on_save did not write it a second time: the local checkpoint keeps the file that was uploaded
        local = tmp_path / f"checkpoint-{step}" / "ema_net" / "model.safetensors"
        assert local.stat().st_ino == u["inode"]


def test_checkpoint_dir_is_this_runs_folder(tmp_path):
    """on_save/on_push_begin write into the folder the Trainer has just written: output_dir/checkpoint-N, or the
    trial's output_dir/<run>/checkpoint-N during a hyper-parameter search (not a stale top-level one)."""
    import time
    from types import SimpleNamespace

    class FakeTrainer:
        hp_search_backend = None

    stale, trial = tmp_path / "checkpoint-4", tmp_path / "run-1" / "checkpoint-4"
    stale.mkdir()
    time.sleep(0.01)
    trial.mkdir(parents=True)
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=4)
    cb, trainer = EMATrainerCallback(), FakeTrainer()
    cb.bind(trainer)
    assert cb._checkpoint_dir(args, state) == str(stale)
    trainer.hp_search_backend = "optuna"
    assert cb._checkpoint_dir(args, state) == str(trial)
    assert cb._checkpoint_dir(args, SimpleNamespace(global_step=8)) is None


@pytest.mark.parametrize("replace_at_end", [True, False])
def test_load_best_model_at_end_ends_with_best_checkpoints_ema(tmp_path, replace_at_end):
    model = TinyNet()
    cb = EMATrainerCallback(decay=0.6, replace_at_end=replace_at_end)
    # greater_is_better on eval_loss makes an early, worse checkpoint "best", so best != last
    scores = iter([1.0, 5.0, 2.0, 3.0])  # the 2nd evaluation (step 8) scores best, so best != last

    def compute_metrics(pred):
        return {
            "score": next(scores),
            "accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean()),
        }

    rec = Recorder(model)
    trainer = Trainer(
        model=model,
        args=training_args(
            tmp_path,
            max_steps=16,
            eval_strategy="steps",
            eval_steps=4,
            save_strategy="steps",
            save_steps=4,
            load_best_model_at_end=True,
            metric_for_best_model="score",
            greater_is_better=True,
        ),
        train_dataset=ToyDataset(64),
        eval_dataset=ToyDataset(32, seed=1),
        compute_metrics=compute_metrics,
        callbacks=[rec, cb],
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-8")
    best_step = 8
    assert rec.leaks == []
    ref = reference_ema(np_hist(rec.history[: best_step + 1]), decays_for("constant", 0.6, best_step))
    assert_close_to(cb.ema.state_dict()["ema"], ref)
    if replace_at_end:
        assert_close_to(dict(model.named_parameters()), ref)
    else:  # the Trainer's own choice: the best checkpoint's training weights
        assert same_bits(snapshot(model), rec.history[best_step])
    # The callback now holds the best checkpoint's EMA: a push after training (`trainer.push_to_hub()` fires
    # on_push_begin, an event older Trainers such as 4.46 do not have) must not write it into the last checkpoint.
    last = tmp_path / "checkpoint-16" / "ema_net"
    inode = (last / "model.safetensors").stat().st_ino
    if hasattr(trainer.callback_handler, "on_push_begin"):
        trainer.callback_handler.on_push_begin(trainer.args, trainer.state, trainer.control)
    assert (last / "model.safetensors").stat().st_ino == inode
    assert json.loads((last / "ema_state.json").read_text())["step"] == 16


# ----------------------------------------------------------------------------------------------- distillation
class DistillTrainer(Trainer):
    def __init__(self, *args, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(x=inputs["x"], labels=inputs["labels"])
        with torch.no_grad():
            t_logits = self.teacher(x=inputs["x"])["logits"]
        kd = torch.nn.functional.kl_div(
            out["logits"].log_softmax(-1), t_logits.log_softmax(-1), log_target=True, reduction="batchmean"
        )
        loss = 0.5 * out["loss"] + 0.5 * kd
        return (loss, out) if return_outputs else loss


def test_distillation_averages_student_only(tmp_path):
    teacher = TinyNet(seed=7)
    teacher_before = snapshot(teacher)
    student = TinyNet(seed=0)
    cb = EMATrainerCallback(decay=0.8)
    _, rec = run(
        tmp_path,
        student,
        cb,
        trainer_cls=DistillTrainer,
        trainer_kwargs={"teacher": teacher},
        max_steps=10,
        save_strategy="steps",
        save_steps=10,
    )
    assert same_bits(snapshot(teacher), teacher_before)
    assert cb.ema.names == [n for n, _ in student.named_parameters()]
    saved = load_file(str(tmp_path / "checkpoint-10" / "ema_net" / "model.safetensors"))
    assert sorted(saved) == sorted(n for n, _ in student.named_parameters())
    ref = reference_ema(np_hist(rec.history), decays_for("constant", 0.8, 10))
    assert_close_to(saved, ref)


# ----------------------------------------------------------------------------------------------- PEFT
def test_lora_trainable_only_averages_adapters(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed")

    def make():
        return peft.get_peft_model(
            tiny_bert(seed=0),
            peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
        )

    model = make()
    cb = EMATrainerCallback(decay=0.7, trainable_only=True)
    _, rec = run(
        tmp_path,
        model,
        cb,
        data=ToyDataset(64, tokens=True),
        max_steps=8,
        save_strategy="steps",
        save_steps=8,
        learning_rate=2.0,
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert cb.ema.names == trainable and any("lora_A" in n for n in trainable)
    saved = load_file(str(tmp_path / "checkpoint-8" / "ema_net" / "model.safetensors"))
    assert sorted(saved) == sorted(trainable)
    ref = reference_ema(np_hist(rec.history), decays_for("constant", 0.7, 8), names=trainable)
    assert_close_to(saved, ref)
    frozen = [n for n in rec.history[0] if n not in trainable]
    assert frozen and all(torch.equal(rec.history[0][n], rec.history[-1][n]) for n in frozen)
    # load_model puts the averaged adapters onto a fresh base model
    fresh = load_model(make(), tmp_path / "checkpoint-8")
    assert_close_to(dict(fresh.named_parameters()), ref)
    lora_b = [n for n in trainable if "lora_B" in n]
    assert any(np.abs(ref[n]).max() > 1e-4 for n in lora_b)  # adapters really moved away from init (zeros)
    assert far_from({n: rec.history[-1][n] for n in trainable}, ref, min_diff=1e-4)


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay": 1.5}, "decay"),
        ({"decay": 0}, "decay"),
        ({"decay_type": "bogus"}, "bogus"),
        ({"update_every": 0}, "update_every"),
        ({"buffers": "mean"}, "buffers"),
        ({"dtype": "int8"}, "dtype"),
        ({"decay_type": "exp", "beta": -1.0}, "beta"),
        ({"total_steps": 0}, "total_steps"),
        ({"replace_at_end": "yes"}, "replace_at_end"),
        ({"eval_both": 1}, "eval_both"),
        ({"raw_prefix": "eval"}, "raw_prefix"),
        ({"device": "nonsense"}, "device"),
    ],
)
def test_invalid_arguments_fail_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EMATrainerCallback(**kwargs)


def test_from_params_supergradients_dict():
    cb = EMATrainerCallback.from_params({"ema": True, "decay": 0.9999, "decay_type": "exp", "beta": 15})
    assert cb.ema_kwargs["decay"] == 0.9999 and cb.ema_kwargs["decay_type"] == "exp"
    assert cb.ema_kwargs["beta"] == 15
    with pytest.raises(ValueError, match="decay"):
        EMATrainerCallback.from_params({"decay": 2.0, "decay_type": "constant"})
    with pytest.raises(TypeError, match="ema_params"):
        EMATrainerCallback.from_params([("decay", 0.9)])


# ----------------------------------------------------------------------------------------------- DDP
def test_ddp_two_processes_wrapped_model(tmp_path):
    """The Trainer wraps the model in DDP (2 CPU ranks, gloo): both ranks hold the same, correct EMA."""
    from tests._torchrun import run_torchrun

    script = Path(__file__).with_name("_ddp_trainer_script.py")
    run_torchrun(script, str(tmp_path), timeout=180, label="DDP Trainer script")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    tensors = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    for res in results:
        assert res == {"leaks": [], "steps": 8, "wrapped": "DistributedDataParallel", "evals": [4, 8]}
    names = [k[len("ema.") :] for k in tensors[0] if k.startswith("ema.")]
    history = [{n: tensors[0][f"hist{i}.{n}"].double().numpy() for n in names} for i in range(9)]
    ref = reference_ema(history, decays_for("threshold", 0.7, 8))
    for r in (0, 1):
        assert_close_to({n: tensors[r][f"ema.{n}"] for n in names}, ref)
        assert all(torch.equal(tensors[r][f"ema.{n}"], tensors[0][f"ema.{n}"]) for n in names)
    assert far_from({n: tensors[0][f"hist8.{n}"] for n in names}, ref)
    for step in (4, 8):  # one ema_net per checkpoint, written once (no temporary folders left behind)
        ckpt = tmp_path / "run" / f"checkpoint-{step}"
        assert sorted(p.name for p in ckpt.iterdir() if "ema" in p.name) == ["ema_net"]
    saved = load_file(str(tmp_path / "run" / "checkpoint-8" / "ema_net" / "model.safetensors"))
    assert all(torch.equal(saved[n], tensors[0][f"ema.{n}"]) for n in names)


# ----------------------------------------------------------------------------------------------- examples
def _load_example(name):
    import importlib.util
    import sys

    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(examples, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_example_train_trainer_runs_short(tmp_path):
    pytest.importorskip("sklearn", reason="the example's data ships with scikit-learn")
    pytest.importorskip("matplotlib", reason="the example plots with matplotlib")
    threads = torch.get_num_threads()
    try:
        result = _load_example("train_trainer").main(
            ["--output_dir", str(tmp_path), "--max_steps", "40", "--eval_steps", "20"]
        )
    finally:
        torch.set_num_threads(threads)
    assert result["ema_accuracy"] == result["ema_accuracy_reloaded"]
    assert (tmp_path / "ema_vs_raw.png").stat().st_size > 1000
    assert (tmp_path / "checkpoint-40" / "ema_net" / "model.safetensors").is_file()


def test_example_distill_trainer_runs_short(tmp_path):
    pytest.importorskip("sklearn", reason="the example's data ships with scikit-learn")
    threads = torch.get_num_threads()
    try:
        result = _load_example("distill_trainer").main(str(tmp_path), teacher_steps=20, student_steps=20)
    finally:
        torch.set_num_threads(threads)
    assert result["teacher_untouched"] is True
    assert result["ema_net_holds_student_only"] is True
