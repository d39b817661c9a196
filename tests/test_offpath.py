"""Off the tested paths: features combined the way user scripts combine them, each result checked against an
independent NumPy (float64) computation over the recorded weights, plus cases ported (in our own words) from the
peers' suites: diffusers' ``EMAModel`` tests (step counting, an unchanged model, save/load round trips),
torch_ema's (store/restore, state-dict round trips), torch ``swa_utils``' (BatchNorm buffers).

Each expected EMA is computed here from the definition ``ema <- D * ema + (1 - D) * theta`` on averaging steps
(``t % N == 0``, ``D = d_t ** N``, ``t`` 1-based), with the schedules written out below, never by hf_ema.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from _torchrun import ROOT, load_history, run_torchrun
from _trainer_utils import Recorder, TinyNet, ToyDataset, same_bits, snapshot, training_args
from reference import tiny_bert
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback

from hf_ema import EMAState, EMATrainerCallback, load_model

TOL = dict(rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the reference
def threshold(decay: float, t: int) -> float:
    return min(decay, (1 + t) / (10 + t))


def warmup(
    decay: float, t: int, power: float, after: int, inv_gamma: float = 1.0, min_decay: float = 0.0
) -> float:
    """timm ModelEmaV3 / diffusers EMAModel warm-up, on 1-based steps: the first ``after + 1`` steps copy."""
    s = t - after - 1
    if s <= 0:
        return 0.0
    return max(min(1.0 - (1.0 + s / inv_gamma) ** -power, decay), min_decay)


def ref_ema(history, decay_of, every: int = 1, names=None) -> dict[str, np.ndarray]:
    """``history[0]``: weights when the EMA was built; ``history[t]``: after optimizer step ``t``."""
    names = list(history[0]) if names is None else names
    ema = {k: np.asarray(history[0][k], dtype=np.float64).copy() for k in names}
    for t in range(1, len(history)):
        if t % every:
            continue
        d = decay_of(t) ** every
        for k in names:
            ema[k] = d * ema[k] + (1.0 - d) * np.asarray(history[t][k], dtype=np.float64)
    return ema


def as_np(tensors) -> dict[str, np.ndarray]:
    return {k: v.detach().double().cpu().numpy() for k, v in tensors.items()}


def assert_close(got, want) -> None:
    got = as_np(got)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, err_msg=k, **TOL)


def nudge(model: nn.Module, gen: torch.Generator, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))


# ---------------------------------------------------------------------------------------------- bugs found
class AtTrainBegin(TrainerCallback):
    """Snapshots the model at on_train_begin; listed after the EMA callback, it sees what the EMA left there."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen.append(snapshot(self.model))


@pytest.mark.parametrize("secondary", [False, True], ids=["one-ema", "secondary-listed-first"])
def test_train_after_a_run_interrupted_in_evaluation_starts_from_training_weights(tmp_path, secondary):
    """Bug: a run stopped inside an evaluation (an error in compute_metrics, a KeyboardInterrupt in a notebook)
    left the EMA swapped into the model; the next ``trainer.train()`` built its EMA from those weights and trained
    on from them: the training weights were silently lost. With a secondary EMA listed before the primary, the
    secondary's new EMA starts from the training weights too."""
    calls = []

    def metrics(_):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt("stopped during the first evaluation")
        return {}

    model = TinyNet()
    rec = Recorder(model)
    cb = EMATrainerCallback(decay=0.5)
    slow = [EMATrainerCallback(decay=0.8, name="slow")] if secondary else []
    probe = AtTrainBegin(model)
    args = training_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ToyDataset(64),
        eval_dataset=ToyDataset(16, seed=1),
        compute_metrics=metrics,
        callbacks=[rec, *slow, cb, probe],
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trained = rec.history[-1]  # the training weights after step 2, when the evaluation began
    trainer.train()
    assert same_bits(probe.seen[1], trained), "the second run did not start from the training weights"
    # and its EMA starts there too (the recorder, listed first, snapshotted the model before the EMA callback
    # put the training weights back: the run's start is the probe's)
    history = as_hist([probe.seen[1], *rec.history[1:]])
    assert_close(cb.ema.state_dict()["ema"], ref_ema(history, lambda t: 0.5))
    if secondary:
        assert_close(slow[0].ema.state_dict()["ema"], ref_ema(history, lambda t: 0.8))


def as_hist(history):
    return [as_np(h) for h in history]


