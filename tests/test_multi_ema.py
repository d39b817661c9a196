"""Several EMAs of one model: named ``EMATrainerCallback``\\ s in one Trainer, named ``EMAState``\\ s on one
Accelerator, ``load_model(..., ema=name)``.

Expected EMAs come from ``reference.reference_ema`` (NumPy, float64) over the training weights that
``_trainer_utils.Recorder`` snapshots after every optimizer step; the "same run without hf_ema" is a plain Trainer
run with the same arguments, so the training trajectory is compared against a run that hf_ema never touched.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from _trainer_utils import Recorder, TinyNet, ToyDataset, same_bits, snapshot, training_args
from accelerate import Accelerator
from reference import decays_for, drive, record, reference_ema, tiny_bert, tiny_mlp
from safetensors.torch import load_file
from torch import nn
from transformers import BertForSequenceClassification, Trainer, TrainerCallback, set_seed

import hf_ema
from hf_ema import EMAFileError, EMAState, EMATrainerCallback
from hf_ema.loading import has_ema

RTOL, ATOL = 1e-5, 1e-6
FAST, SLOW = 0.9, 0.99


class DropNet(TinyNet):
    """TinyNet with dropout: training draws random numbers, so any extra draw by hf_ema would change the run."""

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.drop = nn.Dropout(0.3)

    def forward(self, x, labels=None):
        logits = self.fc2(self.drop(torch.tanh(self.fc1(x))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class EvalSpy(TrainerCallback):
    """Records every evaluation: its step, its loss key (which says whose weights it claims), and the weights."""

    def __init__(self, model):
        self.model = model
        self.evals: list[tuple[int, str, dict[str, torch.Tensor]]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        key = next(k for k in sorted(metrics) if k.endswith("_loss"))
        self.evals.append((state.global_step, key, snapshot(self.model)))


def np_hist(history):
    return [{k: v.double().numpy() for k, v in h.items()} for h in history]


def assert_close_to(tensors, ref):
    for n, want in ref.items():
        got = tensors[n].detach().double().cpu().numpy()
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=n)


def eval_loss_of(weights, eval_data, out_dir) -> float:
    """Evaluation loss of a fresh DropNet holding ``weights``: an evaluation hf_ema takes no part in."""
    model = DropNet()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.as_tensor(np.asarray(weights[n]), dtype=p.dtype))
    trainer = Trainer(model=model, args=training_args(out_dir), eval_dataset=eval_data)
    return trainer.evaluate()["eval_loss"]


def train(out_dir, model, callbacks, eval_data, resume=None, **args):
    """Train with callbacks ``[Recorder, EvalSpy, *callbacks]``; returns the trainer and the recorder (which
    carries the spy's evaluations as ``rec.evals``)."""
    rec = Recorder(model)
    spy = EvalSpy(model)
    trainer = Trainer(
        model=model,
        args=training_args(out_dir, **args),
        train_dataset=ToyDataset(64),
        eval_dataset=eval_data,
        callbacks=[rec, spy, *callbacks],
    )
    set_seed(0)
    trainer.train(resume_from_checkpoint=resume)
    rec.evals = spy.evals
    return trainer, rec


RUN = dict(
    max_steps=12,
    eval_strategy="steps",
    eval_steps=4,
    eval_on_start=True,
    save_strategy="steps",
    save_steps=4,
    learning_rate=0.3,
)


# ---------------------------------------------------------------------------------------------- Trainer
@pytest.mark.parametrize("primary_first", [True, False], ids=["primary-first", "secondary-first"])
def test_two_callbacks_leave_training_alone_and_each_ema_is_right(tmp_path, primary_first):
    eval_data = ToyDataset(32, seed=1)
    base_model = DropNet()
    base, _ = train(tmp_path / "plain", base_model, [], eval_data, **RUN)

    model = DropNet()
    fast = EMATrainerCallback(decay=FAST, decay_type="threshold", replace_at_end=False, eval_both=True)
    slow = EMATrainerCallback(
        decay=SLOW, name="slow"
    )  # replace_at_end=True by default: ignored by a secondary
    out = tmp_path / "ema"
    trainer, rec = train(out, model, [fast, slow] if primary_first else [slow, fast], eval_data, **RUN)

    # The training trajectory is the one of the run without hf_ema, bit for bit: same losses, same final weights.
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    assert losses == [(h["step"], h["loss"]) for h in base.state.log_history if "loss" in h]
    assert len(losses) == 12
    assert same_bits(snapshot(model), snapshot(base_model))
    assert rec.leaks == []

    hist = np_hist(rec.history)
    ref_fast = {s: reference_ema(hist[: s + 1], decays_for("threshold", FAST, s)) for s in (0, 4, 8, 12)}
    ref_slow = {s: reference_ema(hist[: s + 1], decays_for("constant", SLOW, s)) for s in (0, 4, 8, 12)}
    assert_close_to(fast.ema.state_dict()["ema"], ref_fast[12])
    assert_close_to(slow.ema.state_dict()["ema"], ref_slow[12])
    assert fast.ema.step == slow.ema.step == 12
    # the two EMAs really differ from each other and from the training weights (the checks above can fail)
    assert max(float(np.abs(ref_fast[12][n] - ref_slow[12][n]).max()) for n in ref_slow[12]) > 1e-3
    assert max(float(np.abs(hist[12][n] - ref_slow[12][n]).max()) for n in ref_slow[12]) > 1e-3

    # Each evaluation saw the weights it reports: the Trainer's own (eval_*) the primary's EMA, eval_raw_* the
    # training weights, eval_ema_slow_* the secondary's EMA.
    kinds = [(step, key) for step, key, _ in rec.evals]
    assert kinds == [
        (s, k) for s in (0, 4, 8, 12) for k in ("eval_loss", "eval_raw_loss", "eval_ema_slow_loss")
    ]
    for step, key, weights in rec.evals:
        want = {
            "eval_loss": ref_fast[step],
            "eval_ema_slow_loss": ref_slow[step],
            "eval_raw_loss": hist[step],
        }
        assert_close_to(weights, want[key])

    # The secondary's metrics are logged under its prefix and equal an independent evaluation of its EMA.
    logged = {h["step"]: h for h in trainer.state.log_history if "eval_ema_slow_loss" in h}
    assert sorted(logged) == [0, 4, 8, 12]
    for step in (4, 12):
        want = eval_loss_of(ref_slow[step], eval_data, tmp_path / "check")
        assert logged[step]["eval_ema_slow_loss"] == pytest.approx(want, rel=1e-5)
    primary_logs = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert primary_logs[12] == pytest.approx(eval_loss_of(ref_fast[12], eval_data, tmp_path / "c2"), rel=1e-5)
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("ema_decay" in h and h["ema_slow_decay"] == SLOW for h in train_logs)

    # Each checkpoint holds both EMAs, each in its own folder, and the training weights as its regular weights.
    for step in (4, 8, 12):
        ckpt = out / f"checkpoint-{step}"
        assert sorted(p.name for p in ckpt.iterdir() if "ema" in p.name) == ["ema_net", "ema_net-slow"]
        assert_close_to(load_file(str(ckpt / "ema_net" / "model.safetensors")), ref_fast[step])
        assert_close_to(load_file(str(ckpt / "ema_net-slow" / "model.safetensors")), ref_slow[step])
        meta = json.loads((ckpt / "ema_net-slow" / "ema_state.json").read_text())
        assert (meta["name"], meta["decay"], meta["step"]) == ("slow", SLOW, step)
        assert json.loads((ckpt / "ema_net" / "ema_state.json").read_text())["name"] is None
        regular = load_file(str(ckpt / "model.safetensors"))
        assert all(torch.equal(regular[n], t) for n, t in rec.history[step].items())

    # load_model picks either EMA of a checkpoint
    loaded = hf_ema.load_model(DropNet(seed=5), out / "checkpoint-8", ema="slow")
    assert_close_to(dict(loaded.named_parameters()), ref_slow[8])
    loaded = hf_ema.load_model(DropNet(seed=5), out / "checkpoint-8")
    assert_close_to(dict(loaded.named_parameters()), ref_fast[8])


def _trainer_cannot_load_its_rng_state() -> bool:
    import inspect

    src = inspect.getsource(Trainer._load_rng_state)
    new_torch = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 6)
    return new_torch and "torch.load(rng_file)" in src


