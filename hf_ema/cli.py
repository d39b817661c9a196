"""The ``hf-ema`` command line: ``inspect``, ``export``, ``synthesize`` and ``sweep``.

``hf-ema`` (the console script) and ``python -m hf_ema`` both run :func:`main`. This module is the top layer: it
imports the rest of the library, and nothing imports it. See docs/CLI.md.

* ``hf-ema inspect PATH [--json]``: what a checkpoint folder (its ``ema_net`` / ``ema_net-<name>`` folders), an
  ``ema_net`` folder or a post-hoc EMA run folder holds.
* ``hf-ema export CHECKPOINT OUT [--ema NAME]``: a standalone model folder (``model.safetensors`` with the EMA weights,
  ``config.json``, tokenizer files) that ``AutoModel...from_pretrained(OUT)`` loads; a PEFT adapter folder for the EMA
  of a PEFT model.
* ``hf-ema synthesize RUN --sigma-rel 0.03 0.07 --out DIR``: EMAs of other widths from a post-hoc run's snapshots.
* ``hf-ema sweep RUN --grid 0.02 0.2 10 --eval hook.py:evaluate --out DIR``: synthesise and evaluate each width,
  print a table, plot the metric against ``sigma_rel`` and keep the best.

Errors are one line on stderr: exit code 2 for a malformed command line (argparse), 1 for bad input (a missing
folder, a ``sigma_rel`` out of range, a hook that fails). ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import importlib.util
import io
import json
import math
import numbers
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .io import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    CONFIG_NAME,
    EMA_DIRNAME,
    STATE_NAME,
    WEIGHTS_NAME,
    EMAFileError,
    atomic_write_text,
    ema_dirname,
    find_ema_dir,
    open_ema_net,
)

__all__ = ["TOKENIZER_FILES", "CLIError", "main"]

PROG = "hf-ema"

GENERATION_CONFIG_NAME = "generation_config.json"
#: Tokenizer / processor files of a Hugging Face model folder that ``export`` copies when the checkpoint has them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "sentencepiece.model",
    "spm.model",
    "source.spm",
    "target.spm",
    "bpe.codes",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "feature_extractor_config.json",
    "image_processor_config.json",
)
_EXPORT_RECORD = "hf_ema_export.json"
# Fit residual (relative L2 error of the synthesised averaging profile) above which a note is printed. With
# EDM2's defaults (20 snapshots per profile) targets 0.03-0.2 fit within ~0.3-2% (docs/POSTHOC.md).
_RESIDUAL_NOTE = 0.05
_POSTHOC_STATE_DIR = "posthoc_ema"
_POSTHOC_STATE_NAME = "posthoc_state.json"
_MANIFEST_NAME = "manifest.json"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_ST_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class CLIError(Exception):
    """Bad input to the command line: reported as one line on stderr with exit code 1."""


# ============================================================================ small helpers
def _human(nbytes: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CLIError(f"cannot read {str(path)!r} as JSON ({e})") from e
    if not isinstance(data, dict):
        raise CLIError(f"{str(path)!r} does not hold a JSON object")
    return data


def _st_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype name, shape)}`` of a safetensors file, from its header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {
                name: (
                    _ST_DTYPE_NAMES.get(
                        handle.get_slice(name).get_dtype(), handle.get_slice(name).get_dtype()
                    ),
                    tuple(handle.get_slice(name).get_shape()),
                )
                for name in handle.keys()  # noqa: SIM118 (a safe_open handle is not iterable)
            }
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CLIError(f"cannot read the safetensors header of {str(path)!r} ({e})") from e


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def _dtype_counts(header: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for dtype, _ in header.values():
        out[dtype] = out.get(dtype, 0) + 1
    return out


def _floating_dtype(header: Mapping[str, tuple[str, tuple[int, ...]]]) -> str | None:
    """The dtype held by the most floating-point elements (what ``config.json``'s ``dtype`` should say)."""
    by: dict[str, int] = {}
    for dtype, shape in header.values():
        if dtype in ("float64", "float32", "float16", "bfloat16"):
            by[dtype] = by.get(dtype, 0) + _numel(shape)
    return max(by, key=lambda d: by[d]) if by else None


def _parse_dtype(value: str | None) -> torch.dtype | None:
    if value is None:
        return None
    return _DTYPES[value]


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _ema_dirs(checkpoint: Path) -> list[tuple[str | None, Path]]:
    """``(name, folder)`` of every EMA in a checkpoint folder: ``ema_net`` (name ``None``) and ``ema_net-<name>``
    (including one only left under its ``.ema_net….old-*`` name by an interrupted save)."""
    names: set[str | None] = set()
    for child in checkpoint.iterdir():
        base = child.name
        if base.startswith(".") and ".old-" in base:  # ".ema_net-slow.old-1234abcd"
            base = base[1 : base.rindex(".old-")]
        if base == EMA_DIRNAME:
            names.add(None)
        elif base.startswith(EMA_DIRNAME + "-"):
            with contextlib.suppress(ValueError):  # not a valid EMA name: not an EMA folder
                ema_dirname(base[len(EMA_DIRNAME) + 1 :])
                names.add(base[len(EMA_DIRNAME) + 1 :])
    out = []
    for name in sorted(names, key=lambda n: (n is not None, n or "")):
        folder = checkpoint / ema_dirname(name)
        found = find_ema_dir(folder)
        if found is not None or folder.is_dir():
            out.append((name, found or folder))
    return out


def _is_ema_folder(path: Path) -> bool:
    return (path / STATE_NAME).is_file()


# ============================================================================ inspect
def _describe_ema(folder: Path, label: str) -> dict[str, Any]:
    """What an ``ema_net`` folder holds (step, schedule, sizes, files); ``{"error": ...}`` if it is incomplete."""
    info: dict[str, Any] = {"folder": label, "path": str(folder)}
    try:
        with open_ema_net(folder) as reader:
            meta = dict(reader.meta)
    except EMAFileError as e:
        info["error"] = str(e)
        return info
    header = _st_header(folder / WEIGHTS_NAME)
    for key in (
        "name",
        "step",
        "num_updates",
        "decay",
        "decay_type",
        "schedule_kwargs",
        "total_steps",
        "update_every",
        "dtype",
        "buffers",
        "trainable_only",
        "library_version",
    ):
        info[key] = meta.get(key)
    if folder.name.startswith(".") and ".old-" in folder.name:
        info["recovered_from_interrupted_save"] = True
    info["tensors"] = len(header)
    info["parameters"] = sum(_numel(shape) for _, shape in header.values())
    info["tensor_dtypes"] = _dtype_counts(header)
    info["bytes"] = _folder_bytes(folder)
    files = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())
    info["files"] = files
    info["config"] = (folder / CONFIG_NAME).is_file()
    info["peft_adapter_files"] = [
        f for f in files if Path(f).name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME)
    ]
    if isinstance(meta.get("posthoc"), dict):
        ph = meta["posthoc"]
        info["posthoc"] = {k: ph.get(k) for k in ("run_id", "t", "time_unit", "residual", "cond")}
        info["posthoc"]["sigma_rel"] = (meta.get("schedule_kwargs") or {}).get("sigma_rel")
    return info


