"""EMAArguments through HfArgumentParser: flag names, values, validation at parse time, callbacks built from them."""

from __future__ import annotations

import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments

from hf_ema import EMAArguments, EMATrainerCallback


def parse(argv):
    (ema_args,) = HfArgumentParser(EMAArguments).parse_args_into_dataclasses(argv)
    return ema_args


def test_flags_parse_into_callback_settings():
    a = parse(
        [
            "--ema",
            "--ema_decay",
            "0.995",
            "--ema_decay_type",
            "exp",
            "--ema_beta",
            "10",
            "--ema_update_every",
            "4",
            "--ema_total_steps",
            "500",
            "--ema_dtype",
            "float64",
            "--ema_buffers",
            "copy",
            "--ema_trainable_only",
            "--ema_device",
            "cpu",
            "--no_ema_replace_at_end",
            "--ema_eval_both",
            "--ema_raw_prefix",
            "eval_train",
        ]
    )
    assert a.ema is True
    cb = EMATrainerCallback.from_args(a)
    assert cb.ema_kwargs == {
        "decay": 0.995,
        "decay_type": "exp",
        "beta": 10.0,
        "total_steps": 500,
        "update_every": 4,
        "dtype": "float64",
        "buffers": "copy",
        "trainable_only": True,
        "device": "cpu",
    }
    assert (cb.replace_at_end, cb.eval_both, cb.raw_prefix) == (False, True, "eval_train")
    assert len(a.callbacks()) == 1 and isinstance(a.callbacks()[0], EMATrainerCallback)


def test_defaults_match_the_callback_and_no_ema_means_no_callback():
    a = parse([])
    assert a.ema is False and a.callbacks() == []
    cb = EMATrainerCallback.from_args(a)
    default = EMATrainerCallback()
    assert cb.ema_kwargs == default.ema_kwargs | {"dtype": "float32"}
    assert default.ema_kwargs["dtype"] is torch.float32
    assert parse(["--ema_dtype", "none"]).callback_kwargs()["dtype"] is None


def test_parses_next_to_training_arguments(tmp_path):
    parser = HfArgumentParser((TrainingArguments, EMAArguments))
    targs, eargs = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--ema", "--ema_decay_type", "threshold", "--report_to", "none"]
    )
    assert targs.output_dir == str(tmp_path) and eargs.ema_decay_type == "threshold"


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--ema_decay", "1.0"], "decay"),
        (["--ema_decay", "-0.5"], "decay"),
        (["--ema_decay_type", "linear"], "linear"),
        (["--ema_update_every", "0"], "update_every"),
        (["--ema_buffers", "sum"], "buffers"),
        (["--ema_dtype", "int32"], "dtype"),
        (["--ema_decay_type", "exp", "--ema_beta", "0"], "beta"),
        (["--ema_total_steps", "-3"], "total_steps"),
        (["--ema_raw_prefix", "eval"], "raw_prefix"),
    ],
)
def test_invalid_values_fail_while_parsing(argv, match):
    with pytest.raises((ValueError, TypeError), match=match):
        parse(["--ema", *argv])


def test_invalid_values_fail_when_built_directly():
    with pytest.raises(ValueError, match=r"Invalid EMA arguments.*decay"):
        EMAArguments(ema=True, ema_decay=3.0)