@pytest.mark.skipif(
    _trainer_cannot_load_its_rng_state(),
    reason="this transformers Trainer cannot resume under torch>=2.6 (torch.load of rng_state.pth, weights_only)",
)
def test_resume_restores_every_ema_from_its_own_folder(tmp_path):
    eval_data = ToyDataset(32, seed=1)
    args = dict(RUN, eval_on_start=False)

    def callbacks():
        return [
            EMATrainerCallback(decay=FAST, decay_type="threshold"),
            EMATrainerCallback(decay=SLOW, name="slow", update_every=2),
        ]

    full = callbacks()
    train(tmp_path / "full", TinyNet(), full, eval_data, **args)
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-8", out / "checkpoint-8")
    resumed = callbacks()
    _, rec = train(out, TinyNet(seed=77), resumed, eval_data, resume=str(out / "checkpoint-8"), **args)
    assert rec.start_step == 8
    for a, b in zip(full, resumed, strict=True):
        assert b.ema.step == 12 and b.ema.num_updates == a.ema.num_updates
        got, want = b.ema.state_dict()["ema"], a.ema.state_dict()["ema"]
        assert all(torch.equal(got[n], want[n]) for n in want)
    # the two EMAs were restored from different folders (not both from ema_net)
    assert not same_bits(resumed[0].ema.state_dict()["ema"], resumed[1].ema.state_dict()["ema"])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: [(cb := EMATrainerCallback(decay=0.9)), cb], "listed 2 times"),
        (lambda: [(cb := EMATrainerCallback(decay=0.9, name="a")), cb], "listed 2 times"),
        (lambda: [EMATrainerCallback(decay=0.9), EMATrainerCallback(decay=0.99)], "without a name"),
        (
            lambda: [EMATrainerCallback(decay=0.9, name="a"), EMATrainerCallback(decay=0.99, name="a")],
            "named 'a'",
        ),
        (
            lambda: [
                EMATrainerCallback(decay=0.9),
                EMATrainerCallback(decay=0.99, name="a", eval_prefix="eval_x"),
                EMATrainerCallback(decay=0.999, name="b", eval_prefix="eval_x"),
            ],
            "eval_x",
        ),
        (
            lambda: [
                EMATrainerCallback(decay=0.9, eval_both=True),
                EMATrainerCallback(name="a", eval_prefix="eval_raw"),
            ],
            "eval_raw",
        ),
    ],
    ids=["same-object", "same-named-object", "two-unnamed", "two-same-name", "same-prefix", "raw-prefix"],
)
def test_duplicates_are_refused_before_any_step(tmp_path, make, match):
    model = TinyNet()
    before = snapshot(model)
    steps = []

    class StepSpy(Recorder):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=1),
        train_dataset=ToyDataset(64),
        callbacks=[StepSpy(model), *make()],
    )
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert steps == [] and trainer.state.global_step == 0
    assert same_bits(snapshot(model), before)
    assert not list(tmp_path.glob("checkpoint-*"))
    assert "_EMADecayLog" not in [type(c).__name__ for c in trainer.callback_handler.callbacks]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": ""}, "name"),
        ({"name": "a/b"}, "name"),
        ({"name": ".."}, "name"),
        ({"name": 3}, "name"),
        ({"eval_prefix": "eval_x"}, "eval_prefix"),
        ({"name": "a", "eval_prefix": "eval"}, "eval_prefix"),
        ({"name": "a", "eval_prefix": "eval x"}, "eval_prefix"),
        ({"name": "a", "evaluate": 1}, "evaluate"),
    ],
)
def test_bad_names_fail_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EMATrainerCallback(**kwargs)


