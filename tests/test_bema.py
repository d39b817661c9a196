"""BEMA, the bias-corrected EMA (issue 10, item 2): ``decay_type="bema"`` and the engine's bias-corrected read.

The expected values come from independent float64 re-implementations of the two sources' code (read, not copied),
driven the way each source drives it:

* the authors, abblock/bema at ``b98e6337c00d435dd1a20ad7a9b8edf7ac6b3622``: ``src/core_offline.py`` ``BEMA.update``
  with ``BaseStabilizer.get_ema_weights`` (``beta = max((1 + ema_gamma * time) ** -ema_power, min_ema_multiplier)``),
  ``get_ema_time`` / ``get_stabilizer_time`` (``time = max(step - update_after + scaling_lag, 1)``; the EMA's
  ``ema_update_after`` defaults to ``update_after``), ``check_if_update`` (``step >= update_after``) and
  ``get_bema_correction_weights`` (``(1 + time) ** -eta_power``); before ``update_after`` the output model is the
  checkpoint itself, and on the first update after it ``theta_0`` becomes that checkpoint and the EMA starts from
  the previous output model. ``src/run_eval.py`` calls ``update(weights, step)`` with ``step`` the checkpoint number
  (the Trainer's global step) for each checkpoint at least ``update_freq`` steps after the previous one used; here
  checkpoints are saved every ``update_freq`` steps, so it uses all of them.
* TRL, huggingface/trl at ``f2cd57710ae345ea6428ae95363267fcf38a3dc8``: ``trl/trainer/callbacks.py``
  ``BEMACallback.on_step_end`` with ``step = state.global_step``: nothing before ``update_after``; at it, ``theta_0``
  and the EMA become the weights; afterwards on ``(step - update_after) % update_freq == 0`` the EMA averages with
  ``beta = max((lag + multiplier * step) ** -ema_power, min_ema_multiplier)`` and the BEMA model becomes
  ``ema + (lag + multiplier * step) ** -bias_power * (theta - theta_0)``; ``theta_0`` and the EMA start as the
  weights at ``on_train_begin``.

Between two averaging steps (where neither source computes anything new) hf_ema's documented read is checked
against the formula ``EMA_last + alpha_t * (theta_t - theta_0)`` with ``alpha_t`` at the current step.
"""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
from _trainer_utils import Recorder, TinyNet, ToyDataset, training_args
from reference import perturb_, tiny_bert, tiny_bn_net, tiny_mlp, to_numpy
from safetensors.torch import load_file
from transformers import HfArgumentParser, Trainer

from hf_ema import BEMADecay, EMAArguments, EMAState, EMATrainerCallback, load_ema_net

PAPER = {"ema_power": 0.5, "eta_power": 0.2, "ema_gamma": 1.0, "lag": 10, "min_ema_multiplier": 1e-4}


# ------------------------------------------------------------------------------------------------ references
class AuthorsBEMA:
    """The authors' offline ``BEMA`` (see the module docstring), float64, on ``{name: array}`` weights."""

    def __init__(
        self, initial, *, ema_power, eta_power, ema_gamma, scaling_lag, min_ema_multiplier, update_after
    ):
        self.kappa, self.eta, self.gamma = ema_power, eta_power, ema_gamma
        self.lag, self.floor, self.u = scaling_lag, min_ema_multiplier, update_after
        self.theta0 = copy.deepcopy(initial)
        self.ema = copy.deepcopy(initial)
        self.out = copy.deepcopy(initial)
        self.initialized = update_after == 0

    def time(self, step):
        return max(step - self.u + self.lag, 1)

    def update(self, new, step):
        if step < self.u:
            self.out = copy.deepcopy(new)
            return
        if not self.initialized:
            self.theta0 = copy.deepcopy(new)
            self.ema = copy.deepcopy(self.out)
            self.initialized = True
        beta = max((1 + self.gamma * self.time(step)) ** (-self.kappa), self.floor)
        self.ema = {k: v * (1 - beta) + new[k] * beta for k, v in self.ema.items()}
        m = (1 + self.time(step)) ** (-self.eta)
        self.out = {k: new[k] * m + self.theta0[k] * (-m) + self.ema[k] for k in new}