def test_callback_bound_to_an_earlier_trainer_follows_the_one_that_trains(tmp_path):
    """Bug: a callback bound (``bind``, as the docs show for eval_both) to a first Trainer that is still alive
    and reused in a second Trainer (a k-fold loop) built its EMA on the first Trainer's model and evaluated
    that Trainer: the second run's ``eval_*`` metrics were of its training weights, ``eval_raw_*`` of the other
    model, silently."""
    cb = EMATrainerCallback(decay=0.5, eval_both=True)
    trainers, recs = [], []
    for fold in range(2):
        model = TinyNet(seed=fold)
        rec = Recorder(model)
        args = training_args(tmp_path / str(fold), max_steps=3, eval_strategy="steps", eval_steps=3)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=ToyDataset(64, seed=fold),
            eval_dataset=ToyDataset(16, seed=1),
            callbacks=[rec, cb],
        )
        if fold == 0:
            cb.bind(trainer)
        trainer.train()
        trainers.append(trainer)
        recs.append(rec)
    model = trainers[1].model
    assert cb.ema.model is model
    hist = as_hist(recs[1].history)
    assert_close(recs[1].eval_weights[3], ref_ema(hist, lambda t: 0.5))
    raw = [h["eval_raw_loss"] for h in trainers[1].state.log_history if "eval_raw_loss" in h]
    with torch.no_grad():
        model.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in hist[-1].items()})
    assert raw == [pytest.approx(trainers[1].evaluate()["eval_loss"], rel=1e-6)]


def test_update_inside_accumulate_counts_only_real_optimizer_steps():
    """Bug: with ``accelerator.accumulate`` and ``ema.update()`` called inside the block (right after
    ``optimizer.step()``, where many scripts put it), every micro-batch was counted and averaged, although the
    prepared optimizer steps only when ``sync_gradients``: 2x the steps, the decay applied twice per step."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=2)
    model, opt, data = acc.prepare(model, opt, data)
    ema = EMAState(model, decay=0.9, decay_type="threshold", accelerator=acc)
    history = [as_np(model.state_dict())]
    decays = []
    for (x,) in data:
        with acc.accumulate(model):
            acc.backward(model(x).pow(2).mean())
            opt.step()
            opt.zero_grad()
            decays.append(ema.update())
        if acc.sync_gradients:
            history.append(as_np(model.state_dict()))
    steps = len(history) - 1
    assert steps == 4 and (ema.step, ema.num_updates) == (4, 4)
    assert decays[0::2] == [None] * 4  # the micro-batches without an optimizer step
    assert decays[1::2] == [pytest.approx(threshold(0.9, t)) for t in range(1, 5)]
    assert_close(ema.state_dict()["ema"], ref_ema(history, lambda t: threshold(0.9, t)))


@pytest.mark.parametrize("time_unit", ["steps", "samples"])
def test_power_ema_with_the_batch_scaling_rule_is_refused(time_unit):
    """Bug: decay_type="power" with reference_batch_size applied ((1 - 1/t)**(gamma + 1)) ** (B / B_ref), the
    power profile of another gamma (3 -> 7 at B = 2 B_ref), so the sigma_rel asked for was silently not the one
    averaged; with time_unit="samples" the first update no longer copied. The power EMA is relative to training
    time, batch-size free already: the combination is refused, in EMAState and in the Trainer callback."""
    kwargs = dict(decay_type="power", gamma=3.0, reference_batch_size=32, time_unit=time_unit)
    with pytest.raises(ValueError, match="reference_batch_size=32 with decay_type='power'"):
        EMAState(nn.Linear(2, 2), batch_size=64, **kwargs)
    with pytest.raises(ValueError, match="reference_batch_size=32 with decay_type='power'"):
        EMATrainerCallback(**kwargs)
    ema = EMAState(nn.Linear(2, 2), decay_type="power", gamma=3.0)  # without the rule: the power profile
    assert [ema.update() for _ in range(4)] == pytest.approx([(1 - 1 / t) ** 4 for t in range(1, 5)])


@pytest.mark.parametrize("flag", [False, 0])
def test_supergradients_dict_with_ema_off_is_refused(flag):
    """Bug: ``from_params({"ema": False, ...})`` built an EMA and averaged although the dict switches it off."""
    params = {"ema": flag, "decay": 0.9, "decay_type": "constant"}
    with pytest.raises(ValueError, match="switches the EMA off"):
        EMATrainerCallback.from_params(params)
    with pytest.raises(ValueError, match="switches the EMA off"):
        EMAState.from_params(nn.Linear(2, 2), params)
    for on in (True, None):  # explicitly on, or unspecified: built
        assert EMAState.from_params(nn.Linear(2, 2), {**params, "ema": on}).decay == 0.9


# ---------------------------------------------------------------------------------------------- two processes
@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("offpath_dist")
    run_torchrun(ROOT / "tests" / "offpath_worker.py", str(out), timeout=240, label="offpath_worker")
    return out


def test_ema_built_before_prepare_with_accumulation_resumes_exactly_on_two_processes(two_process_run):
    """EMAState built before ``accelerator.prepare`` (same seed on every rank), gradient accumulation 2,
    ``update_every=2``, ``save_state`` after step 3 (mid-interval), a fresh model (other seed) + EMA built before
    prepare, ``load_state``, 3 more steps: every rank's EMA equals the NumPy EMA of the recorded history."""
    for rank in (0, 1):
        history = load_history(two_process_run / f"hist{rank}.safetensors")
        assert len(history) == 1 + 3 + 3
        meta = json.loads((two_process_run / f"meta{rank}.json").read_text())
        assert meta == {"step": 6, "num_updates": 3}
        want = ref_ema(history, lambda t: threshold(0.7, t), every=2)
        assert_close(load_file(str(two_process_run / f"ema{rank}.safetensors")), want)