def test_secondary_with_evaluate_false_is_not_evaluated_but_saved(tmp_path):
    model = TinyNet()
    quiet = EMATrainerCallback(decay=SLOW, name="quiet", evaluate=False)
    trainer, rec = train(
        tmp_path,
        model,
        [EMATrainerCallback(decay=FAST), quiet],
        ToyDataset(32, seed=1),
        **dict(RUN, max_steps=8),
    )
    assert not any(k.startswith("eval_ema_quiet") for h in trainer.state.log_history for k in h)
    assert [(s, k) for s, k, _ in rec.evals] == [(0, "eval_loss"), (4, "eval_loss"), (8, "eval_loss")]
    ref = reference_ema(np_hist(rec.history), decays_for("constant", SLOW, 8))
    assert_close_to(load_file(str(tmp_path / "checkpoint-8" / "ema_net-quiet" / "model.safetensors")), ref)


def test_all_named_the_first_listed_is_primary(tmp_path):
    model = TinyNet()
    first = EMATrainerCallback(decay=FAST, name="fast")
    second = EMATrainerCallback(decay=SLOW, name="slow")
    trainer, rec = train(tmp_path, model, [first, second], ToyDataset(32, seed=1), **dict(RUN, max_steps=8))
    hist = np_hist(rec.history)
    # replace_at_end (default True) applies to the primary only: the model ends as the first EMA
    assert_close_to(dict(model.named_parameters()), reference_ema(hist, decays_for("constant", FAST, 8)))
    assert [(s, k) for s, k, _ in rec.evals] == [
        (s, k) for s in (0, 4, 8) for k in ("eval_loss", "eval_ema_slow_loss")
    ]
    assert_close_to(rec.evals[-2][2], reference_ema(hist, decays_for("constant", FAST, 8)))
    assert_close_to(rec.evals[-1][2], reference_ema(hist, decays_for("constant", SLOW, 8)))
    assert sorted(p.name for p in (tmp_path / "checkpoint-8").iterdir() if "ema" in p.name) == [
        "ema_net-fast",
        "ema_net-slow",
    ]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["ema_fast_decay"] == FAST and logs[-1]["ema_slow_decay"] == SLOW


