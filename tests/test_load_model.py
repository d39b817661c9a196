"""hf_ema.load_model: EMA weights when ``path/ema_net`` exists (and says so), regular weights otherwise."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from reference import decays_for, drive, reference_ema, tiny_bert, tiny_bert_config, tiny_mlp
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

import hf_ema
from hf_ema import EMAState


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint folder with the training weights (save_pretrained) and the EMA (ema_net/)."""
    model = tiny_bert(seed=0)
    ema = EMAState(model, decay=0.6)
    history, _ = drive(ema, model, 5, seed=1, scale=0.05)
    path = tmp_path / "checkpoint-5"
    model.save_pretrained(path)
    ema.save(path)
    expected_ema = reference_ema(history, decays_for("constant", 0.6, 5))
    training = {k: v.detach().clone() for k, v in model.named_parameters()}
    return path, expected_ema, training


def _hf_ema_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("hf_ema")]


def _assert_is_ema(model, expected_ema):
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.detach().double().numpy(), expected_ema[name], rtol=1e-5, atol=1e-5)


def _assert_is_training(model, training):
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), training[name]), name


@pytest.mark.parametrize("model_class", [BertForSequenceClassification, AutoModelForSequenceClassification])
def test_prefers_ema_net_and_logs_it(checkpoint, caplog, model_class):
    path, expected_ema, training = checkpoint
    caplog.set_level(logging.INFO)
    model = hf_ema.load_model(model_class, path)
    assert isinstance(model, BertForSequenceClassification)
    _assert_is_ema(model, expected_ema)
    # Sanity: EMA and training weights really differ, so the check above tells them apart.
    assert any(not np.allclose(training[n].double().numpy(), expected_ema[n], atol=1e-3) for n in training)
    msgs = _hf_ema_messages(caplog)
    assert any("ema_net" in m and str(path) in m for m in msgs), msgs


def test_prefer_ema_false_loads_regular_weights(checkpoint, caplog):
    path, _, training = checkpoint
    caplog.set_level(logging.INFO)
    model = hf_ema.load_model(BertForSequenceClassification, path, prefer_ema=False)
    _assert_is_training(model, training)
    msgs = _hf_ema_messages(caplog)
    assert any(str(path) in m for m in msgs), msgs


def test_without_ema_net_loads_regular_weights_and_logs_it(tmp_path, caplog):
    model = tiny_bert(seed=3)
    path = tmp_path / "plain"
    model.save_pretrained(path)
    caplog.set_level(logging.INFO)
    loaded = hf_ema.load_model(AutoModelForSequenceClassification, path)
    _assert_is_training(loaded, {k: v.detach() for k, v in model.named_parameters()})
    msgs = _hf_ema_messages(caplog)
    assert msgs and any(str(path) in m for m in msgs), msgs


def test_from_pretrained_kwargs_pass_through(checkpoint):
    path, expected_ema, _ = checkpoint
    model = hf_ema.load_model(BertForSequenceClassification, path, output_hidden_states=True)
    assert model.config.output_hidden_states is True
    _assert_is_ema(model, expected_ema)


def test_dtype_pass_through(checkpoint):
    path, expected_ema, _ = checkpoint
    model = hf_ema.load_model(BertForSequenceClassification, path, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16, name
        want = torch.from_numpy(expected_ema[name]).to(torch.bfloat16)
        # fp32 -> bf16 rounding of the (fp32) EMA: at most one bf16 ulp away from the rounded reference.
        torch.testing.assert_close(p.detach().float(), want.float(), rtol=2**-7, atol=1e-6)


def test_checkpoint_holding_only_ema_net(tmp_path):
    model = tiny_bert(seed=4)
    ema = EMAState(model, decay=0.5)
    history, _ = drive(ema, model, 3, seed=5, scale=0.05)
    ema.save(tmp_path / "only_ema")
    loaded = hf_ema.load_model(AutoModelForSequenceClassification, tmp_path / "only_ema")
    _assert_is_ema(loaded, reference_ema(history, decays_for("constant", 0.5, 3)))


def test_missing_path_is_an_error(tmp_path, caplog):
    """Said as such, before anything is loaded: not "Loading regular weights" and then the Hub's repo-id error."""
    caplog.set_level(logging.INFO)
    with pytest.raises(FileNotFoundError) as info:
        hf_ema.load_model(AutoModelForSequenceClassification, tmp_path / "does_not_exist")
    assert str(tmp_path / "does_not_exist") in str(info.value) and "does not exist" in str(info.value)
    assert "Repo id" not in str(info.value)
    assert _hf_ema_messages(caplog) == []


def _tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, num_labels=2, pad_token_id=0
    )
    return GPT2ForSequenceClassification(cfg).eval()


def _tiny_bert_mlm():
    from transformers import BertForMaskedLM

    torch.manual_seed(1)
    model = BertForMaskedLM(tiny_bert_config())
    # as save_pretrained sets it (so a Trainer checkpoint's ema_net has it)
    model.config.architectures = ["BertForMaskedLM"]
    return model