def test_save_state_on_the_main_process_only_does_not_hang(tmp_path):
    """Bug: the save hook waited for every process after writing ema_net, so a script that calls
    ``accelerator.save_state`` on the main process only (diffusers' training scripts do, under DDP; Accelerate
    itself needs no other rank then) hung: the main process waited in a barrier the others never reached."""
    run_torchrun(
        ROOT / "tests" / "offpath_worker.py", str(tmp_path), "main_only_save", timeout=90, label="main-only"
    )
    assert [json.loads((tmp_path / f"done{r}.json").read_text()) for r in (0, 1)] == [{"step": 4}] * 2
    saved = load_file(str(tmp_path / "main_only" / "ema_net-mainonly" / "model.safetensors"))
    want = load_file(str(tmp_path / "saved_ema.safetensors"))
    assert same_bits(saved, want)


def test_ema_built_before_prepare_is_the_same_on_every_rank_without_a_seed(two_process_run):
    a = load_file(str(two_process_run / "unseeded0.safetensors"))
    b = load_file(str(two_process_run / "unseeded1.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("param/"))  # DDP synced the weights
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("ema/"))


# ---------------------------------------------------------------------------------------------- EMAState combos
def test_warmup_update_every_resumed_mid_interval_matches_the_reference(tmp_path):
    """warmup (power 3/4, two extra copying steps) + update_every=3, saved after step 7 (mid-interval) and
    loaded into a new EMAState of the same model; 14 steps in all."""
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    kwargs = dict(decay=0.99, decay_type="warmup", update_every=3, warmup_power=0.75, update_after_step=2)
    ema = EMAState(model, **kwargs)
    history = [as_np(model.state_dict())]
    for t in range(1, 15):
        nudge(model, gen)
        history.append(as_np(model.state_dict()))
        ema.update()
        if t == 7:
            ema.save(tmp_path)
            ema = EMAState.load(tmp_path, model)
            assert (ema.step, ema.num_updates) == (7, 2)
    assert (ema.step, ema.num_updates) == (14, 4)
    assert_close(ema.state_dict()["ema"], ref_ema(history, lambda t: warmup(0.99, t, 0.75, 2), every=3))


def test_bf16_model_fp32_ema_swap_and_copy_to():
    """bf16 weights, fp32 EMA: the EMA keeps fp32 precision; swapping in puts its bf16 rounding in the model and
    puts the training weights back bitwise; copy_to writes the rounding into a bf16 copy and the exact values
    into an fp32 one."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(torch.bfloat16)
    ema = EMAState(model, decay=0.9)
    history = [as_np(model.state_dict())]
    for _ in range(5):
        nudge(model, gen)
        history.append(as_np(model.state_dict()))
        ema.update()
    floats = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    tensors = ema.state_dict()["ema"]
    assert all(tensors[k].dtype == torch.float32 for k in floats)
    assert_close(tensors, ref_ema(history, lambda t: 0.9, names=floats))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.average_parameters():
        inside = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(inside[k], tensors[k].to(torch.bfloat16)) for k in floats)
    low, full = (
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(torch.bfloat16),
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
    )
    ema.copy_to(low)
    ema.copy_to(full)
    assert all(torch.equal(low.state_dict()[k], tensors[k].to(torch.bfloat16)) for k in floats)
    assert all(torch.equal(full.state_dict()[k], tensors[k]) for k in floats)


@pytest.mark.parametrize("buffers", ["average", "copy", "ignore"])
def test_batchnorm_buffers_modes_in_evaluation(buffers):
    """BatchNorm running statistics under each ``buffers`` mode: what an evaluation inside average_parameters()
    sees, and that the training statistics come back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    start = as_np(model.state_dict())
    ema = EMAState(model, decay=0.5, buffers=buffers)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    model.train()
    model(x)  # the statistics move; the parameters do not
    ema.update()
    now = as_np(model.state_dict())
    want = {
        "average": {k: 0.5 * start[k] + 0.5 * now[k] for k in ("1.running_mean", "1.running_var")},
        "copy": {k: now[k] for k in ("1.running_mean", "1.running_var")},
        "ignore": {k: now[k] for k in ("1.running_mean", "1.running_var")},
    }[buffers]
    model.eval()
    with ema.average_parameters():
        assert_close(dict(model.named_buffers()), want)
        assert int(model[1].num_batches_tracked) == 1
    assert_close(dict(model.named_buffers()), {k: now[k] for k in want})


# ---------------------------------------------------------------------------------------------- Trainer combos
def test_load_best_model_at_end_with_a_scaled_secondary(tmp_path):
    """load_best_model_at_end with save_total_limit=1, a primary with the batch scaling rule (B = 8 x 2
    accumulation = 16 vs B_ref = 8: d**2 per step) and a named secondary (B_ref = 32: d**0.5, update_every=2):
    the model ends with the primary's EMA of the best step; the secondary keeps its own last EMA."""
    model = TinyNet()
    rec = Recorder(model)
    cbs = [
        EMATrainerCallback(decay=0.6, reference_batch_size=8),
        EMATrainerCallback(decay=0.9, name="slow", reference_batch_size=32, update_every=2),
    ]
    args = training_args(
        tmp_path,
        max_steps=8,
        gradient_accumulation_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        save_total_limit=1,
        learning_rate=1.0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ToyDataset(128),
        eval_dataset=ToyDataset(32, seed=1),
        callbacks=[rec, *cbs],
    )
    trainer.train()
    hist = as_hist(rec.history)
    best = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert_close(dict(model.named_parameters()), ref_ema(hist[: best + 1], lambda t: 0.6**2))
    assert_close(cbs[1].ema.state_dict()["ema"], ref_ema(hist, lambda t: 0.9**0.5, every=2))
    logged = [h for h in trainer.state.log_history if "eval_ema_slow_loss" in h]
    assert [h["step"] for h in logged] == [2, 4, 6, 8]
    assert not rec.leaks


def test_peft_lora_two_trainable_only_emas_each_loads(tmp_path):
    """PEFT LoRA (+ modules_to_save), trainable_only, two EMAs (the secondary with update_every=2): each checkpoint
    EMA loads through load_model(ema=...) and through PeftModel.from_pretrained as the adapter's EMA."""
    peft = pytest.importorskip("peft")
    tiny_bert(seed=0).save_pretrained(tmp_path / "base")

    def base():
        return AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "base"))

    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )
    model = peft.get_peft_model(base(), config)
    rec = Recorder(model)
    cbs = [
        EMATrainerCallback(decay=0.7, trainable_only=True, replace_at_end=False),
        EMATrainerCallback(decay=0.9, trainable_only=True, name="slow", update_every=2),
    ]
    args = training_args(
        tmp_path / "out", max_steps=4, save_strategy="steps", save_steps=4, learning_rate=2.0
    )
    Trainer(model=model, args=args, train_dataset=ToyDataset(48, tokens=True), callbacks=[rec, *cbs]).train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    hist = as_hist(rec.history)
    wants = {None: ref_ema(hist, lambda t: 0.7, names=names), "slow": ref_ema(hist, lambda t: 0.9, 2, names)}
    ckpt = tmp_path / "out" / "checkpoint-4"
    for which, want in wants.items():
        loaded = load_model(AutoModelForSequenceClassification, ckpt, ema=which)
        assert isinstance(loaded, peft.PeftModel)
        assert_close(dict(loaded.named_parameters()), want)
        folder = ckpt / ("ema_net" if which is None else f"ema_net-{which}")
        assert_close(dict(peft.PeftModel.from_pretrained(base(), str(folder)).named_parameters()), want)