def authors_run(history, update_freq, **kw):
    """``run_eval.py``'s loop over checkpoints saved every ``update_freq`` steps; ``history[k]``: weights after step
    ``k`` (``history[0]``: the model the stabilizer is built with). Returns the stabilizer after each step used."""
    stab = AuthorsBEMA(history[0], **kw)
    previous, states = -update_freq, {}
    for step in range(update_freq, len(history), update_freq):  # checkpoint-<step> folders
        if step - previous < update_freq:
            continue
        previous = step
        stab.update(history[step], step)
        states[step] = copy.deepcopy(stab)
    return states


class TRLBEMA:
    """TRL's ``BEMACallback`` (see the module docstring), float64."""

    def __init__(
        self,
        initial,
        *,
        update_freq,
        ema_power,
        bias_power,
        lag,
        update_after,
        multiplier,
        min_ema_multiplier,
    ):
        self.phi, self.kappa, self.eta, self.lag = update_freq, ema_power, bias_power, lag
        self.u, self.mult, self.floor = update_after, multiplier, min_ema_multiplier
        self.theta0 = copy.deepcopy(initial)
        self.ema = copy.deepcopy(initial)
        self.out = copy.deepcopy(initial)  # running_model: the model at on_train_begin

    def on_step_end(self, step, theta):
        if step < self.u:
            return
        if step == self.u:
            self.theta0 = copy.deepcopy(theta)
            self.ema = copy.deepcopy(theta)
        elif (step - self.u) % self.phi == 0:
            beta = max((self.lag + self.mult * step) ** (-self.kappa), self.floor)
            alpha = (self.lag + self.mult * step) ** (-self.eta)
            self.ema = {k: v * (1 - beta) + theta[k] * beta for k, v in self.ema.items()}
            self.out = {k: self.ema[k] + alpha * (theta[k] - self.theta0[k]) for k in theta}


def params(model) -> dict[str, np.ndarray]:
    return {n: to_numpy(p) for n, p in model.named_parameters()}


def train(ema, model, steps, *, first=1, scale=0.2):
    """``steps`` fake optimizer steps (step ``k`` moves the weights by noise seeded with ``k``), ``ema.update()``
    after each; returns the weights and what ``ema_state_dict()`` read after each step, by step."""
    history, reads = {}, {}
    for k in range(first, first + steps):
        perturb_(model, torch.Generator().manual_seed(k), scale)
        ema.update()
        history[k] = params(model)
        reads[k] = {n: to_numpy(t) for n, t in ema.ema_state_dict().items()}
    return history, reads


def assert_close(got, want, tol=1e-12):
    assert sorted(got) == sorted(want)
    for n in want:
        np.testing.assert_allclose(np.asarray(got[n]), want[n], rtol=tol, atol=tol, err_msg=n)


# ------------------------------------------------------------------------------------------------ schedule
STEPS = [*range(0, 30), 399, 400, 401, 4000, 10**6]


@pytest.mark.parametrize("u", [0, 7, 400])
@pytest.mark.parametrize("kw", [{}, {"ema_power": 0.75, "eta_power": 0.3, "ema_gamma": 0.5, "lag": 3}])
def test_paper_formulas_are_the_authors(u, kw):
    fn = BEMADecay(update_after=u, **kw)
    conf = {**PAPER, **kw}
    for step in STEPS:
        time = max(step - u + conf["lag"], 1)
        beta = max((1 + conf["ema_gamma"] * time) ** -conf["ema_power"], conf["min_ema_multiplier"])
        assert fn.beta(step) == (1.0 if step < u else pytest.approx(beta, rel=1e-14)), step
        assert fn(0.9999, step, None) == pytest.approx(1 - fn.beta(step), abs=0), step
        assert fn.interval_decay(0.9999, step, None, 400) == fn(
            0.9999, step, None
        )  # no power over the interval
        assert fn.bias_correction(step) == pytest.approx((1 + time) ** -conf["eta_power"], rel=1e-14), step


