"""ema_net files: layout, from_pretrained compatibility, round trip and continuation through files, atomic
writes under simulated crashes, refusal of corrupt / pickled files without unpickling, clear path errors."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from reference import decays_for, drive, reference_ema, tiny_bert, tiny_bn_net, tiny_mlp

import hf_ema
import hf_ema.io
from hf_ema import EMAState

FILE_ERRORS = (hf_ema.EMAFileError, ValueError, OSError, RuntimeError)


def _names_path(exc: BaseException, path: Path) -> bool:
    msg = str(exc)
    return str(path) in msg or str(path.resolve()) in msg


def _trained_bert(steps=6, seed=0):
    model = tiny_bert(seed=seed)
    ema = EMAState(model, decay=0.7, decay_type="threshold")
    history, _ = drive(ema, model, steps, seed=seed + 1, scale=0.05)
    return model, ema, history


# --------------------------------------------------------------------------------------------------------
# Layout and from_pretrained
# --------------------------------------------------------------------------------------------------------


def test_save_layout_for_pretrained_model(tmp_path):
    model, ema, history = _trained_bert()
    out = ema.save(tmp_path)
    assert Path(out) == tmp_path / "ema_net"
    assert sorted(os.listdir(tmp_path)) == ["ema_net"]  # no temporary leftovers
    files = sorted(os.listdir(out))
    assert {"model.safetensors", "ema_state.json", "config.json"} <= set(files), files

    with safetensors.safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() is not None and f.metadata().get("format") == "pt"
        keys = set(f.keys())
        stored = {k: f.get_tensor(k) for k in keys}
    param_names = {n for n, _ in model.named_parameters()}
    assert param_names <= keys, sorted(param_names - keys)
    # The stored values are the EMA (checked against the independent reference, not just ema_state_dict()).
    expected = reference_ema(history, decays_for("threshold", 0.7, len(history) - 1))
    for name in param_names:
        np.testing.assert_allclose(stored[name].double().numpy(), expected[name], rtol=1e-5, atol=1e-5)

    meta = json.loads((out / "ema_state.json").read_text())
    assert meta_value(meta, "step") == 6
    text = json.dumps(meta)
    assert hf_ema.__version__ in text
    assert "threshold" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == 16


def meta_value(meta: dict, key: str):
    """Find ``key`` at the top level or one level down (the JSON layout is the implementation's choice)."""
    if key in meta:
        return meta[key]
    for v in meta.values():
        if isinstance(v, dict) and key in v:
            return v[key]
    raise KeyError(key)


def test_from_pretrained_loads_the_ema(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, ema, _ = _trained_bert()
    ema.save(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ema_net").eval()
    assert type(loaded) is type(model)
    sd = ema.ema_state_dict()
    for name, p in loaded.named_parameters():
        assert torch.equal(p.detach(), sd[name].to(p.dtype)), name
    # End to end: the loaded model computes what the tracked model computes with the EMA swapped in.
    ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), ema.average_parameters():
        want = model(input_ids=ids).logits
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        training_logits = model(input_ids=ids).logits
    assert not torch.allclose(training_logits, want)  # the EMA is not the training weights


def test_from_pretrained_with_tied_weights(tmp_path):
    """A masked-LM head ties its decoder to the word embeddings; the saved EMA must still load."""
    from reference import tiny_bert_config
    from transformers import AutoModelForMaskedLM, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config(tie_word_embeddings=True)).eval()
    ema = EMAState(model, decay=0.5)
    drive(ema, model, 3, seed=3)
    ema.save(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "ema_net").eval()
    sd = ema.ema_state_dict()
    for name, p in loaded.named_parameters():
        assert torch.equal(p.detach(), sd[name].to(p.dtype)), name


def test_save_plain_module_has_no_config(tmp_path):
    model = tiny_mlp()
    ema = EMAState(model, decay=0.9)
    drive(ema, model, 3)
    out = ema.save(tmp_path / "ckpt")  # a directory that does not exist yet
    assert sorted(os.listdir(out)) == ["ema_state.json", "model.safetensors"]
    stored = safetensors.torch.load_file(str(out / "model.safetensors"))
    sd = ema.ema_state_dict()
    assert set(stored) == set(sd)
    for k in sd:
        assert torch.equal(stored[k], sd[k].cpu()), k


# --------------------------------------------------------------------------------------------------------
# Round trip and continuation through files
# --------------------------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _noise(seed, model, steps):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) * 0.1 for p in model.parameters()] for _ in range(steps)]


def _apply(model, step):
    with torch.no_grad():
        for p, n in zip(model.parameters(), step, strict=True):
            p.add_(n.to(p.dtype))


@pytest.mark.parametrize("form", ["classmethod", "instance"])
def test_save_load_continues_bitwise(tmp_path, form):
    kwargs = dict(decay=0.95, decay_type="exp", beta=5.0, total_steps=16, update_every=3)
    base = tiny_mlp(seed=3)
    noise = _noise(4, base, 16)

    model_a = copy.deepcopy(base)
    ema_a = EMAState(model_a, **kwargs)
    for s in noise:
        _apply(model_a, s)
        ema_a.update()

    model_b = copy.deepcopy(base)
    ema_b = EMAState(model_b, **kwargs)
    for s in noise[:7]:
        _apply(model_b, s)
        ema_b.update()
    ema_b.save(tmp_path)
    model_c = copy.deepcopy(model_b)
    del ema_b, model_b
    if form == "classmethod":
        ema_c = EMAState.load(tmp_path, model_c)
    else:
        ema_c = EMAState(model_c, **kwargs)  # an instance keeps its own settings; the file gives the state
        ema_c.load(tmp_path)
    assert isinstance(ema_c, EMAState)
    assert ema_c.step == 7
    assert ema_c.decay_type == "exp" and ema_c.decay == 0.95 and ema_c.update_every == 3
    for s in noise[7:]:
        _apply(model_c, s)
        ema_c.update()
    sa, sc = ema_a.ema_state_dict(), ema_c.ema_state_dict()
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.equal(_bits(sa[k]), _bits(sc[k])), k
    assert ema_c.step == 16 and ema_c.num_updates == ema_a.num_updates == 5


def test_save_overwrites_previous(tmp_path):
    model = tiny_mlp()
    ema = EMAState(model, decay=0.9)
    drive(ema, model, 2)
    ema.save(tmp_path)
    drive(ema, model, 3, seed=1)
    ema.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["ema_net"]
    again = EMAState.load(tmp_path, copy.deepcopy(model))
    assert again.step == 5
    for k, v in ema.ema_state_dict().items():
        assert torch.equal(again.ema_state_dict()[k], v)


# --------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------


class DiskFull(OSError):
    pass


def _crashing_writer(*args, **kwargs):
    """Writes half a file where it was asked to, then dies: a crash in the middle of the tensor write."""
    filename = kwargs.get("filename", args[1] if len(args) > 1 else None)
    if filename is not None:
        Path(filename).write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":')
    raise DiskFull("simulated crash while writing tensors")


def _break_safetensors_writer(monkeypatch):
    originals = {safetensors.torch.save_file, safetensors.torch.save}
    monkeypatch.setattr(safetensors.torch, "save_file", _crashing_writer)
    monkeypatch.setattr(safetensors.torch, "save", _crashing_writer)
    patched_any = False
    for mod in (hf_ema.io, getattr(hf_ema, "state", None)):
        if mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if any(value is o for o in originals):
                monkeypatch.setattr(mod, attr, _crashing_writer)
                patched_any = True
    return patched_any


def _ema_snapshot(ema):
    return {k: v.clone() for k, v in ema.ema_state_dict().items()}


def _saved_then_trained_on(tmp_path, steps):
    """``(model, ema, saved)``: an EMA saved to ``tmp_path`` after ``steps`` steps (``saved``: its tensors then),
    then driven ``steps`` more."""
    model = tiny_mlp()
    ema = EMAState(model, decay=0.9)
    drive(ema, model, steps)
    ema.save(tmp_path)
    saved = _ema_snapshot(ema)
    drive(ema, model, steps, seed=1)
    return model, ema, saved


def test_crash_mid_save_keeps_previous_ema_net(tmp_path, monkeypatch):
    model, ema, saved = _saved_then_trained_on(tmp_path, 5)

    with monkeypatch.context() as mp:
        _break_safetensors_writer(mp)
        with pytest.raises(DiskFull):
            ema.save(tmp_path)

    assert sorted(os.listdir(tmp_path)) == ["ema_net"], os.listdir(tmp_path)  # no half folder left behind
    back = EMAState.load(tmp_path, copy.deepcopy(model))
    assert back.step == 5
    for k, v in saved.items():
        assert torch.equal(back.ema_state_dict()[k], v), k


def test_crash_on_first_save_leaves_nothing_loadable(tmp_path, monkeypatch):
    model = tiny_mlp()
    ema = EMAState(model, decay=0.9)
    drive(ema, model, 2)
    with monkeypatch.context() as mp:
        _break_safetensors_writer(mp)
        with pytest.raises(DiskFull):
            ema.save(tmp_path)
    assert not (tmp_path / "ema_net").exists()
    assert os.listdir(tmp_path) == []
    with pytest.raises(FILE_ERRORS) as info:
        EMAState.load(tmp_path, copy.deepcopy(model))
    assert _names_path(info.value, tmp_path), str(info.value)


def test_crash_while_renaming_into_place_keeps_a_loadable_ema_net(tmp_path, monkeypatch):
    """Even when the final rename dies, ``ema_net`` is either the old complete folder or the new one."""
    model, ema, old = _saved_then_trained_on(tmp_path, 4)
    new = _ema_snapshot(ema)

    real_replace, real_rename = os.replace, os.rename

    def failing(src, dst, *a, **kw):
        if Path(dst).name == "ema_net":
            raise DiskFull("simulated crash in rename")
        return (real_replace if failing.kind == "replace" else real_rename)(src, dst, *a, **kw)

    def failing_replace(src, dst, *a, **kw):
        failing.kind = "replace"
        return failing(src, dst, *a, **kw)

    def failing_rename(src, dst, *a, **kw):
        failing.kind = "rename"
        return failing(src, dst, *a, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(os, "replace", failing_replace)
        mp.setattr(os, "rename", failing_rename)
        with pytest.raises(OSError):
            ema.save(tmp_path)
    back = EMAState.load(tmp_path, copy.deepcopy(model))
    got = back.ema_state_dict()
    assert back.step in (4, 8)
    want = old if back.step == 4 else new
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    # The next save succeeds and leaves no leftovers of the interrupted one.
    ema.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["ema_net"], os.listdir(tmp_path)
    assert EMAState.load(tmp_path, copy.deepcopy(model)).step == 8


def test_interrupted_save_is_recovered_by_every_loader(tmp_path, caplog):
    """A save that died between its two renames left only ``.ema_net.old-*``: has_ema, load_model and the
    Accelerate load hook must all find that previous EMA instead of restarting from the model weights."""
    from accelerate import Accelerator

    from hf_ema import load_model
    from hf_ema.loading import has_ema

    model, _, saved = _saved_then_trained_on(tmp_path, 3)
    os.replace(tmp_path / "ema_net", tmp_path / ".ema_net.old-deadbeef")  # the state such a crash leaves

    assert has_ema(tmp_path)
    loaded = load_model(tiny_mlp(seed=7), tmp_path)
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, saved[name]), name

    accelerator = Accelerator(cpu=True)
    fresh = EMAState(copy.deepcopy(model), decay=0.9, accelerator=accelerator)
    for hook in accelerator._load_model_state_pre_hook.values():
        hook([], str(tmp_path))
    assert fresh.step == 3
    for k, v in saved.items():
        assert torch.equal(fresh.ema_state_dict()[k], v), k
    assert "interrupted save" in caplog.text


# --------------------------------------------------------------------------------------------------------
# Refusing corrupt files, never unpickling
# --------------------------------------------------------------------------------------------------------


def _saved(tmp_path):
    model = tiny_mlp()
    ema = EMAState(model, decay=0.9)
    drive(ema, model, 3)
    ema.save(tmp_path)
    return model, ema, tmp_path / "ema_net" / "model.safetensors"


def test_reader_reads_regions_and_refuses_unknown_names_and_use_after_close(tmp_path):
    w = torch.arange(12.0).reshape(4, 3)
    hf_ema.io.save_ema_net(tmp_path, {"w": w, "b": torch.ones(3)}, {"step": 2})
    with hf_ema.io.open_ema_net(tmp_path) as reader:
        assert reader.meta["step"] == 2 and reader.shapes == {"w": (4, 3), "b": (3,)}
        assert torch.equal(reader.read("w", (slice(1, 3),)), w[1:3])
        assert torch.equal(reader.read("w", (slice(4, 4),)), w[4:4])  # an empty shard at the end
        assert torch.equal(reader.read("w"), w)
        with pytest.raises(KeyError, match="'v' is not in"):
            reader.read("v")
    with pytest.raises(hf_ema.EMAFileError, match="closed"):
        reader.read("w")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors_is_refused(tmp_path, damage):
    model, _, st = _saved(tmp_path)
    data = st.read_bytes()
    if damage == "truncate":
        st.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        st.write_bytes(os.urandom(len(data)))
    else:
        st.write_bytes(b"")
    fresh = EMAState(copy.deepcopy(model), decay=0.9)
    before = {k: v.clone() for k, v in fresh.ema_state_dict().items()}
    with pytest.raises(FILE_ERRORS) as info:
        fresh.load(tmp_path)
    assert _names_path(info.value, tmp_path), str(info.value)
    for k, v in before.items():  # a refused load changes nothing
        assert torch.equal(fresh.ema_state_dict()[k], v)
    assert fresh.step == 0
    with pytest.raises(FILE_ERRORS):
        EMAState.load(tmp_path, copy.deepcopy(model))


def test_safetensors_with_missing_or_misshapen_tensor_is_refused(tmp_path):
    model, _, st = _saved(tmp_path)
    tensors = safetensors.torch.load_file(str(st))
    del tensors["2.bias"]
    tensors["0.weight"] = torch.zeros(5, 5)
    safetensors.torch.save_file(tensors, str(st), metadata={"format": "pt"})
    with pytest.raises(FILE_ERRORS) as info:
        EMAState.load(tmp_path, copy.deepcopy(model))
    msg = str(info.value)
    assert "2.bias" in msg and "0.weight" in msg, msg


class _Evil:
    """Unpickling this object creates a marker file: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_in_place_of_safetensors_is_refused_without_unpickling(tmp_path, monkeypatch, writer):
    model, _, st = _saved(tmp_path / "ckpt")
    # Sanity: this payload really does run code when unpickled.
    probe = tmp_path / "probe_marker"
    pickle.loads(pickle.dumps({"w": _Evil(probe)}))
    assert probe.exists()

    marker = tmp_path / "unpickled_marker"
    payload = {"0.weight": _Evil(marker), "tensor": torch.zeros(2)}
    st.unlink()
    if writer == "pickle":
        with open(st, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, st)

    torch_load_calls = []
    real_torch_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: torch_load_calls.append(a) or real_torch_load(*a, **k))

    with pytest.raises(FILE_ERRORS) as info:
        EMAState.load(tmp_path / "ckpt", copy.deepcopy(model))
    assert _names_path(info.value, tmp_path / "ckpt"), str(info.value)
    with pytest.raises(FILE_ERRORS):
        EMAState(copy.deepcopy(model)).load(tmp_path / "ckpt")
    assert not marker.exists(), "loading unpickled the file"
    assert torch_load_calls == []


@pytest.mark.parametrize("damage", ["not_json", "missing", "json_list"])
def test_bad_ema_state_json_is_refused(tmp_path, damage):
    model, _, st = _saved(tmp_path)
    meta = st.parent / "ema_state.json"
    if damage == "not_json":
        meta.write_text("{ this is not json")
    elif damage == "missing":
        meta.unlink()
    else:
        meta.write_text("[1, 2, 3]")
    with pytest.raises(FILE_ERRORS) as info:
        EMAState.load(tmp_path, copy.deepcopy(model))
    assert _names_path(info.value, tmp_path), str(info.value)


# --------------------------------------------------------------------------------------------------------
# Missing folders
# --------------------------------------------------------------------------------------------------------


def test_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(FILE_ERRORS) as info:
        EMAState.load(missing, tiny_mlp())
    assert _names_path(info.value, missing), str(info.value)
    with pytest.raises(FILE_ERRORS) as info:
        EMAState(tiny_mlp()).load(missing)
    assert _names_path(info.value, missing), str(info.value)


def test_folder_without_ema_net_names_the_path(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FILE_ERRORS) as info:
        EMAState.load(tmp_path / "run", tiny_mlp())
    assert _names_path(info.value, tmp_path / "run"), str(info.value)


def test_ema_net_missing_model_file(tmp_path):
    model, _, st = _saved(tmp_path)
    st.unlink()
    with pytest.raises(FILE_ERRORS) as info:
        EMAState.load(tmp_path, copy.deepcopy(model))
    assert _names_path(info.value, tmp_path), str(info.value)


def test_load_into_model_of_other_shape_lists_names(tmp_path):
    _saved(tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    with pytest.raises((*FILE_ERRORS, KeyError)) as info:
        EMAState.load(tmp_path, other)
    assert "0.weight" in str(info.value) and "2.weight" in str(info.value)


def test_saved_folder_can_be_moved(tmp_path):
    """Nothing in the files depends on their location."""
    model, ema, _ = _saved(tmp_path / "a")
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    back = EMAState.load(tmp_path / "b", copy.deepcopy(model))
    for k, v in ema.ema_state_dict().items():
        assert torch.equal(back.ema_state_dict()[k], v)


def test_classmethod_load_restores_options(tmp_path):
    """``EMAState.load(dir, model)`` rebuilds the EMA with the saved options, not the defaults."""
    model = tiny_bn_net()
    model[0].requires_grad_(False)
    ema = EMAState(
        model, decay=0.9, decay_type="threshold", buffers="copy", dtype=torch.bfloat16, update_every=3
    )
    drive(ema, model, 4)
    ema.save(tmp_path)
    back = EMAState.load(tmp_path, copy.deepcopy(model))
    for attr in (
        "decay",
        "decay_type",
        "update_every",
        "dtype",
        "buffers",
        "trainable_only",
        "step",
        "names",
    ):
        assert getattr(back, attr) == getattr(ema, attr), attr
    assert back.num_updates == 1
    sd, bsd = ema.ema_state_dict(), back.ema_state_dict()
    for k in sd:
        assert bsd[k].dtype == sd[k].dtype and torch.equal(bsd[k], sd[k]), k

    only = EMAState(model, decay=0.9, trainable_only=True)
    only.save(tmp_path / "lora")
    back = EMAState.load(tmp_path / "lora", copy.deepcopy(model))
    assert back.trainable_only and back.names == ["1.weight", "1.bias", "3.weight", "3.bias"]
