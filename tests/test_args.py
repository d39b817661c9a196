"""EMAArguments through HfArgumentParser: flag names, values, validation at parse time, callbacks built from them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments

from hf_ema import EMAArguments, EMATrainerCallback

ROOT = Path(__file__).resolve().parents[1]


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


# ----------------------------------------------------------------------------- --ema / --no_ema
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], False),
        (["--ema"], True),
        (["--ema", "true"], True),
        (["--ema", "false"], False),
        (["--ema=no"], False),
        (["--no_ema"], False),
        (["--no-ema"], False),
        (["--ema", "--no_ema"], False),  # the last one wins, as with any pair of flags
        (["--no_ema", "--ema"], True),
        (["--no_ema", "--ema_decay", "0.9"], False),
    ],
)
def test_ema_switch(argv, expected):
    a = parse(argv)
    assert a.ema is expected
    assert a.ema_replace_at_end is True  # untouched by every spelling of --ema / --no_ema
    assert len(a.callbacks()) == int(expected)


def test_no_ema_turns_off_a_default_on_ema_and_is_not_read_as_no_ema_replace_at_end():
    # A script that turns the EMA on by default (as the examples do) must be able to turn it off again. Before
    # --no_ema existed, argparse's prefix matching read it as --no_ema_replace_at_end: EMA on, replace off.
    parser = HfArgumentParser(EMAArguments)
    parser.set_defaults(ema=True)
    (a,) = parser.parse_args_into_dataclasses(["--no_ema"])
    assert (a.ema, a.ema_replace_at_end) == (False, True)
    (a,) = parser.parse_args_into_dataclasses([])
    assert (a.ema, a.ema_replace_at_end) == (True, True)
    (a,) = parser.parse_args_into_dataclasses(["--no_ema_replace_at_end"])
    assert (a.ema, a.ema_replace_at_end) == (True, False)


def test_ema_switch_next_to_training_arguments(tmp_path):
    parser = HfArgumentParser((TrainingArguments, EMAArguments))
    _, eargs = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--report_to", "none", "--no-ema"]
    )
    assert eargs.ema is False and eargs.ema_replace_at_end is True


def test_a_prefix_of_no_ema_is_ambiguous(capsys):
    with pytest.raises(SystemExit):
        parse(["--no_em"])
    assert "ambiguous option: --no_em" in capsys.readouterr().err


def _example():
    sys.path.insert(0, str(ROOT / "examples"))
    import train_accelerate

    return train_accelerate


def test_accelerate_example_ema_is_on_by_default_and_switches_off():
    ex = _example()
    assert ex.parse_args([])[1].ema is True
    for off in (["--no_ema"], ["--no-ema"], ["--ema", "false"]):
        _, ema_args = ex.parse_args(off)
        assert ema_args.ema is False and ema_args.ema_replace_at_end is True, off
    # allow_abbrev=False: a shortened flag is refused instead of being read as a longer one
    with pytest.raises(ValueError, match="not used by the HfArgumentParser: \\['--no_ema_rep'\\]"):
        ex.parse_args(["--no_ema_rep"])


def test_accelerate_example_trains_without_ema(tmp_path):
    metrics = _example().main(
        ["--no_ema", "--max_steps", "2", "--eval_steps", "0", "--output_dir", str(tmp_path)]
    )
    assert metrics["ema_step"] is None and "ema_accuracy" not in metrics["final"]
    assert (tmp_path / "checkpoint_2").is_dir() and not (tmp_path / "checkpoint_2" / "ema_net").exists()