@pytest.mark.parametrize("u", [0, 8])
def test_trl_formulas_are_trls(u):
    fn = BEMADecay(parameterisation="trl", update_after=u, lag=4, ema_gamma=2.0, ema_power=0.6, eta_power=0.1)
    for step in STEPS[1:]:
        base = 4 + 2.0 * step
        assert fn.beta(step) == (1.0 if step <= u else pytest.approx(base**-0.6, rel=1e-14)), step
        assert fn.bias_correction(step) == pytest.approx(base**-0.1, rel=1e-14), step
    assert fn.min_ema_multiplier == 0.0 and BEMADecay().min_ema_multiplier == 1e-4  # each source's default


def test_paper_and_trl_defaults_are_one_step_apart():
    """Documented: with the defaults the paper's beta and alpha at step t are TRL's at step t + 1."""
    paper, trl = BEMADecay(min_ema_multiplier=0.0), BEMADecay(parameterisation="trl")
    for t in range(1, 50):
        assert paper.beta(t) == pytest.approx(trl.beta(t + 1), rel=1e-14)
        assert paper.bias_correction(t) == pytest.approx(trl.bias_correction(t + 1), rel=1e-14)
        assert paper.beta(t) != pytest.approx(trl.beta(t), rel=1e-6)


def test_theta0_step():
    assert BEMADecay().theta0_step(400) == 0
    assert BEMADecay(update_after=400).theta0_step(400) == 400
    assert BEMADecay(update_after=401).theta0_step(400) == 800  # the first averaging step after update_after
    assert BEMADecay(update_after=5).theta0_step(1) == 5
    assert BEMADecay(parameterisation="trl", update_after=800).theta0_step(400) == 800
    with pytest.raises(ValueError, match=r"update_after=5 must be a multiple of update_every=4"):
        BEMADecay(parameterisation="trl", update_after=5).theta0_step(4)


# ------------------------------------------------------------------------------------------------ engine vs authors
@pytest.mark.parametrize(("phi", "u"), [(1, 0), (1, 6), (4, 0), (4, 6), (3, 9)])
def test_engine_equals_the_authors_bema(phi, u):
    """fp64 weights (the EMA keeps fp64): BEMA read after every step equals the authors' output on their steps and
    the documented read between them; the uncorrected EMA and theta_0 equal theirs too."""
    model = tiny_mlp(seed=1, dtype=torch.float64)
    ema = EMAState(model, decay_type="bema", update_every=phi, update_after=u)
    history = {0: params(model)}
    h, reads = train(ema, model, 26)
    history.update(h)
    seq = [history[k] for k in range(27)]
    kw = {**PAPER, "scaling_lag": PAPER["lag"], "update_after": u}
    del kw["lag"]
    states = authors_run(seq, phi, **kw)
    assert sorted(states) == list(range(phi, 27, phi))
    last = AuthorsBEMA(seq[0], **kw)  # as built: initialized (theta_0 = EMA = the weights) when u = 0
    fn = BEMADecay(update_after=u)
    for k in range(1, 27):
        if k in states:
            last = states[k]
            assert_close(reads[k], last.out)
        elif not last.initialized:  # before averaging starts BEMA is the training weights themselves
            assert_close(reads[k], history[k])
        else:
            alpha = fn.bias_correction(k)
            want = {n: last.ema[n] + alpha * (history[k][n] - last.theta0[n]) for n in history[k]}
            assert_close(reads[k], want)
    sd = ema.state_dict()
    assert_close({n: to_numpy(t) for n, t in sd["ema"].items()}, last.ema)
    assert_close({n: to_numpy(t) for n, t in sd["theta0"].items()}, last.theta0)
    # the correction matters: BEMA is neither the EMA nor the weights
    assert max(np.abs(reads[26][n] - last.ema[n]).max() for n in last.ema) > 1e-3
    assert max(np.abs(reads[26][n] - history[26][n]).max() for n in last.ema) > 1e-3


