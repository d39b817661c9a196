"""PEFT / LoRA: the EMA of a ``peft.PeftModel`` is an adapter folder that PEFT loads, and ``load_model`` reads it.

A real ``peft`` LoRA (query/value, ``modules_to_save=["classifier"]``) on a tiny BERT built from a config is trained
by a ``Trainer`` with ``EMATrainerCallback(trainable_only=True)``. The expected EMA is computed by
``reference.reference_ema`` (NumPy, float64) from the adapter weights ``_trainer_utils.Recorder`` snapshots after
every optimizer step, never by hf_ema itself.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from _trainer_utils import Recorder, ToyDataset, training_args
from reference import decays_for, drive, reference_ema, tiny_bert
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, Trainer

from hf_ema import EMAState, EMATrainerCallback, load_model

peft = pytest.importorskip("peft", reason="peft is not installed")

DECAY = 0.7
STEPS, SAVE_AT = 6, 3
TOL = dict(rtol=1e-5, atol=1e-6)


def lora_config(**overrides):
    kwargs = dict(
        r=2,
        lora_alpha=4,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )
    kwargs.update(overrides)
    return peft.LoraConfig(**kwargs)


def base_from(folder):
    return AutoModelForSequenceClassification.from_pretrained(str(folder))


def np_hist(history):
    return [{k: v.double().numpy() for k, v in h.items()} for h in history]


def assert_close(named, ref):
    for name, want in ref.items():
        np.testing.assert_allclose(named[name].detach().double().numpy(), want, err_msg=name, **TOL)


def train(out, base_dir, resume=None, lora_seed=0):
    torch.manual_seed(lora_seed)  # LoRA's A matrices are random; on resume they come from the checkpoint
    model = peft.get_peft_model(base_from(base_dir), lora_config())
    rec = Recorder(model)
    cb = EMATrainerCallback(decay=DECAY, trainable_only=True, replace_at_end=False)
    args = training_args(out, max_steps=STEPS, save_strategy="steps", save_steps=SAVE_AT, learning_rate=2.0)
    trainer = Trainer(model=model, args=args, train_dataset=ToyDataset(48, tokens=True), callbacks=[rec, cb])
    trainer.train(resume_from_checkpoint=resume)
    return model, rec, cb


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One LoRA training run: the base folder, the checkpoint at step 3, the reference EMA there, the records."""
    root = tmp_path_factory.mktemp("peft")
    tiny_bert(seed=0).save_pretrained(root / "base")  # loaded from a folder: adapter_config names its base
    model, rec, cb = train(root / "out", root / "base")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert cb.ema.names == trainable
    assert any("lora_A" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
    hist = np_hist(rec.history)
    ref = reference_ema(hist[: SAVE_AT + 1], decays_for("constant", DECAY, SAVE_AT), names=trainable)
    ref_end = reference_ema(hist, decays_for("constant", DECAY, STEPS), names=trainable)
    # The EMA really differs from the training weights at the checkpoint, so the checks below tell them apart.
    assert max(np.abs(hist[SAVE_AT][n] - ref[n]).max() for n in trainable) > 1e-3
    return {
        "root": root,
        "base": root / "base",
        "ckpt": root / "out" / f"checkpoint-{SAVE_AT}",
        "ref": ref,
        "ref_end": ref_end,
        "hist": hist,
        "trainable": trainable,
        "ema_end": {k: v.clone() for k, v in cb.ema.state_dict()["ema"].items()},
    }


def _keys(file):
    with safe_open(str(file), framework="pt") as f:
        return sorted(f.keys())


def test_ema_net_is_an_adapter_folder_like_the_trainers_own(run):
    ckpt = run["ckpt"]
    ema_net = ckpt / "ema_net"
    files = sorted(p.name for p in ema_net.iterdir())
    # no config.json: from_pretrained(ema_net) must not build a base model with random weights from it
    assert files == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "ema_state.json",
        "model.safetensors",
    ]
    # PEFT's own naming and config, as PeftModel.save_pretrained wrote them for the regular checkpoint
    assert _keys(ema_net / "adapter_model.safetensors") == _keys(ckpt / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in _keys(ema_net / "adapter_model.safetensors")
    ours = json.loads((ema_net / "adapter_config.json").read_text())
    theirs = json.loads((ckpt / "adapter_config.json").read_text())
    for config in (ours, theirs):  # a set in the config: PEFT writes it in hash order, hf_ema sorted
        config["target_modules"] = sorted(config["target_modules"])
    assert ours == theirs
    assert ours["base_model_name_or_path"] == str(run["base"]) and ours["inference_mode"] is True


def test_peft_from_pretrained_reads_the_ema_adapter(run):
    base = base_from(run["base"])
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = peft.PeftModel.from_pretrained(base, str(run["ckpt"] / "ema_net"))
    named = dict(model.named_parameters())
    assert_close(named, run["ref"])  # LoRA matrices and the modules_to_save copy of the classifier
    for name, p in named.items():  # the frozen base is the base, untouched
        if name not in run["ref"]:
            short = name.removeprefix("base_model.model.").replace(".base_layer", "")
            short = short.replace(".original_module", "")
            assert torch.equal(p.detach(), base_weights[short]), name
    # the regular adapter beside it holds the training weights (the check above can fail)
    regular = dict(
        peft.PeftModel.from_pretrained(base_from(run["base"]), str(run["ckpt"])).named_parameters()
    )
    assert_close(regular, {n: run["hist"][SAVE_AT][n] for n in run["trainable"]})


def test_from_pretrained_of_ema_net_is_the_ema_or_an_error(run):
    """The issue's silent failure: ``from_pretrained(ema_net)`` gave a randomly initialised base model."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(run["ckpt"] / "ema_net"))
    except (OSError, ValueError):
        return  # loud: fine
    # transformers' PEFT integration: base from adapter_config's base_model_name_or_path, adapter on top
    named = dict(model.named_parameters())
    want = {n.removeprefix("base_model.model."): v for n, v in run["ref"].items()}
    missing = sorted(set(want) - set(named))
    assert not missing, f"no adapter in the model from_pretrained built: {missing}"
    assert_close(named, want)
    base = base_from(run["base"])
    assert torch.equal(
        named["bert.embeddings.word_embeddings.weight"], base.bert.embeddings.word_embeddings.weight
    )


def test_load_model_reads_a_peft_checkpoint(run, caplog):
    caplog.set_level(logging.INFO, logger="hf_ema")
    model = load_model(AutoModelForSequenceClassification, run["ckpt"])
    assert isinstance(model, peft.PeftModel)
    assert_close(dict(model.named_parameters()), run["ref"])
    assert any("ema_net" in r.getMessage() for r in caplog.records)
    regular = load_model(AutoModelForSequenceClassification, run["ckpt"], prefer_ema=False)
    assert_close(dict(regular.named_parameters()), {n: run["hist"][SAVE_AT][n] for n in run["trainable"]})
    explicit = load_model(AutoModelForSequenceClassification, run["ckpt"], base_model=run["base"])
    assert_close(dict(explicit.named_parameters()), run["ref"])


@pytest.mark.parametrize("names", ["peft_model", "adapters_added_in_place"])
def test_load_model_on_an_ema_net_written_without_adapter_files(run, tmp_path, names):
    """Checkpoints written before ema_net held adapter files (PeftModel names, config.json beside them); or the
    names of a model that got its adapter in place (transformers' ``add_adapter``: no ``base_model.model.``)."""
    ckpt = tmp_path / "old"
    shutil.copytree(run["ckpt"], ckpt)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (ckpt / "ema_net" / name).unlink(missing_ok=True)
    shutil.copy(run["base"] / "config.json", ckpt / "ema_net" / "config.json")
    if names == "adapters_added_in_place":
        weights = ckpt / "ema_net" / "model.safetensors"
        tensors = load_file(str(weights))
        save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, str(weights))
    model = load_model(AutoModelForSequenceClassification, ckpt)
    assert isinstance(model, peft.PeftModel)
    assert_close(dict(model.named_parameters()), run["ref"])


def test_resume_restores_the_ema_exactly(run, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(run["ckpt"], out / run["ckpt"].name)
    _, rec, cb = train(out, run["base"], resume=str(out / run["ckpt"].name), lora_seed=123)
    assert rec.start_step == SAVE_AT and cb.ema.step == STEPS
    ema = cb.ema.state_dict()["ema"]
    for name, want in run["ema_end"].items():  # bit for bit the uninterrupted run's EMA
        assert torch.equal(ema[name], want), name
    assert_close(ema, run["ref_end"])  # which is the reference EMA over the whole recorded history
    # and the checkpoint written after resuming is again an adapter folder PEFT reads
    again = peft.PeftModel.from_pretrained(
        base_from(run["base"]), str(out / f"checkpoint-{STEPS}" / "ema_net")
    )
    assert_close(dict(again.named_parameters()), run["ref_end"])


def _peft_model(seed=0, **config):
    base = tiny_bert(seed=0)  # built from a config: the adapter config names no base model
    torch.manual_seed(seed)
    return peft.get_peft_model(base, lora_config(**config))


@pytest.mark.parametrize("trainable_only", [True, False])
def test_ema_state_save_of_a_peft_model_without_trainer(tmp_path, trainable_only):
    """``EMAState.save`` of a PeftModel built from a config; one LoRA matrix frozen (LoRA-FA style)."""
    model = _peft_model()
    frozen = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight"
    model.get_parameter(frozen).requires_grad_(False)
    ema = EMAState(model, decay=0.6, trainable_only=trainable_only)
    assert (frozen in ema.names) is not trainable_only
    history, _ = drive(ema, model, 4, seed=1, scale=0.05)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    ref = reference_ema(history, decays_for("constant", 0.6, 4), names=[*trainable, frozen])
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    ema.save(ckpt)
    # PeftModel names in model.safetensors: no config.json that from_pretrained(ema_net) would use
    assert not (ckpt / "ema_net" / "config.json").exists()

    fresh = tiny_bert(seed=0)  # the same base weights
    torch.manual_seed(99)  # LoRA matrices that PEFT would initialise now differ from the trained ones
    loaded = peft.PeftModel.from_pretrained(fresh, str(ckpt / "ema_net"))
    # the frozen matrix is in the adapter file (its value, constant during training), not a fresh random init
    assert_close(dict(loaded.named_parameters()), ref)

    with pytest.raises(ValueError, match="base_model"):  # the adapter config names no base: say what to pass
        load_model(AutoModelForSequenceClassification, ckpt)
    by_module = load_model(AutoModelForSequenceClassification, ckpt, base_model=tiny_bert(seed=0))
    assert_close(dict(by_module.named_parameters()), ref)


def test_each_adapter_gets_its_folder(tmp_path):
    model = _peft_model()
    model.add_adapter("other", lora_config(r=3))
    ema = EMAState(model, decay=0.5, trainable_only=True)
    drive(ema, model, 2, seed=2)
    ema.save(tmp_path)
    other = tmp_path / "ema_net" / "other"
    assert json.loads((other / "adapter_config.json").read_text())["r"] == 3
    loaded = peft.PeftModel.from_pretrained(tiny_bert(seed=0), str(other), adapter_name="other")
    ema_other = {n: t for n, t in ema.ema_state_dict().items() if ".other." in n}
    # not trainable (not the active adapter): taken from the model, where it is constant
    assert ema_other == {}
    for name, p in model.named_parameters():
        if ".other." in name:
            torch.testing.assert_close(dict(loaded.named_parameters())[name], p.detach(), rtol=0, atol=0)