# ---------------------------------------------------------------------------------------------- Accelerate
def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def _steps(acc, model, opt, emas, start, n, history=None):
    for step in range(start, start + n):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
        acc.backward(nn.functional.mse_loss(model(x), y))
        opt.step()
        opt.zero_grad()
        for ema in emas:
            ema.update()
        if history is not None:
            history.append(record(acc.unwrap_model(model).state_dict().items()))


def _setup(seed):
    acc = Accelerator(cpu=True)
    model = _mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model, opt = acc.prepare(model, opt)
    fast = EMAState(model, decay=FAST, decay_type="threshold", accelerator=acc)
    slow = EMAState(model, decay=SLOW, accelerator=acc, name="slow")
    return acc, model, opt, fast, slow


def test_two_emastates_on_one_accelerator_save_and_load_separately(tmp_path):
    acc, model, opt, fast, slow = _setup(0)
    history = [record(acc.unwrap_model(model).state_dict().items())]
    _steps(acc, model, opt, [fast, slow], 0, 4, history)
    acc.save_state(str(tmp_path / "ckpt"))
    ref_fast = reference_ema(history, decays_for("threshold", FAST, 4))
    ref_slow = reference_ema(history, decays_for("constant", SLOW, 4))
    assert_close_to(load_file(str(tmp_path / "ckpt" / "ema_net" / "model.safetensors")), ref_fast)
    assert_close_to(load_file(str(tmp_path / "ckpt" / "ema_net-slow" / "model.safetensors")), ref_slow)
    assert max(float(np.abs(ref_fast[n] - ref_slow[n]).max()) for n in ref_slow) > 1e-3
    _steps(acc, model, opt, [fast, slow], 4, 3)

    acc_b, model_b, opt_b, fast_b, slow_b = _setup(42)  # other weights: everything comes from the checkpoint
    acc_b.load_state(str(tmp_path / "ckpt"))
    assert (fast_b.step, slow_b.step) == (4, 4)
    assert_close_to(fast_b.state_dict()["ema"], ref_fast)
    assert_close_to(slow_b.state_dict()["ema"], ref_slow)
    _steps(acc_b, model_b, opt_b, [fast_b, slow_b], 4, 3)
    for a, b in ((fast, fast_b), (slow, slow_b)):
        for n, t in a.state_dict()["ema"].items():
            torch.testing.assert_close(b.state_dict()["ema"][n], t, rtol=0, atol=1e-7, msg=n)


def test_same_name_twice_on_one_accelerator_is_refused():
    acc = Accelerator(cpu=True)
    model = acc.prepare(_mlp(0))
    first = EMAState(model, decay=FAST, accelerator=acc)
    with pytest.raises(ValueError, match="same `ema_net` folder"):
        EMAState(model, decay=SLOW, accelerator=acc)
    named = EMAState(model, decay=SLOW, accelerator=acc, name="slow")
    with pytest.raises(ValueError, match="named 'slow'"):
        EMAState(model, decay=0.5, accelerator=acc, name="slow")
    EMAState(model, decay=SLOW, accelerator=Accelerator(cpu=True))  # another accelerator: its own folders
    del first, named
    import gc

    gc.collect()
    EMAState(model, decay=SLOW, accelerator=acc)  # the name is free again once the first EMA is gone