@pytest.mark.parametrize(("phi", "u"), [(1, 0), (4, 0), (4, 8), (2, 3)])
def test_trl_parameterisation_equals_trls_callback(phi, u):
    model = tiny_mlp(seed=2, dtype=torch.float64)
    if u % phi:
        with pytest.raises(ValueError, match="must be a multiple of update_every"):
            EMAState(model, decay_type="bema", parameterisation="trl", update_every=phi, update_after=u)
        return
    ema = EMAState(model, decay_type="bema", parameterisation="trl", update_every=phi, update_after=u)
    ref = TRLBEMA(
        params(model),
        update_freq=phi,
        ema_power=0.5,
        bias_power=0.2,
        lag=10,
        update_after=u,
        multiplier=1.0,
        min_ema_multiplier=0.0,
    )
    history, reads = train(ema, model, 24)
    for k in range(1, 25):
        ref.on_step_end(k, history[k])
        if k > u and (k - u) % phi == 0:  # TRL writes its BEMA model on these steps only
            assert_close(reads[k], ref.out)
    assert_close({n: to_numpy(t) for n, t in ema.state_dict()["ema"].items()}, ref.ema)
    assert_close({n: to_numpy(t) for n, t in ema.state_dict()["theta0"].items()}, ref.theta0)


def test_short_run_ends_with_trained_weights():
    """Fewer steps than update_every: no averaging yet, but BEMA is theta_0 + alpha_t (theta_t - theta_0), formed from
    the live weights (TRL's callback would still hold the initial weights, the authors' loop no checkpoint)."""
    model = tiny_mlp(seed=3, dtype=torch.float64)
    initial = params(model)
    ema = EMAState(model, decay_type="bema", update_every=400)
    history, reads = train(ema, model, 7)
    alpha = (1 + 7 + 10) ** -0.2
    want = {n: initial[n] + alpha * (history[7][n] - initial[n]) for n in initial}
    assert_close(reads[7], want)
    assert ema.num_updates == 0
    assert min(np.abs(reads[7][n] - initial[n]).max() for n in initial) > 1e-2
    ema.copy_to()  # what replace_at_end does
    assert_close(params(model), want)


# ------------------------------------------------------------------------------------------------ reads and swaps
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_holds_bema_and_restores_the_training_weights_bitwise(dtype):
    model = tiny_bn_net(seed=4).to(dtype)
    ema = EMAState(model, decay_type="bema", update_every=2)
    train(ema, model, 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = ema.ema_state_dict()
    with ema.average_parameters():
        inside = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in want.items():
        assert torch.equal(inside[k], v.to(dtype) if v.is_floating_point() else v), k
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # buffers are not corrected: the BN statistics read are the EMA's own
    assert torch.equal(want["1.running_mean"], ema.state_dict()["ema"]["1.running_mean"])
    assert "1.running_mean" not in ema.state_dict()["theta0"]


def test_writes_inside_the_block_are_kept():
    """update_bn-style writes (buffers) are kept as in any EMA; a write into a parameter is what BEMA reads after."""
    model = tiny_bn_net(seed=5)
    ema = EMAState(model, decay_type="bema")
    train(ema, model, 4)
    raw_before = {k: v.clone() for k, v in ema.state_dict()["ema"].items()}
    with ema.average_parameters() as m:
        m.train()
        m(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)))  # recomputes BN statistics
        m[0].weight.data[0, 0] = 3.0
        written_mean = m[1].running_mean.clone()
    got = ema.ema_state_dict()
    assert torch.equal(got["1.running_mean"], written_mean)
    assert got["0.weight"][0, 0].item() == pytest.approx(3.0, abs=1e-6)
    raw = ema.state_dict()["ema"]["0.weight"]
    changed = (raw != raw_before["0.weight"]).nonzero().tolist()
    assert changed == [[0, 0]]  # every element the block did not write keeps its exact EMA value