# ---------------------------------------------------------------------------------------------- peers' cases
def test_unchanged_model_leaves_the_ema_bitwise_and_counts_steps():
    """diffusers: shadow parameters do not move when the model does not; the optimizer steps are counted, and
    with update_every the averagings too."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMAState(model, decay=0.9, decay_type="threshold", update_every=3)
    start = {k: v.clone() for k, v in ema.state_dict()["ema"].items()}
    for t in range(1, 8):
        assert ema.update() == pytest.approx(threshold(0.9, t))
        assert (ema.step, ema.num_updates) == (t, t // 3)
    assert same_bits(start, ema.state_dict()["ema"])


def test_serialization_round_trip_gives_the_same_outputs(tmp_path):
    """diffusers' serialization case: the EMA model, exported with copy_to + save_pretrained and loaded back,
    computes what the model computes inside average_parameters(); ema_net loads to the same."""
    model = tiny_bert(seed=0)
    model.eval()
    ema = EMAState(model, decay=0.8)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        nudge(model, gen, scale=0.05)
        ema.update()
    ids = torch.randint(1, 40, (2, 8), generator=gen)
    with torch.no_grad(), ema.average_parameters():
        inside = model(input_ids=ids).logits
    export = tiny_bert(seed=5)
    ema.copy_to(export)
    export.save_pretrained(tmp_path / "export")
    ema.save(tmp_path / "ckpt")
    for folder in (tmp_path / "export", tmp_path / "ckpt" / "ema_net"):
        again = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=ids).logits, inside, rtol=0, atol=0)


def test_store_restore_outputs():
    """torch_ema's store/restore: outputs inside the block are those of a model holding the EMA; after it, those
    of the training weights again (bitwise), also after an exception inside the block."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    ema = EMAState(model, decay=0.5)
    nudge(model, torch.Generator().manual_seed(0), scale=0.5)
    ema.update()
    x = torch.randn(5, 4)
    raw = model(x).detach()
    holder = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    ema.copy_to(holder)
    with torch.no_grad(), ema.average_parameters():
        assert torch.equal(model(x), holder(x))
    assert torch.equal(model(x).detach(), raw)
    with pytest.raises(RuntimeError, match="boom"), ema.average_parameters():
        raise RuntimeError("boom")
    assert torch.equal(model(x).detach(), raw)