# ---------------------------------------------------------------------------------------------- loading
@pytest.fixture
def two_ema_checkpoint(tmp_path):
    model = tiny_bert(seed=0)
    fast = EMAState(model, decay=0.6)
    slow = EMAState(model, decay=0.9, name="slow")

    class Both:
        def update(self):
            fast.update()
            return slow.update()

    history, _ = drive(Both(), model, 5, seed=1, scale=0.05)
    path = tmp_path / "checkpoint-5"
    model.save_pretrained(path)
    fast.save(path)
    slow.save(path)
    return (
        path,
        reference_ema(history, decays_for("constant", 0.6, 5)),
        reference_ema(history, decays_for("constant", 0.9, 5)),
    )


def test_load_model_picks_the_named_ema(two_ema_checkpoint):
    path, ref_fast, ref_slow = two_ema_checkpoint
    assert has_ema(path) and has_ema(path, "slow") and not has_ema(path, "other")
    by_default = hf_ema.load_model(BertForSequenceClassification, path)
    assert_close_to(dict(by_default.named_parameters()), ref_fast)
    named = hf_ema.load_model(BertForSequenceClassification, path, ema="slow")
    assert_close_to(dict(named.named_parameters()), ref_slow)
    # a plain module, loaded in place
    module = hf_ema.load_model(tiny_bert(seed=3), path, ema="slow")
    assert_close_to(dict(module.named_parameters()), ref_slow)
    # EMAState.load picks the folder by name, and keeps the name for its next save
    rebuilt = EMAState.load(path, tiny_bert(seed=3), name="slow")
    assert rebuilt.name == "slow" and rebuilt.decay == 0.9 and rebuilt.step == 5
    assert_close_to(rebuilt.state_dict()["ema"], ref_slow)
    from_folder = EMAState.load(path / "ema_net-slow", tiny_bert(seed=3))
    assert from_folder.name == "slow"


def test_load_model_named_ema_missing_is_an_error(two_ema_checkpoint):
    path, _, _ = two_ema_checkpoint
    with pytest.raises(EMAFileError, match="ema_net-other"):
        hf_ema.load_model(BertForSequenceClassification, path, ema="other")
    with pytest.raises(ValueError, match="prefer_ema"):
        hf_ema.load_model(BertForSequenceClassification, path, ema="slow", prefer_ema=False)
    with pytest.raises(ValueError, match="name"):
        hf_ema.load_model(BertForSequenceClassification, path, ema="../x")


def test_named_ema_leftovers_stay_apart(tmp_path):
    """Recovery of an interrupted save and clean-up of leftovers touch one EMA's folders only, even when another
    EMA's name starts alike (``a`` and ``a.old-x``)."""
    model = tiny_mlp(seed=0)
    a = EMAState(model, decay=0.5, name="a")
    other = EMAState(model, decay=0.5, name="a.old-x")
    drive(other, model, 2)
    other.save(tmp_path)
    # a save of `other` interrupted between its renames leaves only its previous folder, under a temporary name
    leftover = tmp_path / ".ema_net-a.old-x.old-1234abcd"
    (tmp_path / "ema_net-a.old-x").rename(leftover)
    a.save(tmp_path)  # removes its own stale `.ema_net-a.old-????????` folders, not the leftover above
    assert leftover.is_dir()
    assert has_ema(tmp_path, "a.old-x") and not has_ema(tmp_path, "b")
    restored = EMAState(tiny_mlp(seed=3), decay=0.5, name="a.old-x").load(tmp_path)
    assert restored.step == 2
    assert all(torch.equal(restored.state_dict()["ema"][n], t) for n, t in other.state_dict()["ema"].items())


def test_ema_name_flag():
    from transformers import HfArgumentParser

    from hf_ema import EMAArguments

    (args,) = HfArgumentParser(EMAArguments).parse_args_into_dataclasses(["--ema", "--ema_name", "slow"])
    (cb,) = args.callbacks()
    assert cb.name == "slow" and cb.eval_prefix == "eval_ema_slow"
    assert "name" not in EMAArguments(ema=True).callback_kwargs()  # unset: the callback's default
    with pytest.raises(ValueError, match="name"):
        EMAArguments(ema=True, ema_name="a/b")