def test_copy_to_other_model_and_state_dict_inside_the_block():
    model = tiny_mlp(seed=6)
    ema = EMAState(model, decay_type="bema", update_every=3)
    train(ema, model, 7)
    bema = ema.ema_state_dict()
    raw = {k: v.clone() for k, v in ema.state_dict()["ema"].items()}
    other = tiny_mlp(seed=99)
    with ema.average_parameters():
        assert all(torch.equal(ema.state_dict()["ema"][k], raw[k]) for k in raw)  # the uncorrected EMA
        assert all(torch.equal(ema.ema_state_dict()[k], bema[k]) for k in bema)
        ema.copy_to(other)
    assert all(torch.equal(other.state_dict()[k], bema[k]) for k in bema)


def test_update_after_reads_live_weights_until_averaging_starts():
    model = tiny_mlp(seed=7)
    ema = EMAState(model, decay_type="bema", update_every=2, update_after=5)
    history, reads = train(ema, model, 8)
    for k in range(1, 6):  # theta_0 is taken at step 6, the first averaging step >= 5
        assert_close(reads[k], history[k], tol=0)
    assert ema._bias.taken_step == 6
    assert not np.allclose(reads[7]["0.weight"], history[7]["0.weight"])


def test_trainable_only_and_frozen_parameters():
    model = tiny_mlp(seed=8)
    model[0].weight.requires_grad_(False)
    ema = EMAState(model, decay_type="bema", trainable_only=True)
    assert "0.weight" not in ema.names and "0.weight" not in ema.state_dict()["theta0"]
    _, reads = train(ema, model, 4)
    assert "0.weight" not in reads[4]
    frozen = tiny_mlp(seed=8)
    frozen[0].weight.requires_grad_(False)
    full = EMAState(frozen, decay_type="bema")  # frozen but tracked: theta = theta_0, BEMA = EMA = theta
    _, reads = train(full, frozen, 4)
    assert np.array_equal(reads[4]["0.weight"], to_numpy(frozen[0].weight))


def test_theta0_follows_a_rebind():
    """model.to(float64) after the EMA was built: theta_0 follows like the EMA (fp64 weights keep an fp64 EMA)."""
    model = tiny_mlp(seed=12)
    ema = EMAState(model, decay_type="bema", update_every=2)
    train(ema, model, 3)
    before = {k: v.clone() for k, v in ema.ema_state_dict().items()}
    theta0 = {k: v.clone() for k, v in ema.state_dict()["theta0"].items()}
    model.to(torch.float64)
    after = ema.ema_state_dict()
    moved = ema.state_dict()["theta0"]
    for k in before:
        assert moved[k].dtype == torch.float64 and torch.equal(moved[k], theta0[k].double()), k
        torch.testing.assert_close(after[k], before[k].double(), rtol=1e-6, atol=1e-7)
    train(ema, model, 2, first=4)  # and it goes on


def test_memory_is_two_copies():
    model = tiny_mlp(seed=9)
    plain = EMAState(model, decay_type="constant", decay=0.9)
    bema = EMAState(model, decay_type="bema")
    assert bema.num_bytes() == 2 * plain.num_bytes()


# ------------------------------------------------------------------------------------------------ files and resume
def test_files_hold_bema_for_users_and_the_state_for_resume(tmp_path):
    model = tiny_bert(seed=1)
    ema = EMAState(model, decay_type="bema", update_every=2)
    for k in range(1, 6):
        perturb_(model, torch.Generator().manual_seed(k))
        ema.update()
    d = ema.save(tmp_path)
    names = sorted(p.name for p in d.iterdir())
    assert names == [
        "bema_ema.safetensors",
        "bema_theta0.safetensors",
        "config.json",
        "ema_state.json",
        "model.safetensors",
    ]
    bema = ema.ema_state_dict()
    saved, meta = load_ema_net(tmp_path)
    assert all(torch.equal(saved[k], bema[k]) for k in bema)
    assert meta["bias_correction"] == {"theta0_step": 0} and meta["decay_type"] == "bema"
    raw = load_file(str(d / "bema_ema.safetensors"))
    sd = ema.state_dict()
    assert sorted(raw) == sorted(sd["theta0"]) and all(torch.equal(raw[k], sd["ema"][k]) for k in raw)
    from transformers import BertForSequenceClassification

    loaded = BertForSequenceClassification.from_pretrained(d)
    assert torch.equal(loaded.classifier.weight, bema["classifier.weight"])