def test_state_dict_round_trip_into_another_models_ema_continues_identically():
    """torch_ema's state_dict case: an EMA loaded into a fresh EMAState of another model (other weights, same
    architecture) equals the original, and both go on bitwise the same when driven by the same weights."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    b = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema_a = EMAState(a, decay=0.9, decay_type="threshold", update_every=2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        nudge(a, gen)
        ema_a.update()
    # The same settings (loading keeps the loading EMA's own settings and takes the saved state, see test_resume).
    ema_b = EMAState(b, decay=0.9, decay_type="threshold", update_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ema_b.load_state_dict(ema_a.state_dict())
    assert (ema_b.step, ema_b.num_updates, ema_b.decay, ema_b.update_every) == (3, 1, 0.9, 2)
    assert same_bits(ema_a.state_dict()["ema"], ema_b.state_dict()["ema"])
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        nudge(a, gen)
        b.load_state_dict(a.state_dict())
        assert ema_a.update() == ema_b.update()
    assert same_bits(ema_a.state_dict()["ema"], ema_b.state_dict()["ema"])


def test_math_helpers_agree_with_the_docs():
    """The reference schedules above, spot-checked against values the docs state (threshold 2/11 at step 1;
    warmup copies the first update_after_step + 1 steps and gives 1 - 2**(-2/3) next)."""
    assert threshold(0.9999, 1) == 2 / 11
    assert [warmup(0.9999, t, 2 / 3, 0) for t in (1, 2)] == [0.0, 1 - 2 ** (-2 / 3)]
    assert warmup(0.9999, 3, 0.75, 2) == 0.0 and math.isclose(warmup(0.9999, 4, 0.75, 2), 1 - 2**-0.75)


def test_parameters_unfrozen_after_the_ema_was_built_are_averaged_or_reported(caplog):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    ema = EMAState(model, decay=0.5, trainable_only=True)
    model[0].requires_grad_(True)  # gradual unfreezing
    nudge(model, torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="hf_ema"):
        ema.update()
    assert "0.weight" in ema.names or any("0.weight" in r.getMessage() for r in caplog.records)
