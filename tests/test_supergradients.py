"""SuperGradients, exactly (issue 8): an hf_ema run equals SuperGradients' ``ModelEMA`` driven by its trainer.

The expected EMA comes from ``tests/sg_reference.py``, a NumPy float64 re-implementation of SuperGradients'
``ModelEMA``, its schedules, ``from_params`` and its trainer's ``step`` / ``total_steps`` (the files and commit are
cited there), fed with the weights recorded after every optimizer step. Without gradient accumulation the decays
must be the same numbers and the EMA the same to fp32 rounding, for every schedule, a custom one included.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _trainer_utils import ToyDataset, training_args
from reference import record, tiny_bn_net
from sg_reference import SG_DECAY_FUNCTIONS, sg_train
from torch import nn
from transformers import Trainer, TrainerCallback

from hf_ema import EMA_DECAY_FUNCTIONS, EMAState, EMATrainerCallback, IDecayFunction

LEN_LOADER, EPOCHS = 5, 3  # 15 optimizer steps; SuperGradients' total_steps = len(loader) * max_epochs = 15
RTOL, ATOL = 2e-6, 1e-7  # fp32 rounding over 15 updates of O(1) values


class Ramp(IDecayFunction):
    """A user's schedule whose constructor takes only ``warmup`` (no ``beta``, no ``**kwargs``): issue 8."""

    def __init__(self, warmup):
        super().__init__(warmup=warmup)
        self.warmup = warmup

    def __call__(self, decay, step, total_steps):
        return decay * min(1.0, step / self.warmup)


class _SGRamp:
    """The same schedule as SuperGradients users write it (``**kwargs`` constructor, as in its EMA docs)."""

    def __init__(self, **kwargs):
        self.warmup = kwargs["warmup"]

    def __call__(self, decay, step, total_steps):
        return decay * min(1.0, step / self.warmup)


SG_REGISTRY = {**SG_DECAY_FUNCTIONS, "ramp": _SGRamp}

CASES = [
    {"decay": 0.9, "decay_type": "constant"},
    {"decay": 0.95, "decay_type": "threshold"},
    {"decay": 0.95, "decay_type": "exp", "beta": 4},
    {"decay": 0.95},  # no decay_type: exp with beta=15 (deprecated default, warns)
    {"decay": 0.95, "exp_activation": True, "beta": 3},  # legacy flag: exp
    {"decay": 0.9, "decay_type": "threshold", "exp_activation": False},  # legacy flag wins: constant
    {"decay": 0.95, "decay_type": "ramp", "warmup": 6},
    {"decay": 0.95, "decay_type": "ramp", "warmup": 6, "beta": 15},  # SG dicts often carry beta
]
IDS = [
    "constant",
    "threshold",
    "exp",
    "no_decay_type",
    "exp_activation",
    "exp_activation_off",
    "custom",
    "custom+beta",
]


@pytest.fixture
def ramp_registered(monkeypatch):
    monkeypatch.setitem(EMA_DECAY_FUNCTIONS, "ramp", Ramp)


def _float_names(state):
    return [k for k, v in state.items() if np.issubdtype(v.dtype, np.floating)]


def _assert_equal_to_sg(ema_tensors, sg_ema, names):
    for n in names:
        got = ema_tensors[n].detach().double().cpu().numpy()
        np.testing.assert_allclose(got, sg_ema[n], rtol=RTOL, atol=ATOL, err_msg=n)