@pytest.mark.parametrize("stop", [4, 7])  # before and after theta_0 is taken (step 6)
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, stop):
    kw = dict(decay_type="bema", update_every=3, update_after=5, lag=4, eta_power=0.3)
    full_model = tiny_bn_net(seed=10)
    full = EMAState(full_model, **kw)
    train(full, full_model, 13)

    model = tiny_bn_net(seed=10)
    ema = EMAState(model, **kw)
    train(ema, model, stop)
    ema.save(tmp_path)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model2 = tiny_bn_net(seed=123)
    model2.load_state_dict(weights)
    resumed = EMAState.load(tmp_path, model2)
    assert resumed.step == stop and resumed._bias.taken_step == (6 if stop >= 6 else None)
    train(resumed, model2, 13 - stop, first=stop + 1)
    a, b = full.state_dict(), resumed.state_dict()
    assert a["meta"] == b["meta"]
    for part in ("ema", "theta0"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    fa, fb = full.ema_state_dict(), resumed.ema_state_dict()
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    # load_state_dict / state_dict round trip too
    again = EMAState(tiny_bn_net(seed=5), **kw)
    again.load_state_dict(full.state_dict())
    assert again._bias.taken_step == 6
    assert all(torch.equal(again.state_dict()["theta0"][k], a["theta0"][k]) for k in a["theta0"])


def test_loading_across_bias_correction_is_refused(tmp_path):
    model = tiny_mlp(seed=11)
    EMAState(model, decay=0.9).save(tmp_path / "plain")
    EMAState(model, decay_type="bema").save(tmp_path / "bema")
    with pytest.raises(ValueError, match="is not bias-corrected and this one"):
        EMAState(model, decay_type="bema").load(tmp_path / "plain")
    with pytest.raises(ValueError, match="is bias-corrected and this one"):
        EMAState(model, decay=0.9).load(tmp_path / "bema")
    (tmp_path / "bema" / "ema_net" / "bema_ema.safetensors").unlink()
    with pytest.raises(ValueError, match=r"'bema_ema\.safetensors' is missing"):
        EMAState(model, decay_type="bema").load(tmp_path / "bema")
    ema = EMAState(model, decay_type="bema")
    sd = ema.state_dict()
    del sd["theta0"]
    with pytest.raises(ValueError, match="lacks theta_0"):
        ema.load_state_dict(sd)


# ------------------------------------------------------------------------------------------------ entry points
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"parameterisation": "hf"}, "parameterisation"),
        ({"ema_power": -0.5}, "ema_power"),
        ({"eta_power": float("nan")}, "eta_power"),
        ({"ema_gamma": 0}, "ema_gamma"),
        ({"lag": -1}, "lag"),
        ({"update_after": 1.5}, "update_after"),
        ({"min_ema_multiplier": 2}, "min_ema_multiplier"),
        ({"parameterisation": "trl", "lag": 0, "ema_gamma": 0.5}, "exceed 1"),
        ({"parameterisation": "trl", "update_after": 3, "update_every": 2}, "multiple of update_every"),
        ({"eta_pwr": 0.2}, r"'eta_pwr' \(did you mean 'eta_power'\?\)"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMAState(tiny_mlp(), decay_type="bema", **kwargs)
    with pytest.raises(ValueError, match=match):
        EMATrainerCallback(decay_type="bema", **kwargs)


def test_reachable_from_from_params_and_flags(recwarn):
    ema = EMAState.from_params(tiny_mlp(), {"decay_type": "bema", "update_every": 400, "eta_power": 0.3})
    assert ema.schedule.eta_power == 0.3 and ema.update_every == 400
    assert not [w for w in recwarn if "decay" in str(w.message)]  # BEMA does not use `decay`: no warning
    cb = EMATrainerCallback.from_params({"decay_type": "bema", "parameterisation": "trl", "lag": 5})
    assert cb.ema_kwargs["parameterisation"] == "trl" and cb.ema_kwargs["lag"] == 5
    flags = (
        "--ema --ema_decay_type bema --ema_update_every 400 --ema_ema_power 0.6 --ema_eta_power 0.25 "
        "--ema_ema_gamma 2 --ema_lag 5 --ema_update_after 800 --ema_min_ema_multiplier 0.001 "
        "--ema_parameterisation trl"
    )
    (args,) = HfArgumentParser(EMAArguments).parse_args_into_dataclasses(flags.split())
    cb = EMATrainerCallback.from_args(args)
    model = tiny_mlp()
    built = EMAState(model, **{**cb.ema_kwargs, "total_steps": None})
    assert built.schedule.config() == {
        "ema_power": 0.6,
        "eta_power": 0.25,
        "ema_gamma": 2.0,
        "lag": 5.0,
        "update_after": 800,
        "min_ema_multiplier": 0.001,
        "parameterisation": "trl",
    }
    default = HfArgumentParser(EMAArguments).parse_args_into_dataclasses(["--ema_decay_type", "bema"])[0]
    assert "eta_power" not in default.callback_kwargs()
    with pytest.raises(ValueError, match="eta_power"):
        HfArgumentParser(EMAArguments).parse_args_into_dataclasses(["--ema_eta_power", "0.2"])  # constant


# ------------------------------------------------------------------------------------------------ Trainer
def _np_history(rec):
    return [{k: v.double().numpy() for k, v in h.items()} for h in rec.history]


def test_trainer_callback_evaluates_saves_and_ends_with_bema(tmp_path, caplog):
    model = TinyNet()
    cb = EMATrainerCallback(decay_type="bema", update_every=4, update_after=2)
    rec = Recorder(model)
    args = training_args(
        tmp_path, max_steps=13, eval_strategy="steps", eval_steps=6, save_strategy="steps", save_steps=6
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ToyDataset(64),
        eval_dataset=ToyDataset(32, seed=1),
        callbacks=[rec, cb],
    )
    with caplog.at_level("WARNING", logger="hf_ema.callback"):
        trainer.train()
    assert not [
        r for r in caplog.records if "averages over about" in r.getMessage()
    ]  # no long-horizon warning
    history = _np_history(rec)
    kw = {**PAPER, "scaling_lag": 10, "update_after": 2}
    del kw["lag"]
    states = authors_run(history, 4, **kw)
    fn = BEMADecay(update_after=2)

    def expected(k):  # BEMA read at step k: the authors' on their steps, the documented read between them
        if k in states:
            return states[k].out
        last = states[max(s for s in states if s < k)]
        return {n: last.ema[n] + fn.bias_correction(k) * (history[k][n] - last.theta0[n]) for n in history[k]}

    for k in (6, 12):
        got = {n: v.double().numpy() for n, v in rec.eval_weights[k].items()}
        assert_close(got, expected(k), tol=1e-6)
        saved = load_file(str(tmp_path / f"checkpoint-{k}" / "ema_net" / "model.safetensors"))
        assert_close({n: v.double().numpy() for n, v in saved.items()}, expected(k), tol=1e-6)
    assert_close(params(model), expected(13), tol=1e-6)  # replace_at_end
    assert rec.leaks == []
    logged = [h["ema_decay"] for h in trainer.state.log_history if "ema_decay" in h]
    np.testing.assert_allclose(logged, [1 - fn.beta(k) for k in range(1, 14)], rtol=1e-12, atol=0)


def test_trainer_short_run_and_resume(tmp_path):
    """A run shorter than update_every ends with trained weights; resuming a BEMA run is bitwise exact."""
    model = TinyNet()
    initial = params(model)
    cb = EMATrainerCallback(decay_type="bema", update_every=400)
    rec = Recorder(model)
    Trainer(
        model=model,
        args=training_args(tmp_path / "short", max_steps=5),
        train_dataset=ToyDataset(64),
        callbacks=[rec, cb],
    ).train()
    last = _np_history(rec)[5]
    alpha = (1 + 5 + 10) ** -0.2
    assert_close(params(model), {n: initial[n] + alpha * (last[n] - initial[n]) for n in initial}, tol=1e-6)

    kw = dict(max_steps=12, save_strategy="steps", save_steps=6)
    full = EMATrainerCallback(decay_type="bema", update_every=4, update_after=2)
    Trainer(
        model=TinyNet(),
        args=training_args(tmp_path / "full", **kw),
        train_dataset=ToyDataset(64),
        callbacks=[full],
    ).train()
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-6", out / "checkpoint-6")
    meta = json.loads((out / "checkpoint-6" / "ema_net" / "ema_state.json").read_text())
    assert meta["bias_correction"] == {"theta0_step": 4}
    again = EMATrainerCallback(decay_type="bema", update_every=4, update_after=2)
    Trainer(
        model=TinyNet(seed=7), args=training_args(out, **kw), train_dataset=ToyDataset(64), callbacks=[again]
    ).train(resume_from_checkpoint=str(out / "checkpoint-6"))
    a, b = full.ema.state_dict(), again.ema.state_dict()
    assert a["meta"] == b["meta"]
    for part in ("ema", "theta0"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_math_in_docs_example():
    """README example numbers: beta and alpha at the paper's first averaging step (t = 400)."""
    fn = BEMADecay()
    assert fn.beta(400) == pytest.approx(411**-0.5)
    assert fn.bias_correction(400) == pytest.approx(411**-0.2)
    assert math.isclose(1 - fn(0.9999, 400, None), 411**-0.5)


# ------------------------------------------------------------------------------------------------ FSDP2, 2 processes
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)
def test_fsdp2_two_processes(tmp_path):
    """theta_0 is sharded like the EMA (half the elements per rank), BEMA is gathered into the model's names and
    equals the authors' BEMA of the gathered history, the swap works on shards, resume is bitwise."""
    from pathlib import Path

    from tests._torchrun import load_history, run_torchrun

    run_torchrun(Path(__file__).with_name("bema_worker.py"), str(tmp_path), timeout=240, label="bema worker")
    info = [json.loads((tmp_path / f"info_rank{r}.json").read_text()) for r in (0, 1)]
    for i in info:
        assert i["restored"] and i["inside_is_bema"] and i["resume_bitwise"] and i["resumed_step"] == 5
        assert i["theta0_step"] == 4 and i["local_theta0_numel"] < 0.6 * i["full_numel"]
    assert info[0]["resume_bema_bitwise"] and info[0]["file_names_ok"]
    assert "bema_theta0.safetensors" in info[0]["files"]
    history = load_history(tmp_path / "history.safetensors")
    states = authors_run(
        history,
        2,
        ema_power=0.5,
        eta_power=0.2,
        ema_gamma=1.0,
        scaling_lag=2,
        min_ema_multiplier=1e-4,
        update_after=3,
    )
    last = states[8]  # step 9 is not an averaging step: the documented read with alpha at step 9
    alpha = BEMADecay(update_after=3, lag=2).bias_correction(9)
    want = {n: last.ema[n] + alpha * (history[9][n] - last.theta0[n]) for n in history[9]}
    got = load_file(str(tmp_path / "bema.safetensors"))
    assert_close({n: v.double().numpy() for n, v in got.items()}, want, tol=1e-5)


def test_peft_adapter_is_bema(tmp_path):
    """LoRA with trainable_only: the saved EMA adapter (what PeftModel.from_pretrained loads) holds BEMA."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    torch.manual_seed(0)
    model = peft.get_peft_model(
        tiny_bert(seed=2), peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    ema = EMAState(model, decay_type="bema", trainable_only=True, update_every=2)
    initial = {n: to_numpy(p) for n, p in model.named_parameters() if p.requires_grad}
    for k in range(1, 4):
        perturb_(model, torch.Generator().manual_seed(k))
        ema.update()
    d = ema.save(tmp_path)
    bema = ema.ema_state_dict()
    assert max(np.abs(to_numpy(bema[n]) - initial[n]).max() for n in initial) > 1e-3
    adapter = load_file(str(d / "adapter_model.safetensors"))
    lora = [n for n in bema if "lora_A" in n]
    assert lora and all(
        torch.equal(adapter[n.replace(".default", "")], bema[n]) for n in lora
    ), sorted(adapter)[:4]