def _describe_checkpoint(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "checkpoint", "path": str(path)}
    if (path / CONFIG_NAME).is_file():
        cfg = _read_json(path / CONFIG_NAME)
        out["model_type"] = cfg.get("model_type")
        out["architectures"] = cfg.get("architectures")
    out["weights"] = sorted(
        f.name
        for f in path.iterdir()
        if f.is_file() and (f.name.endswith(".safetensors") or f.name.endswith(".bin"))
    )
    out["tokenizer_files"] = [n for n in TOKENIZER_FILES if (path / n).is_file()]
    out["emas"] = [_describe_ema(folder, ema_dirname(name)) for name, folder in _ema_dirs(path)]
    state = path / _POSTHOC_STATE_DIR / _POSTHOC_STATE_NAME
    if state.is_file():
        meta = _read_json(state)
        ph: dict[str, Any] = {
            k: meta.get(k)
            for k in ("run_id", "step", "time", "time_unit", "sigma_rels", "gammas", "snapshot_every")
        }
        ph["profiles"] = [
            _describe_ema(path / _POSTHOC_STATE_DIR / f"profile-{i}", f"{_POSTHOC_STATE_DIR}/profile-{i}")
            for i in range(len(meta.get("gammas") or []))
        ]
        out["posthoc_ema"] = ph
    return out


def _describe_run(path: Path) -> dict[str, Any]:
    from .posthoc import read_manifest

    m = read_manifest(path)
    entries = m["snapshots"]
    table = m["tensors"]
    steps = sorted({int(e["step"]) for e in entries})
    files = [f for e in entries for f in (e.get("files") or [])]
    present = [path / f for f in files if (path / f).is_file()]
    out: dict[str, Any] = {
        "kind": "posthoc_run",
        "path": str(path),
        "run_id": m["run_id"],
        "library_version": m.get("library_version"),
        "time_unit": m["time_unit"],
        "update_every": m.get("update_every"),
        "trainable_only": m.get("trainable_only"),
        "world_size": sorted({int(e.get("world_size", 1)) for e in entries}),
        "layout": sorted({str(e.get("layout", "gathered")) for e in entries}),
        "profiles": [
            {"sigma_rel": p.get("sigma_rel"), "gamma": p.get("gamma")} for p in (m.get("profiles") or [])
        ],
        "tensors": len(table),
        "parameters": sum(_numel(v["shape"]) for v in table.values()),
        "averaged_tensors": sum(1 for v in table.values() if v.get("average")),
        "config": bool(m.get("config")) and (path / str(m.get("config"))).is_file(),
        "snapshots": {
            "count": len(entries),
            "steps": len(steps),
            "first_step": steps[0] if steps else None,
            "last_step": steps[-1] if steps else None,
            "dtype": sorted({str(e.get("dtype")) for e in entries}),
            "files": len(files),
            "missing_files": len(files) - len(present),
            "bytes": sum(p.stat().st_size for p in present),
        },
    }
    if out["config"]:
        out["model_type"] = _read_json(path / str(m["config"])).get("model_type")
    return out