@pytest.mark.parametrize(
    ("other", "words"),
    [
        (lambda: _tiny_gpt2(seed=1), ["model_type", "'gpt2'", "'bert'"]),  # another architecture
        (lambda: tiny_bert(seed=1, intermediate_size=48), ["shape", "(48, 16)", "(32, 16)"]),  # another size
        (lambda: _tiny_bert_mlm(), ["architectures", "BertForMaskedLM"]),  # another head on the same body
    ],
    ids=["gpt2", "bigger_bert", "mlm_head"],
)
def test_ema_net_of_another_model_is_an_error(checkpoint, other, words):
    """An ema_net that belongs to another model (e.g. copied into the wrong checkpoint) must not load quietly."""
    path, _, _ = checkpoint
    EMAState(other(), decay=0.5).save(path)  # replaces the checkpoint's ema_net
    with pytest.raises(ValueError) as info:
        hf_ema.load_model(AutoModelForSequenceClassification, path)
    msg = str(info.value)
    assert str(path / "ema_net") in msg and all(w in msg for w in words), msg
    assert len(msg.replace(str(path), "<path>")) < 700, msg  # the first few tensors and a count, not all
    # the regular weights still load
    hf_ema.load_model(AutoModelForSequenceClassification, path, prefer_ema=False)


class _ManyLayers(torch.nn.Module):
    """60 parameters whose names no BERT or MLP has."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(30))


@pytest.mark.parametrize("target", ["bert_checkpoint", "module_instance"])
def test_errors_show_the_first_names_and_a_count(tmp_path, target):
    model = _ManyLayers()
    ema = EMAState(model, decay=0.5, trainable_only=True)
    path = tmp_path / "ckpt"
    if target == "bert_checkpoint":
        tiny_bert(seed=0).save_pretrained(path)
    ema.save(path)
    with pytest.raises(ValueError) as info:
        if target == "bert_checkpoint":
            hf_ema.load_model(AutoModelForSequenceClassification, path)
        else:
            hf_ema.load_model(tiny_mlp(seed=0), path)
    msg = str(info.value)
    assert "'blocks.0.bias'" in msg and "(60 in all)" in msg, msg
    assert len(msg.replace(str(path), "<path>")) < 500, msg


def test_trainable_only_ema_net_does_not_load_as_a_complete_model(tmp_path):
    """Without the other weights, ``from_pretrained(ema_net)`` would initialise them at random: it must fail."""
    model = tiny_bert(seed=6)
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    ema = EMAState(model, decay=0.6, trainable_only=True)
    ema.save(tmp_path)
    assert not (tmp_path / "ema_net" / "config.json").exists()
    with pytest.raises((OSError, ValueError)):  # transformers: "Unrecognized model ... config.json"
        AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "ema_net"))


def test_base_model_argument_is_for_peft_checkpoints_only(checkpoint):
    path, _, _ = checkpoint
    with pytest.raises(ValueError, match="base_model"):
        hf_ema.load_model(AutoModelForSequenceClassification, path, base_model="somewhere")


def test_corrupt_ema_net_is_not_silently_replaced_by_regular_weights(checkpoint):
    path, _, _ = checkpoint
    (path / "ema_net" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(Exception) as info:  # any error will do, as long as it does not load
        hf_ema.load_model(BertForSequenceClassification, path)
    assert "ema_net" in str(info.value) or "safetensors" in str(info.value).lower(), str(info.value)


def test_trainable_only_ema_is_put_on_top_of_regular_weights(tmp_path, caplog):
    """LoRA-style: the EMA covers only the trainable tensors; the rest comes from the regular weights."""
    model = tiny_bert(seed=6)
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    ema = EMAState(model, decay=0.6, trainable_only=True)
    assert set(ema.names) == {"classifier.weight", "classifier.bias"}
    history, _ = drive(ema, model, 4, seed=7, scale=0.1)
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    ema.save(path)
    caplog.set_level(logging.INFO)
    loaded = hf_ema.load_model(AutoModelForSequenceClassification, path)
    expected = reference_ema(history, decays_for("constant", 0.6, 4), names=ema.names)
    for name, p in loaded.named_parameters():
        if name in expected:
            np.testing.assert_allclose(p.detach().double().numpy(), expected[name], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(p.detach(), getattr(model.classifier, name.split(".")[1]).detach())
        else:
            assert torch.equal(p.detach(), model.get_parameter(name).detach()), name
    assert any("ema_net" in m for m in _hf_ema_messages(caplog))


def test_plain_module_instance_loaded_in_place(tmp_path):
    model = tiny_mlp(seed=8)
    ema = EMAState(model, decay=0.7)
    history, _ = drive(ema, model, 6, seed=9)
    ema.save(tmp_path)
    target = tiny_mlp(seed=10)
    out = hf_ema.load_model(target, tmp_path)
    assert out is target
    _assert_is_ema(target, reference_ema(history, decays_for("constant", 0.7, 6)))


@pytest.mark.parametrize("missing", ["model.safetensors", "ema_state.json"])
def test_incomplete_ema_net_is_an_error_not_a_silent_fallback(checkpoint, missing):
    """An ``ema_net`` folder that lost a file must not quietly give the training weights instead of the EMA."""
    path, _, _ = checkpoint
    (path / "ema_net" / missing).unlink()
    with pytest.raises((OSError, ValueError)) as info:
        hf_ema.load_model(BertForSequenceClassification, path)
    assert str(path / "ema_net") in str(info.value), str(info.value)
    # Asking for the regular weights still works.
    hf_ema.load_model(BertForSequenceClassification, path, prefer_ema=False)