def _from_params_quietly(build, params, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the deprecated-default warnings are tested below
        return build(params, **kw)


# ------------------------------------------------------------------------------------------------ EMAState
@pytest.mark.parametrize("ema_params", CASES, ids=IDS)
def test_ema_state_equals_supergradients(ema_params, ramp_registered):
    """A BatchNorm net trained in train mode (its float buffers move too), one update per optimizer step."""
    model = tiny_bn_net(seed=3)
    ema = _from_params_quietly(
        lambda p, **kw: EMAState.from_params(model, p, **kw), ema_params, total_steps=LEN_LOADER * EPOCHS
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    gen = torch.Generator().manual_seed(4)
    history, returned = [record(model.state_dict().items())], []
    model.train()
    for _ in range(LEN_LOADER * EPOCHS):
        x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 2, (8,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        returned.append(ema.update())
        history.append(record(model.state_dict().items()))

    sg = sg_train(ema_params, history, LEN_LOADER, EPOCHS, registry=SG_REGISTRY)
    # The same decay at every step: step is the 1-based count of optimizer steps, total_steps = 15.
    np.testing.assert_allclose(returned, sg.decays, rtol=1e-12, atol=0)
    names = _float_names(history[0])
    assert any("running_mean" in n for n in names) and any("running_var" in n for n in names)
    _assert_equal_to_sg(ema.ema_state_dict(), sg.ema, names)
    # The comparison can fail: the EMA is far from the first and the last weights.
    for ref in (history[0], history[-1]):
        assert max(np.abs(sg.ema[n] - ref[n]).max() for n in names) > 1e-2
    # The one deliberate difference: SuperGradients never touches integer buffers (its EMA keeps the counter it
    # was created with); hf_ema copies them, so ema_net loads as the model it came from.
    assert sg.ema["1.num_batches_tracked"] == history[0]["1.num_batches_tracked"] == 0
    assert int(ema.ema_state_dict()["1.num_batches_tracked"]) == LEN_LOADER * EPOCHS


def test_first_update_keeps_the_initial_weights_in_the_average():
    """exp at step 1 is ``decay * (1 - exp(-beta / total))`` > 0, not 0 (which would copy the weights)."""
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMAState(model, decay=0.9, decay_type="exp", beta=15, total_steps=15)
    with torch.no_grad():
        model.weight.fill_(1.0)
    d = ema.update()
    assert d == pytest.approx(0.9 * (1 - np.exp(-1.0)), rel=1e-12)
    np.testing.assert_allclose(ema.ema_state_dict()["weight"].double().numpy(), 1 - d, rtol=1e-6)
    t = EMAState(model, decay=0.9, decay_type="threshold")
    assert t.update() == pytest.approx(2 / 11, rel=1e-15)


# ------------------------------------------------------------------------------------------------ Trainer
class BNNet(nn.Module):
    """A plain module with BatchNorm for the Trainer: ``{"loss", "logits"}`` from ``x`` and ``labels``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.relu(self.bn(self.fc1(x))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class StateRecorder(TrainerCallback):
    """Snapshots the whole state dict (parameters and buffers) at train begin and after every optimizer step."""

    def __init__(self, model):
        self.model = model
        self.history = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.history = [record(self.model.state_dict().items())]

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.history.append(record(self.model.state_dict().items()))


@pytest.mark.parametrize("ema_params", [CASES[i] for i in (0, 1, 3, 7)], ids=[IDS[i] for i in (0, 1, 3, 7)])
def test_trainer_callback_equals_supergradients(tmp_path, ema_params, ramp_registered):
    """Epoch-based Trainer run (3 epochs of 5 batches, no accumulation): the Trainer's max_steps is SG's
    total_steps and its global_step SG's global_step."""
    model = BNNet()
    rec = StateRecorder(model)
    cb = _from_params_quietly(EMATrainerCallback.from_params, ema_params, replace_at_end=False)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=-1, num_train_epochs=EPOCHS, per_device_train_batch_size=8),
        train_dataset=ToyDataset(8 * LEN_LOADER),
        callbacks=[rec, cb],
    )
    trainer.train()
    assert trainer.state.max_steps == LEN_LOADER * EPOCHS == cb.ema.total_steps
    assert len(rec.history) == LEN_LOADER * EPOCHS + 1 and cb.ema.step == LEN_LOADER * EPOCHS
    sg = sg_train(ema_params, rec.history, LEN_LOADER, EPOCHS, registry=SG_REGISTRY)
    names = _float_names(rec.history[0])
    _assert_equal_to_sg(cb.ema.state_dict()["ema"], sg.ema, names)
    assert max(np.abs(sg.ema[n] - rec.history[-1][n]).max() for n in names) > 1e-2
    logged = [h["ema_decay"] for h in trainer.state.log_history if "ema_decay" in h]
    np.testing.assert_allclose(logged, sg.decays, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------ from_params
@pytest.mark.parametrize("build", ["callback", "state"])
def test_dict_without_decay_type_is_exp_beta_15_with_a_warning(build):
    with pytest.warns(UserWarning, match=r"no `decay_type`.*'exp'.*beta=15.*deprecate"):
        if build == "callback":
            kw = EMATrainerCallback.from_params({"decay": 0.99}).ema_kwargs
        else:
            ema = EMAState.from_params(nn.Linear(2, 2), {"decay": 0.99}, total_steps=10)
            kw = {"decay_type": ema.decay_type, "beta": ema.schedule.beta}
    assert kw["decay_type"] == "exp" and kw["beta"] == 15
    with pytest.warns(UserWarning, match="no `decay_type`"):
        cb = EMATrainerCallback.from_params({"decay": 0.99, "beta": 4})
    assert cb.ema_kwargs["beta"] == 4  # a given beta is kept
    with pytest.warns(UserWarning, match="no `decay_type`"):  # None means missing in SuperGradients too
        cb = EMATrainerCallback.from_params({"decay": 0.99, "decay_type": None})
    assert cb.ema_kwargs["decay_type"] == "exp"


@pytest.mark.parametrize(("flag", "want"), [(True, "exp"), (False, "constant"), (1, "exp"), (0, "constant")])
def test_exp_activation_maps_to_exp_or_constant(flag, want):
    with pytest.warns(UserWarning, match="exp_activation.*deprecated"):
        cb = EMATrainerCallback.from_params({"decay": 0.99, "exp_activation": flag})
    assert cb.ema_kwargs["decay_type"] == want and "exp_activation" not in cb.ema_kwargs
    with pytest.warns(UserWarning, match=r"replaces decay_type='threshold'"):
        cb = EMATrainerCallback.from_params(
            {"decay": 0.99, "decay_type": "threshold", "exp_activation": flag}
        )
    assert cb.ema_kwargs["decay_type"] == want


def test_missing_decay_is_0_9999_with_a_warning():
    with pytest.warns(UserWarning, match=r"no `decay`.*0\.9999"):
        cb = EMATrainerCallback.from_params({"decay_type": "threshold"})
    assert cb.ema_kwargs["decay"] == 0.9999


def test_explicit_dict_warns_nothing_and_overrides_count_as_given():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb = EMATrainerCallback.from_params({"ema": True, "decay": 0.9, "decay_type": "exp", "beta": 15})
        assert cb.ema_kwargs["decay_type"] == "exp"
        cb = EMATrainerCallback.from_params({"decay": 0.9}, decay_type="threshold")
        assert cb.ema_kwargs["decay_type"] == "threshold"


def test_misspelled_key_in_a_dict_is_named():
    with pytest.raises(ValueError, match=r"'decy' \(did you mean 'decay'\?\)"):
        EMATrainerCallback.from_params({"decay_type": "constant", "decay": 0.9, "decy": 0.9})
    with pytest.raises(TypeError, match="ema_params"):
        EMATrainerCallback.from_params({1: 0.9})