def _describe(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CLIError(f"{str(path)!r} does not exist")
    if not path.is_dir():
        raise CLIError(
            f"{str(path)!r} is a file; give a checkpoint folder, an ema_net folder or a post-hoc EMA run folder"
        )
    if (path / _MANIFEST_NAME).is_file():
        return _describe_run(path)
    if _is_ema_folder(path) or path.name == EMA_DIRNAME or path.name.startswith(EMA_DIRNAME + "-"):
        info = _describe_ema(path, path.name)
        return {"kind": "ema_net", **info}
    desc = _describe_checkpoint(path)
    if desc["emas"] or "posthoc_ema" in desc:
        return desc
    what = " (it holds a model, but no EMA)" if desc["weights"] or "model_type" in desc else ""
    raise CLIError(
        f"{str(path)!r} is not a checkpoint folder with an ema_net/ or ema_net-<name>/, nor an ema_net folder "
        f"(with {STATE_NAME}), nor a post-hoc EMA run folder (with {_MANIFEST_NAME}){what}"
    )


def _fmt_schedule(info: Mapping[str, Any]) -> str:
    kwargs = info.get("schedule_kwargs") or {}
    args = ", ".join(f"{k}={_num(v)}" for k, v in sorted(kwargs.items()))
    return f"{info.get('decay_type')}({args})" if args else str(info.get("decay_type"))


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _print_ema(info: Mapping[str, Any], indent: str = "  ") -> None:
    print(f"{indent}{info['folder']}")
    if "error" in info:
        print(f"{indent}  ERROR: {info['error']}")
        return
    fields = [
        f"step {info['step']}",
        f"num_updates {info['num_updates']}" if info.get("num_updates") is not None else "",
        f"decay {_num(info['decay'])}" if info.get("decay") is not None else "",
        f"schedule {_fmt_schedule(info)}",
        f"update_every {info['update_every']}",
        f"dtype {info['dtype']}",
    ]
    print(f"{indent}  " + ", ".join(f for f in fields if f))
    dtypes = ", ".join(f"{d} x{n}" for d, n in sorted(info["tensor_dtypes"].items()))
    part = ", trainable_only" if info.get("trainable_only") else ""
    print(
        f"{indent}  {info['tensors']} tensors ({dtypes}), {info['parameters']:,} parameters{part}, "
        f"{_human(info['bytes'])} on disk"
    )
    print(f"{indent}  files: {', '.join(info['files'])}")
    if info["peft_adapter_files"]:
        print(f"{indent}  PEFT adapter: {', '.join(info['peft_adapter_files'])}")
    if info.get("posthoc"):
        ph = info["posthoc"]
        print(
            f"{indent}  post-hoc synthesis: sigma_rel {_num(ph['sigma_rel'])} of run {ph['run_id']}, "
            f"residual {_num(ph['residual'])}"
        )
    if info.get("recovered_from_interrupted_save"):
        print(f"{indent}  (the previous folder, left by an interrupted save)")


def _print_description(desc: Mapping[str, Any]) -> None:
    kind = desc["kind"]
    if kind == "ema_net":
        print(f"ema_net folder {desc['path']}")
        _print_ema(desc)
    elif kind == "checkpoint":
        print(f"checkpoint {desc['path']}")
        if desc.get("model_type") is not None:
            archs = ", ".join(desc.get("architectures") or [])
            print(f"  model: {desc['model_type']}" + (f" ({archs})" if archs else ""))
        print(f"  weights: {', '.join(desc['weights']) or '-'}")
        print(f"  tokenizer/processor files: {', '.join(desc['tokenizer_files']) or '-'}")
        for info in desc["emas"]:
            _print_ema(info)
        if "posthoc_ema" in desc:
            ph = desc["posthoc_ema"]
            sig = ", ".join(_num(s) for s in ph.get("sigma_rels") or [])
            print(
                f"  {_POSTHOC_STATE_DIR} (PostHocEMA.save): run {ph['run_id']}, step {ph['step']}, "
                f"sigma_rels {sig}, snapshot_every {ph['snapshot_every']}"
            )
            for info in ph["profiles"]:
                _print_ema(info, indent="    ")
    else:
        s = desc["snapshots"]
        print(f"post-hoc EMA run {desc['path']}")
        print(
            f"  run id {desc['run_id']}, time in {desc['time_unit']}, update_every {desc['update_every']}, "
            f"world size {'/'.join(map(str, desc['world_size'])) or '-'}, "
            f"layout {'/'.join(desc['layout']) or '-'}, hf_ema {desc['library_version']}"
        )
        prof = ", ".join(f"sigma_rel {p['sigma_rel']:.4f} (gamma {p['gamma']:.3f})" for p in desc["profiles"])
        print(f"  profiles: {prof}")
        model = f", config.json ({desc.get('model_type')})" if desc["config"] else ", no config.json"
        print(
            f"  model: {desc['tensors']} tensors ({desc['averaged_tensors']} averaged), "
            f"{desc['parameters']:,} parameters{model}"
        )
        steps = f"steps {s['first_step']}..{s['last_step']}" if s["steps"] else "no steps yet"
        missing = f", {s['missing_files']} MISSING" if s["missing_files"] else ""
        print(
            f"  snapshots: {s['count']} ({s['steps']} steps, {steps}), dtype {'/'.join(s['dtype']) or '-'}, "
            f"{s['files']} files{missing}, {_human(s['bytes'])} on disk"
        )


def _errors_in(desc: Mapping[str, Any]) -> list[str]:
    infos = list(desc.get("emas", []))
    infos += list((desc.get("posthoc_ema") or {}).get("profiles", []))
    if desc["kind"] == "ema_net":
        infos.append(desc)
    errors = [i["error"] for i in infos if "error" in i]
    if desc["kind"] == "posthoc_run" and desc["snapshots"]["missing_files"]:
        errors.append(
            f"{desc['snapshots']['missing_files']} snapshot file(s) listed in the manifest are missing"
        )
    return errors


def _cmd_inspect(args: argparse.Namespace) -> int:
    desc = _describe(Path(args.path))
    if args.json:
        print(json.dumps(desc, indent=2, sort_keys=True))
    else:
        _print_description(desc)
    errors = _errors_in(desc)
    if errors:
        raise CLIError(errors[0] + (f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""))
    return 0


# ============================================================================ export
def _resolve_ema(path: Path, ema: str | None) -> tuple[Path, Path, str]:
    """``(ema folder, checkpoint folder, label)`` for ``export``'s CHECKPOINT and ``--ema``."""
    if not path.exists():
        raise CLIError(f"{str(path)!r} does not exist")
    if not path.is_dir():
        raise CLIError(f"{str(path)!r} is a file; give a checkpoint folder or an ema_net folder")
    if _is_ema_folder(path) or path.name == EMA_DIRNAME or path.name.startswith(EMA_DIRNAME + "-"):
        if ema is not None:
            raise CLIError(
                f"--ema {ema} picks an EMA of a checkpoint folder, but {str(path)!r} is an EMA folder"
            )
        found = find_ema_dir(path)
        if found is None:
            open_ema_net(path).close()  # raises the specific EMAFileError
        return found or path, path.parent, path.name
    try:
        dirname = ema_dirname(ema)
    except ValueError as e:
        raise CLIError(f"--ema: {e}") from e
    found = find_ema_dir(path, ema)
    if found is not None:
        return found, path, dirname
    if (path / dirname).is_dir():
        open_ema_net(path / dirname).close()  # incomplete: raises naming the missing file
    available = [ema_dirname(n) for n, _ in _ema_dirs(path)]
    if ema is None and len(available) == 1:
        name = available[0][len(EMA_DIRNAME) + 1 :]
        found = find_ema_dir(path, name)
        if found is not None:
            return found, path, available[0]
    if available:
        raise CLIError(
            f"{str(path)!r} has no {dirname}/; it holds {', '.join(available)}: pick one with --ema NAME"
        )
    raise CLIError(
        f"{str(path)!r} holds no EMA folder ({dirname}/ written by hf_ema); give a checkpoint folder with an "
        "ema_net, or the ema_net folder itself"
    )


def _check_out(out: Path, force: bool, ema_dir: Path, checkpoint: Path) -> None:
    """Refuse an ``out`` that is a file, a non-empty folder (without ``force``), the EMA folder, the checkpoint
    folder or a folder holding either (replacing it would delete what is exported), or a folder inside the EMA."""
    resolved = out.resolve()
    ema, ckpt = ema_dir.resolve(), checkpoint.resolve()
    if (
        resolved in (ema, ckpt)
        or resolved in ema.parents
        or resolved in ckpt.parents
        or ema in resolved.parents
    ):
        raise CLIError(
            f"OUT {str(out)!r} must not be the exported checkpoint or EMA folder, a folder holding them, nor a "
            "folder inside the EMA folder"
        )
    if out.exists() and not out.is_dir():
        raise CLIError(f"OUT {str(out)!r} exists and is a file")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CLIError(f"OUT {str(out)!r} exists and is not empty: pass --force to replace it")


@contextlib.contextmanager
def _atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` (renamed into place), on failure it
    is removed and ``out`` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    old = out.parent / f".{out.name}.old-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def _config_source(config: Path | None, checkpoint: Path, ema_dir: Path) -> Path | None:
    """``config.json`` to export: ``--config`` (a folder or the file), else the checkpoint's, else the ema_net's."""
    if config is not None:
        file = config / CONFIG_NAME if config.is_dir() else config
        if not file.is_file():
            raise CLIError(f"--config {str(config)!r}: no {CONFIG_NAME} there")
        return file
    for folder in (checkpoint, ema_dir):
        if (folder / CONFIG_NAME).is_file():
            return folder / CONFIG_NAME
    return None


def _write_config(src: Path, dst: Path, dtype: str | None) -> None:
    """Copy ``config.json`` with its ``dtype`` (``torch_dtype`` in transformers 4) set to the exported weights'
    dtype, so that ``from_pretrained(dtype="auto")`` gives the exported values unchanged."""
    cfg = _read_json(src)
    if dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]
        for k in keys:
            cfg[k] = dtype
    atomic_write_text(dst, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _load_cast(file: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(file))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors


def _save_tensors(tensors: Mapping[str, torch.Tensor], file: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt"})


def _checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's own weights (``model.safetensors`` or its shards), read without unpickling."""
    from safetensors.torch import load_file

    single = checkpoint / WEIGHTS_NAME
    index = checkpoint / f"{WEIGHTS_NAME}.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        weight_map = _read_json(index).get("weight_map") or {}
        out: dict[str, torch.Tensor] = {}
        for f in sorted(set(weight_map.values())):
            out.update(load_file(str(checkpoint / f)))
        return out
    raise CLIError(
        f"the EMA holds only some tensors (trainable_only), so export completes it with the checkpoint's weights, "
        f"but {str(checkpoint)!r} has no {WEIGHTS_NAME} (nor its .index.json); hf_ema never reads pickled .bin files"
    )


def _export(
    checkpoint: Path,
    out: Path,
    *,
    ema: str | None = None,
    force: bool = False,
    dtype: torch.dtype | None = None,
    config: Path | None = None,
    tokenizer: Path | None = None,
) -> dict[str, Any]:
    """Write the EMA of ``checkpoint`` as a standalone model (or PEFT adapter) folder ``out``; return a summary."""
    ema_dir, ckpt_dir, label = _resolve_ema(checkpoint, ema)
    with open_ema_net(ema_dir) as reader:
        meta = dict(reader.meta)
    tok_src = tokenizer if tokenizer is not None else ckpt_dir
    if tokenizer is not None and not tokenizer.is_dir():
        raise CLIError(f"--tokenizer {str(tokenizer)!r} is not a folder")
    _check_out(out, force, ema_dir, ckpt_dir)
    adapter = (ema_dir / ADAPTER_CONFIG_NAME).is_file()
    if not adapter and (ckpt_dir / ADAPTER_CONFIG_NAME).is_file():
        raise CLIError(
            f"{str(ckpt_dir)!r} is a PEFT checkpoint, but its {label}/ has no {ADAPTER_CONFIG_NAME} (written before "
            "hf_ema wrote adapter files): load it with hf_ema.load_model(<base model class>, checkpoint), which puts "
            "the EMA tensors on the checkpoint's adapter, and save that model with save_pretrained"
        )
    summary: dict[str, Any] = {
        "source": str(ema_dir),
        "out": str(out),
        "step": meta.get("step"),
        "kind": "peft_adapter" if adapter else ("completed_model" if meta.get("trainable_only") else "model"),
    }
    with _atomic_folder(out) as tmp:
        files: list[str] = []
        if adapter:
            for f in sorted(ema_dir.rglob("*")):
                rel = f.relative_to(ema_dir)
                if not f.is_file() or f.name not in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                if f.name == ADAPTER_WEIGHTS_NAME and dtype is not None:
                    _save_tensors(_load_cast(f, dtype), tmp / rel)
                else:
                    shutil.copyfile(f, tmp / rel)
                files.append(str(rel))
            summary["base_model"] = _read_json(ema_dir / ADAPTER_CONFIG_NAME).get("base_model_name_or_path")
        else:
            if meta.get("trainable_only"):
                tensors = _checkpoint_weights(ckpt_dir)
                ema_tensors = _load_cast(ema_dir / WEIGHTS_NAME, None)
                unknown = sorted(set(ema_tensors) - set(tensors))
                wrong = [n for n in ema_tensors if n in tensors and ema_tensors[n].shape != tensors[n].shape]
                if unknown or wrong:
                    raise CLIError(
                        f"the EMA tensors of {str(ema_dir)!r} do not fit the checkpoint's weights in "
                        f"{str(ckpt_dir)!r}: {len(unknown)} name(s) missing there (e.g. {unknown[:3]}), "
                        f"{len(wrong)} of other shapes (e.g. {wrong[:3]})"
                    )
                tensors.update(ema_tensors)
                summary["from_ema"] = len(ema_tensors)
                summary["from_checkpoint"] = len(tensors) - len(ema_tensors)
                if dtype is not None:
                    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
                _save_tensors(tensors, tmp / WEIGHTS_NAME)
            elif dtype is not None:
                _save_tensors(_load_cast(ema_dir / WEIGHTS_NAME, dtype), tmp / WEIGHTS_NAME)
            else:
                shutil.copyfile(ema_dir / WEIGHTS_NAME, tmp / WEIGHTS_NAME)
            files.append(WEIGHTS_NAME)
            header = _st_header(tmp / WEIGHTS_NAME)
            summary["tensors"] = len(header)
            summary["dtype"] = _floating_dtype(header)
            cfg = _config_source(config, ckpt_dir, ema_dir)
            if cfg is not None:
                _write_config(cfg, tmp / CONFIG_NAME, summary["dtype"])
                files.append(CONFIG_NAME)
                summary["config_from"] = str(cfg)
                summary["architectures"] = _read_json(cfg).get("architectures")
            gen_src = (
                config if config is not None and config.is_dir() else ckpt_dir
            ) / GENERATION_CONFIG_NAME
            if gen_src.is_file():
                shutil.copyfile(gen_src, tmp / GENERATION_CONFIG_NAME)
                files.append(GENERATION_CONFIG_NAME)
        summary["tokenizer_files"] = _copy_tokenizer_files(tok_src, tmp) if tok_src.is_dir() else []
        files += summary["tokenizer_files"]
        record = {
            "exported_by": f"hf_ema {__version__}",
            "source": str(ema_dir.resolve()),
            "kind": summary["kind"],
            "ema": {k: v for k, v in meta.items() if k != "names"},
        }
        atomic_write_text(tmp / _EXPORT_RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")
        summary["files"] = [*files, _EXPORT_RECORD]
    return summary


def _print_export(s: Mapping[str, Any]) -> None:
    out = s["out"]
    if s["kind"] == "peft_adapter":
        print(f"exported the EMA adapter of {s['source']} (step {s['step']}) as a PEFT adapter folder: {out}")
        print(f"  files: {', '.join(s['files'])}")
        print(
            "  a PEFT adapter, not a complete model: load it with "
            f"PeftModel.from_pretrained(<base model>, {out!r}) (base model: {s.get('base_model') or 'not recorded'})"
        )
        return
    print(f"exported the EMA of {s['source']} (step {s['step']}) as a model folder: {out}")
    if s["kind"] == "completed_model":
        print(
            f"  the EMA tracked only trainable tensors: {s['from_ema']} EMA tensor(s) on top of the checkpoint's "
            f"{s['from_checkpoint']} other tensor(s)"
        )
    print(f"  model.safetensors: {s['tensors']} tensors ({s['dtype']})")
    print(f"  files: {', '.join(s['files'])}")
    if "config_from" not in s:
        print(
            f"  warning: no {CONFIG_NAME} found (checkpoint, ema_net or --config): from_pretrained cannot load "
            "this folder; pass --config <a folder with the model's config.json>",
            file=sys.stderr,
        )
    else:
        cls = (s.get("architectures") or ["AutoModel"])[0]
        print(f"  load it with transformers.{cls}.from_pretrained({out!r})")


def _cmd_export(args: argparse.Namespace) -> int:
    summary = _export(
        Path(args.checkpoint),
        Path(args.out),
        ema=args.ema,
        force=args.force,
        dtype=_parse_dtype(args.dtype),
        config=Path(args.config) if args.config else None,
        tokenizer=Path(args.tokenizer) if args.tokenizer else None,
    )
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print_export(summary)
    return 0


# ============================================================================ synthesize
def _check_sigmas(values: Sequence[float], flag: str) -> list[float]:
    from .power import check_sigma_rel

    out: list[float] = []
    for v in values:
        try:
            s = check_sigma_rel(v, flag)
        except ValueError as e:
            raise CLIError(str(e)) from e
        if s not in out:
            out.append(s)
    return out


def _grid(start: float, stop: float, num: int) -> list[float]:
    if num < 1:
        raise CLIError(f"--grid: NUM must be >= 1, got {num}")
    if num == 1:
        return [start]
    # 12 significant digits: 0.12, not 0.12000000000000001, in the table, the CSV and the folder names
    return [float(f"{start + (stop - start) * i / (num - 1):.12g}") for i in range(num)]


def _run_config(run: Path) -> Path | None:
    from .posthoc import read_manifest

    name = read_manifest(run).get("config")
    return run / name if name and (run / name).is_file() else None


def _complete_folder(folder: Path, config: Path | None, tokenizer: Path | None) -> list[str]:
    """Add ``config.json`` (when the synthesised ``ema_net`` lacks one and is a complete model) and tokenizer files
    (beside ``ema_net``, as in a checkpoint) to a synthesis output folder."""
    added = []
    ema = folder / EMA_DIRNAME
    if config is not None and not (ema / CONFIG_NAME).is_file():
        meta = _read_json(ema / STATE_NAME)
        if not meta.get("trainable_only"):
            dtype = _floating_dtype(_st_header(ema / WEIGHTS_NAME))
            _write_config(config, ema / CONFIG_NAME, dtype)
            added.append(f"{EMA_DIRNAME}/{CONFIG_NAME}")
    if tokenizer is not None:
        added += _copy_tokenizer_files(tokenizer, folder)
    return added


def _config_arg(value: str | None, flag: str = "--config") -> Path | None:
    if value is None:
        return None
    p = Path(value)
    file = p / CONFIG_NAME if p.is_dir() else p
    if not file.is_file():
        raise CLIError(
            f"{flag} {value!r}: no {CONFIG_NAME} there (give a checkpoint folder or a config.json)"
        )
    return file


def _tokenizer_arg(value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(value)
    if not p.is_dir():
        raise CLIError(f"--tokenizer {value!r} is not a folder")
    return p


def _pick_config(run: Path, config: Path | None) -> Path | None:
    """The run's own ``config.json`` wins over ``--config`` (a note says so); ``--config`` fills a missing one."""
    own = _run_config(run)
    if own is not None and config is not None:
        print(
            f"{PROG}: note: the run recorded its model's config.json; --config is not used", file=sys.stderr
        )
        return None
    return config


def _manifest_files(run: Path) -> dict[str, dict[str, Any]]:
    from .posthoc import read_manifest

    return {"/".join(e["files"]): e for e in read_manifest(run)["snapshots"]}


def _warn_residuals(pairs: Sequence[tuple[float, float]]) -> None:
    """A note for targets whose fitted profile is off by more than ``_RESIDUAL_NOTE`` (relative L2)."""
    bad = [f"{s:.4f} ({r:.1%})" for s, r in pairs if r > _RESIDUAL_NOTE]
    if bad:
        print(
            f"{PROG}: note: fit residual above {_RESIDUAL_NOTE:.0%} for sigma_rel {', '.join(bad)}: the snapshots "
            "represent these widths only roughly (too few snapshots, or widths far from the tracked profiles)",
            file=sys.stderr,
        )


def _print_synthesis(run: Path, results: Sequence[Any], show_paths: bool) -> None:
    r0 = results[0]
    entries = _manifest_files(run)
    print(
        f"post-hoc EMA of {run} at step {r0.step} (t = {_num(r0.t)}): {len(r0.coefficients)} snapshot(s) combined, "
        f"Gram matrix condition number {r0.cond:.3g}"
    )
    print(f"  {'sigma_rel':>9}  {'gamma':>8}  {'residual':>9}" + ("  folder" if show_paths else ""))
    for r in results:
        where = f"  {r.path / EMA_DIRNAME}" if show_paths and r.path is not None else ""
        print(f"  {r.sigma_rel:9.4f}  {r.gamma:8.3f}  {r.residual:9.3g}{where}")
    print("weights (rows: snapshots; columns: target sigma_rel; each column sums to 1):")
    head = f"  {'step':>9}  {'profile':>9}  " + "  ".join(f"{r.sigma_rel:>9.4f}" for r in results)
    print(head)
    for key in r0.coefficients:
        e = entries.get(key, {})
        prof = e.get("sigma_rel")
        row = f"  {e.get('step', '?'):>9}  {(f'{prof:.4f}' if prof is not None else '?'):>9}  "
        print(row + "  ".join(f"{r.coefficients[key]:>9.4f}" for r in results))
    _warn_residuals([(r.sigma_rel, r.residual) for r in results])


def _result_json(r: Any) -> dict[str, Any]:
    return {
        "sigma_rel": r.sigma_rel,
        "gamma": r.gamma,
        "step": r.step,
        "t": r.t,
        "residual": r.residual,
        "cond": r.cond,
        "path": str(r.path) if r.path is not None else None,
        "coefficients": r.coefficients,
    }


def _cmd_synthesize(args: argparse.Namespace) -> int:
    from .posthoc import read_manifest, synthesize

    run = Path(args.run)
    sigmas = _check_sigmas(args.sigma_rel, "--sigma-rel")
    config = _config_arg(args.config)
    tokenizer = _tokenizer_arg(args.tokenizer)
    read_manifest(run)
    config = _pick_config(run, config)
    results = synthesize(
        run,
        sigmas,
        at_step=args.at_step,
        out_dir=Path(args.out),
        dtype=_parse_dtype(args.dtype) or torch.float32,
        batch_size=args.batch_size,
        progress=sys.stderr.isatty(),
    )
    for r in results:
        _complete_folder(r.path, config, tokenizer)
    if args.json:
        print(json.dumps({"run": str(run), "results": [_result_json(r) for r in results]}, indent=2))
    else:
        _print_synthesis(run, results, show_paths=True)
        if not (results[0].path / EMA_DIRNAME / CONFIG_NAME).is_file():
            print(
                f"note: the run recorded no model config and none was given (--config): load the results with "
                f"hf_ema.load_model(<model instance>, {str(results[0].path)!r})"
            )
    return 0


# ============================================================================ sweep
def _load_hook(spec: str) -> Callable[..., Any]:
    """``module:function`` or ``path/to/file.py:function`` -> the function."""
    if ":" not in spec:
        raise CLIError(f"--eval must be MODULE:FUNCTION or path/to/file.py:FUNCTION, got {spec!r}")
    target, func = spec.rsplit(":", 1)
    if not target or not func:
        raise CLIError(f"--eval must be MODULE:FUNCTION or path/to/file.py:FUNCTION, got {spec!r}")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    try:
        if is_file:
            path = Path(target)
            if not path.is_file():
                raise CLIError(f"--eval {spec!r}: no file {target!r}")
            folder = str(path.resolve().parent)
            if folder not in sys.path:
                sys.path.insert(0, folder)  # the hook file may import its neighbours
            name = f"_hf_ema_hook_{path.stem}_{uuid.uuid4().hex[:8]}"
            mod_spec = importlib.util.spec_from_file_location(name, path)
            if mod_spec is None or mod_spec.loader is None:
                raise CLIError(f"--eval {spec!r}: cannot load {target!r} as Python")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # as `python -m` does
            module = importlib.import_module(target)
    except CLIError:
        raise
    except Exception as e:
        raise CLIError(f"--eval {spec!r}: importing {target!r} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, func, None)
    if fn is None:
        raise CLIError(f"--eval {spec!r}: {target!r} has no attribute {func!r}")
    if not callable(fn):
        raise CLIError(f"--eval {spec!r}: {func!r} is a {type(fn).__name__}, not a function")
    return fn


def _metrics(value: Any, spec: str, sigma: float) -> dict[str, float]:
    if not isinstance(value, Mapping) or not value:
        raise CLIError(
            f"the eval hook {spec!r} must return a non-empty dict of metrics (name -> number) for "
            f"sigma_rel={sigma:.4f}, got {type(value).__name__} {value!r:.80}"
        )
    out: dict[str, float] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise CLIError(f"the eval hook {spec!r} returned a metric named {k!r}: names must be strings")
        try:
            if isinstance(v, bool) or not (isinstance(v, numbers.Real) or hasattr(v, "item")):
                raise TypeError
            out[k] = float(v.item() if hasattr(v, "item") else v)
        except (TypeError, ValueError, RuntimeError) as e:
            raise CLIError(
                f"the eval hook {spec!r} returned {k!r}: {v!r:.80} for sigma_rel={sigma:.4f}; metrics must be "
                "numbers"
            ) from e
    return out


def _best(rows: Sequence[Mapping[str, Any]], metric: str, mode: str) -> int:
    """Index of the best row (NaN counts as the worst)."""

    def key(i: int) -> float:
        v = rows[i]["metrics"][metric]
        if math.isnan(v):
            return math.inf
        return v if mode == "min" else -v

    return min(range(len(rows)), key=key)


def _write_plot(
    file: Path, rows: Sequence[Mapping[str, Any]], metric: str, best: int, title: str
) -> str | None:
    """Metric against sigma_rel as PNG (matplotlib, Agg); the reason when no plot was made."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    xs = [r["sigma_rel"] for r in rows]
    ys = [r["metrics"][metric] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        ax.plot(xs, ys, marker="o")
        ax.plot([xs[best]], [ys[best]], marker="*", markersize=16, linestyle="none", label="best")
        ax.set_xlabel("sigma_rel (EMA length relative to the training time)")
        ax.set_ylabel(metric)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = file.with_name(f".{file.name}.tmp-{uuid.uuid4().hex[:8]}.png")
        try:
            fig.savefig(tmp, dpi=120)
            os.replace(tmp, file)
        finally:
            if tmp.exists():
                tmp.unlink()
    finally:
        plt.close(fig)
    return None


def _csv_text(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["sigma_rel", "gamma", "residual", *names])
    for r in rows:
        writer.writerow(
            [repr(r["sigma_rel"]), repr(r["gamma"]), repr(r["residual"])]
            + [repr(r["metrics"].get(n, math.nan)) for n in names]
        )
    return buf.getvalue()


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .posthoc import read_manifest, synthesize

    run = Path(args.run)
    if args.sigma_rel is not None:
        sigmas = _check_sigmas(args.sigma_rel, "--sigma-rel")
    else:
        start, stop, num = args.grid
        sigmas = _check_sigmas(_grid(float(start), float(stop), int(num)), "--grid")
    sigmas.sort()
    config = _config_arg(args.config)
    tokenizer = _tokenizer_arg(args.tokenizer)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise CLIError(f"--out {str(out)!r} exists and is not empty: pass --force to overwrite its results")
    manifest = read_manifest(run)
    config = _pick_config(run, config)
    hook = _load_hook(args.eval)
    dtype = _parse_dtype(args.dtype) or torch.float32
    metric: str | None = args.metric
    rows: list[dict[str, Any]] = []
    print(f"sweep of {run} over sigma_rel {', '.join(f'{s:.4f}' for s in sigmas)} with {args.eval}")
    for s in sigmas:
        res = synthesize(run, [s], at_step=args.at_step, dtype=dtype, progress=False)[0]
        try:
            value = hook(res.tensors, s)
        except Exception as e:
            raise CLIError(
                f"the eval hook {args.eval!r} raised {type(e).__name__} for sigma_rel={s:.4f}: {e}"
            ) from e
        res.tensors = None
        m = _metrics(value, args.eval, s)
        if metric is None:
            if len(m) != 1:
                raise CLIError(
                    f"the eval hook returns several metrics ({', '.join(m)}): pick the one to optimise with --metric"
                )
            metric = next(iter(m))
        if metric not in m:
            raise CLIError(
                f"--metric {metric!r} is not among the eval hook's metrics for sigma_rel={s:.4f}: {', '.join(m)}"
            )
        if math.isnan(m[metric]):
            print(
                f"{PROG}: warning: {metric} is NaN for sigma_rel={s:.4f} (counted as the worst)",
                file=sys.stderr,
            )
        rows.append(
            {"sigma_rel": s, "gamma": res.gamma, "step": res.step, "residual": res.residual, "metrics": m}
        )
        print(
            f"  sigma_rel {s:.4f}: {metric} = {m[metric]:.6g} (fit residual {res.residual:.3g})", flush=True
        )
    assert metric is not None
    best = _best(rows, metric, args.mode)
    names = list(dict.fromkeys(n for r in rows for n in r["metrics"]))

    out.mkdir(parents=True, exist_ok=True)
    best_s = rows[best]["sigma_rel"]
    # the best EMA as a synthesis output folder: out/best/ema_net (+ tokenizer files beside it)
    staging = out / f".best.tmp-{uuid.uuid4().hex[:8]}"
    try:
        res = synthesize(run, [best_s], at_step=args.at_step, out_dir=staging, dtype=dtype, progress=False)[0]
        assert res.path is not None
        _complete_folder(res.path, config, tokenizer)
        final = out / "best"
        old = out / f".best.old-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.replace(final, old)
        os.replace(res.path, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    summary = {
        "run": str(run),
        "run_id": manifest["run_id"],
        "at_step": args.at_step,
        "step": rows[0]["step"],
        "eval": args.eval,
        "metric": metric,
        "mode": args.mode,
        "best": {**rows[best], "path": str(out / "best")},
        "results": rows,
    }
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "sweep.csv", _csv_text(rows, names))
    why = _write_plot(
        out / "sweep.png",
        rows,
        metric,
        best,
        f"post-hoc EMA sweep, step {rows[0]['step']} ({args.mode} is best)",
    )

    print(f"results at step {rows[0]['step']} ({args.mode} {metric} is best):")
    print(f"  {'':1} {'sigma_rel':>9}  {'residual':>9}  " + "  ".join(f"{n:>12}" for n in names))
    for i, r in enumerate(rows):
        mark = "*" if i == best else " "
        vals = "  ".join(f"{r['metrics'].get(n, math.nan):>12.6g}" for n in names)
        print(f"  {mark} {r['sigma_rel']:9.4f}  {r['residual']:9.3g}  {vals}")
    _warn_residuals([(r["sigma_rel"], r["residual"]) for r in rows])
    print(f"best: sigma_rel {best_s:.4f} ({metric} = {rows[best]['metrics'][metric]:.6g}) -> {out / 'best'}")
    print(f"  standalone model folder: {PROG} export {out / 'best'} OUT")
    print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.json'}" + ("" if why else f", {out / 'sweep.png'}"))
    if why:
        print(f"{PROG}: note: {why}", file=sys.stderr)
    return 0


# ============================================================================ parser
_INSPECT_HELP = """\
Show what PATH holds: a checkpoint folder (each ema_net / ema_net-<name>: step, num_updates, decay, schedule and
its arguments, update_every, dtype, tensor and parameter counts, bytes on disk, PEFT adapter files), an ema_net
folder, or a post-hoc EMA run folder (run id, world size, layout, profiles, snapshots, bytes).

examples:
  hf-ema inspect out/checkpoint-500
  hf-ema inspect out/checkpoint-500/ema_net --json
  hf-ema inspect runs/exp1/phema
"""

_EXPORT_HELP = """\
Write the EMA of CHECKPOINT as a standalone model folder OUT: model.safetensors with the EMA weights under the
model's names, the checkpoint's config.json (its dtype set to the weights' dtype) and generation_config.json, and
its tokenizer / processor files. OUT then loads with AutoModel...from_pretrained(OUT) and
AutoTokenizer.from_pretrained(OUT). The EMA of a PEFT model is exported as a PEFT adapter folder
(adapter_model.safetensors + adapter_config.json); an EMA of the trainable tensors only (trainable_only) is put on
top of the checkpoint's own weights. OUT is written under a temporary name and renamed into place.

examples:
  hf-ema export out/checkpoint-500 ema-model
  hf-ema export out/checkpoint-500 ema-slow --ema slow --dtype bfloat16
  hf-ema export synth/sigma_rel-0.0800 ema-model --tokenizer out/checkpoint-500 --force
"""

_SYNTH_HELP = """\
Reconstruct the EMA of other widths sigma_rel from the snapshots of a PostHocEMA run (EDM2 post-hoc EMA). Each
result goes to OUT/sigma_rel-<value>[-step-<N>]/ema_net, loadable with hf_ema.load_model(cls, folder) and, when the
run recorded the model's config (or --config gives one), cls.from_pretrained(folder/ema_net). Prints each target's
fit residual and the snapshot weights.

examples:
  hf-ema synthesize runs/exp1/phema --sigma-rel 0.03 0.07 --out synth
  hf-ema synthesize runs/exp1/phema --sigma-rel 0.08 --at-step 6000 --out synth --config out/checkpoint-6000
"""

_SWEEP_HELP = """\
For each sigma_rel, synthesise the EMA (in memory, one at a time), call the evaluation hook on it, print a table,
write OUT/sweep.csv, OUT/sweep.json and OUT/sweep.png (metric vs sigma_rel; needs matplotlib), and write the best
EMA to OUT/best/ema_net (hf-ema export OUT/best MODEL makes a standalone model folder of it).

The hook is a Python function `fn(state_dict: dict[str, torch.Tensor], sigma_rel: float) -> dict[str, float]`
given as MODULE:FUNCTION or path/to/file.py:FUNCTION; e.g.

    model = None
    def evaluate(state_dict, sigma_rel):
        global model
        if model is None:
            model = AutoModelForSequenceClassification.from_pretrained("out/checkpoint-500").eval()
        model.load_state_dict(state_dict)
        return {"eval_loss": my_eval_loss(model)}   # or trainer.evaluate() of a Trainer built once

examples:
  hf-ema sweep runs/exp1/phema --grid 0.02 0.2 10 --eval evaluate.py:evaluate --metric eval_loss --out sweep
  hf-ema sweep runs/exp1/phema --sigma-rel 0.05 0.1 0.15 --eval mypkg.hooks:accuracy --mode max --out sweep
"""


def _common(debug_default: Any) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--debug", action="store_true", default=debug_default, help="show the full traceback of an error"
    )
    return p


def _sigma(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-ema`` argument parser (one sub-command per verb)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, export and synthesise the EMA weights written by hf_ema.",
        epilog="Run `hf-ema VERB --help` for a verb's options and examples. See docs/CLI.md.",
        parents=[_common(False)],
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    # Sub-commands take --debug too, without overriding a --debug given before the verb.
    common = [_common(argparse.SUPPRESS)]
    dtypes = sorted({"float32", "bfloat16", "float16", "fp32", "bf16", "fp16"})

    p = sub.add_parser(
        "inspect",
        help="show a checkpoint's EMAs or a post-hoc run",
        description=_INSPECT_HELP,
        parents=common,
        formatter_class=fmt,
    )
    p.add_argument("path", metavar="PATH", help="checkpoint folder, ema_net folder or post-hoc run folder")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "export",
        help="write the EMA as a standalone model folder",
        description=_EXPORT_HELP,
        parents=common,
        formatter_class=fmt,
    )
    p.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="checkpoint folder (with ema_net/) or an ema_net folder"
    )
    p.add_argument("out", metavar="OUT", help="the model folder to write (must be new or empty, or --force)")
    p.add_argument("--ema", metavar="NAME", help="export the named EMA's ema_net-NAME folder")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--dtype", choices=dtypes, help="cast floating tensors (default: as stored)")
    p.add_argument(
        "--config", metavar="PATH", help="take config.json (and generation config) from this folder/file"
    )
    p.add_argument(
        "--tokenizer", metavar="DIR", help="take tokenizer/processor files from DIR (default: CHECKPOINT)"
    )
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "synthesize",
        help="EMAs of other widths from a post-hoc run",
        description=_SYNTH_HELP,
        parents=common,
        formatter_class=fmt,
    )
    p.add_argument("run", metavar="RUN", help="the PostHocEMA run folder (with manifest.json)")
    p.add_argument("--sigma-rel", type=_sigma, nargs="+", required=True, metavar="S", help="target widths")
    p.add_argument(
        "--at-step", type=_positive_int, metavar="N", help="optimizer step (default: the last snapshot)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--config", metavar="PATH", help="config.json to add when the run recorded none")
    p.add_argument(
        "--tokenizer", metavar="DIR", help="copy tokenizer/processor files from DIR beside each ema_net"
    )
    p.add_argument("--dtype", choices=dtypes, help="dtype of the written floating tensors (default float32)")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="targets per pass over the snapshots")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_synthesize)

    p = sub.add_parser(
        "sweep",
        help="evaluate synthesised EMAs and keep the best",
        description=_SWEEP_HELP,
        parents=common,
        formatter_class=fmt,
    )
    p.add_argument("run", metavar="RUN", help="the PostHocEMA run folder (with manifest.json)")
    grid = p.add_mutually_exclusive_group(required=True)
    grid.add_argument("--sigma-rel", type=_sigma, nargs="+", metavar="S", help="widths to evaluate")
    grid.add_argument(
        "--grid", type=_sigma, nargs=3, metavar=("START", "STOP", "NUM"), help="NUM evenly spaced widths"
    )
    p.add_argument(
        "--eval", required=True, metavar="HOOK", help="MODULE:FUNCTION or path/to/file.py:FUNCTION"
    )
    p.add_argument(
        "--metric", metavar="NAME", help="the metric to optimise (needed when the hook returns several)"
    )
    p.add_argument(
        "--mode", choices=("min", "max"), default="min", help="lower (min, default) or higher is better"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--at-step", type=_positive_int, metavar="N", help="optimizer step (default: the last snapshot)"
    )
    p.add_argument("--config", metavar="PATH", help="config.json for OUT/best when the run recorded none")
    p.add_argument("--tokenizer", metavar="DIR", help="copy tokenizer/processor files from DIR into OUT/best")
    p.add_argument("--dtype", choices=dtypes, help="dtype of the synthesised tensors (default float32)")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT")
    p.set_defaults(func=_cmd_sweep)
    return parser


# ============================================================================ main
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hf-ema`` command line; return the exit code (0 success, 1 bad input, 2 bad command line).

    Args:
        argv: The arguments (default ``sys.argv[1:]``).

    Example:
        >>> main(["inspect", "out/checkpoint-500", "--json"])  # doctest: +SKIP
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2, already printed by argparse)
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
    if (
        args.verb == "sweep"
        and args.grid is not None
        and not (math.isfinite(args.grid[2]) and args.grid[2] == int(args.grid[2]) and args.grid[2] >= 1)
    ):
        print(
            f"{PROG} sweep: error: --grid: NUM must be an integer >= 1, got {args.grid[2]:g}", file=sys.stderr
        )
        return 2

    def show(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        print(f"{PROG}: warning: {_one_line(str(message))}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            return int(args.func(args))
        except KeyboardInterrupt:
            if args.debug:
                raise
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if args.debug:
                raise
            expected = isinstance(e, (CLIError, ValueError, FileNotFoundError, PermissionError))
            text = _one_line(str(e)) if expected else f"{type(e).__name__}: {_one_line(str(e))}"
            hint = "" if expected else " (run with --debug for the traceback)"
            print(f"{PROG}: error: {text}{hint}", file=sys.stderr)
            return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
