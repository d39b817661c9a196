"""Files of the EMA: the ``ema_net/`` folder, written atomically and read without unpickling.

Layout of ``<dir>/ema_net/``:

* ``model.safetensors``: the EMA weights under the model's own state-dict names (what resuming reads);
* ``ema_state.json``: step count, schedule and arguments, library version (everything to resume exactly);
* ``config.json``: the model's Hugging Face config, only when ``model.safetensors`` is the complete model under the
  names ``from_pretrained`` reads, so that the folder loads with ``AutoModel...from_pretrained(<dir>/ema_net)``;
* for a PEFT model, ``adapter_model.safetensors`` + ``adapter_config.json`` (see :mod:`hf_ema.adapters`), so that
  ``PeftModel.from_pretrained(base, <dir>/ema_net)`` loads the EMA adapter;
* for a bias-corrected EMA (BEMA, ``decay_type="bema"``, :mod:`hf_ema.bema`): ``model.safetensors`` holds the
  corrected weights ``EMA + alpha * (theta - theta_0)`` (what ``load_model`` / ``from_pretrained`` load), and two
  more files under the same names hold the state that resuming needs: ``bema_ema.safetensors`` (the uncorrected
  EMA of the corrected parameters) and, once averaging has started, ``bema_theta0.safetensors`` (their
  ``theta_0``); ``ema_state.json`` has ``bias_correction: {"theta0_step": ...}``. Buffers are not corrected: their
  EMA is in ``model.safetensors`` only.

A named EMA (``EMAState(..., name="slow")``, several EMAs of one model) has the same layout in
``<dir>/ema_net-slow/`` (:func:`ema_dirname`).

The folder is first written next to its final place under a temporary name, then renamed into place, so a crash
mid-save leaves either the previous ``ema_net`` or the new one, never a half-written folder that loads.

Crash recovery. ``ema_state.json`` is written last, after the weights and the config are on disk: a temporary
folder that holds it is a complete save (its commit record). A process killed after that point, but before the
rename that publishes the folder, leaves ``ema_net`` missing and that complete folder beside it;
:func:`find_ema_dir` (and so every loader, ``has_ema`` and the Trainer callback's resume) finishes such a save by
renaming the folder into place. Rolling forward, rather than back to the ``ema_net`` the save was replacing, is
deliberate: the new folder is what the interrupted save was publishing (in a Trainer checkpoint it is the EMA of
that checkpoint's own weights; a folder being replaced there can only be a stale one of an earlier run), and it is
the same rename the writer itself does, so a reader that finishes a save racing with its writer changes nothing.
A kill before the commit record leaves no usable ``ema_net`` at all: loaders then say so (the callback refuses to
resume quietly without it, see ``allow_ema_restart``), never load a half-written folder.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BEMA_EMA_NAME",
    "BEMA_THETA0_NAME",
    "EMA_DIRNAME",
    "STATE_NAME",
    "WEIGHTS_NAME",
    "EMAFileError",
    "EMANetReader",
    "atomic_write_text",
    "check_ema_meta",
    "ema_dirname",
    "find_ema_dir",
    "load_ema_meta",
    "load_ema_net",
    "open_ema_file",
    "open_ema_net",
    "remove_ema_dir",
    "save_ema_net",
    "summarize_names",
]

logger = logging.getLogger(__name__)

EMA_DIRNAME = "ema_net"
WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "ema_state.json"
CONFIG_NAME = "config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: A bias-corrected EMA's (BEMA's) uncorrected EMA and its theta_0, beside ``model.safetensors`` (see above).
BEMA_EMA_NAME = "bema_ema.safetensors"
BEMA_THETA0_NAME = "bema_theta0.safetensors"


_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
# Temporary and previous folders of a save carry 8 hex digits; matching exactly those keeps one EMA's leftovers
# (``.ema_net-a.old-1234abcd``) apart from another EMA whose name merely starts alike (``a.old-x``).
_TMP_SUFFIX_GLOB = "????????"


class EMAFileError(ValueError):
    """An ``ema_net`` folder is missing, incomplete or corrupt."""


def summarize_names(names: Iterable[str], limit: int = 5) -> str:
    """``'a', 'b', 'c' and 12 more (15 in all)`` for error messages: the first ``limit`` names and a count."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    if len(names) <= limit:
        return shown
    return f"{shown} and {len(names) - limit} more ({len(names)} in all)"


def ema_dirname(name: str | None = None) -> str:
    """The folder name of the EMA called ``name`` in a checkpoint: ``ema_net`` for ``None``, else ``ema_net-<name>``.

    Several EMAs of one model (e.g. decays 0.999 and 0.9999) each get a name, hence a folder of their own beside
    the unnamed one; ``hf_ema.load_model(..., ema=name)`` and ``EMAState(..., name=name).load(dir)`` pick it.

    Args:
        name: ``None`` or a non-empty string of letters, digits, ``_``, ``.`` and ``-``.

    Raises:
        ValueError: If ``name`` is not ``None`` and not such a string.

    Example:
        >>> ema_dirname(), ema_dirname("slow")
        ('ema_net', 'ema_net-slow')
    """
    if name is None:
        return EMA_DIRNAME
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"`name` of an EMA must be None or a non-empty string of letters, digits, '_', '.' and '-' "
            f"(its folder is 'ema_net-<name>'), got {name!r}"
        )
    return f"{EMA_DIRNAME}-{name}"


def _is_ema_dirname(folder: str) -> bool:
    if folder == EMA_DIRNAME:
        return True
    prefix = f"{EMA_DIRNAME}-"
    return folder.startswith(prefix) and _NAME_RE.fullmatch(folder[len(prefix) :]) is not None


def _ema_dir(path: str | os.PathLike, name: str | None = None) -> Path:
    """``path`` itself when it is an EMA folder (holds ``ema_state.json``, or is called ``ema_net`` /
    ``ema_net-<name>``), else ``path/ema_net`` (``path/ema_net-<name>`` for a named EMA)."""
    path = Path(path)
    if (path / STATE_NAME).is_file() or _is_ema_dirname(path.name):
        return path
    return path / ema_dirname(name)


def _tmp_prefix(dirname: str) -> str:
    """Prefix of a save being written into ``dirname`` (complete once it holds ``ema_state.json``)."""
    return f".{dirname}.tmp-"


def _old_prefix(dirname: str) -> str:
    """Prefix of the ``dirname`` folder a save is replacing, moved aside for the two renames."""
    return f".{dirname}.old-"


def _leftovers(parent: Path, prefix: str) -> list[Path]:
    """Folders ``<prefix><8 characters>`` in ``parent``: exactly 8, so that EMAs whose names start alike (``a`` and
    ``a.old-x``) never take each other's leftovers."""
    return list(parent.glob(f"{glob.escape(prefix)}{_TMP_SUFFIX_GLOB}"))


def _fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (files created or renamed in it) durable; a no-op where folders cannot
    be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename it into place; the file
    and the rename are flushed to disk before it returns.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.json"
        >>> atomic_write_text(p, "{}"); p.read_text()
        '{}'
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _contiguous_cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int], str] = {}
    for name, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if key is not None and key in seen:  # safetensors refuses shared storage: store an own copy
            t = t.clone()
        elif key is not None:
            seen[key] = name
        out[name] = t
    return out


def save_ema_net(
    directory: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    config: Any = None,
    files: Mapping[str, Mapping[str, torch.Tensor] | str] | None = None,
    dirname: str = EMA_DIRNAME,
) -> Path:
    """Write ``directory/ema_net/`` atomically.

    ``config.json`` is written only when ``tensors`` are a complete model that ``from_pretrained(ema_net)`` reads
    under its own names: not when ``meta["trainable_only"]`` is true (part of the model only: ``from_pretrained``
    would quietly initialise the rest at random) and not when ``files`` hold an ``adapter_config.json`` (a PEFT
    model: its names are ``base_model.model.…``, which the base class does not read; the adapter files are what
    loads). Without it, ``from_pretrained(ema_net)`` fails loudly instead.

    Order of the writes (what a crash at each point leaves is in the module docstring): the weights and the config
    into a temporary folder beside ``ema_net``, flushed to disk; then ``ema_state.json`` (the commit record);
    then the rename into place (a previous ``ema_net`` is moved aside first and deleted after).

    Args:
        directory: The checkpoint folder (created if missing); the EMA goes to its ``ema_net`` sub-folder.
        tensors: EMA weights under the model's state-dict names.
        meta: JSON-serialisable state (step, schedule, arguments).
        config: A Hugging Face ``PretrainedConfig`` to write as ``config.json`` (optional, see above).
        files: More files for the folder, by path relative to it (e.g. ``"adapter_model.safetensors"``, or
            ``"other/adapter_config.json"``): a mapping of tensors is written as safetensors, a string as text.
        dirname: The sub-folder's name, ``ema_net`` or, for a named EMA, ``ema_dirname(name)``.

    Returns:
        The path of the ``ema_net`` folder.

    Example:
        >>> import tempfile
        >>> d = save_ema_net(tempfile.mkdtemp(), {"w": torch.zeros(2)}, {"step": 0})
        >>> sorted(p.name for p in d.iterdir())
        ['ema_state.json', 'model.safetensors']
    """
    from safetensors.torch import save_file

    if not _is_ema_dirname(dirname):
        raise ValueError(
            f"`dirname` must be 'ema_net' or 'ema_net-<name>' (see ema_dirname), got {dirname!r}"
        )
    files = dict(files or {})
    for rel in files:
        bad = (
            Path(rel).is_absolute()
            or ".." in Path(rel).parts
            or rel in (WEIGHTS_NAME, STATE_NAME, CONFIG_NAME)
        )
        if bad or not Path(rel).parts:
            raise ValueError(f"save_ema_net: extra file {rel!r} must be a new relative path inside ema_net")
    adapter = any(Path(rel).name == ADAPTER_CONFIG_NAME for rel in files)
    complete = not meta.get("trainable_only", False) and not adapter
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / dirname
    tmp = directory / f"{_tmp_prefix(dirname)}{uuid.uuid4().hex[:8]}"
    old = directory / f"{_old_prefix(dirname)}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(_contiguous_cpu(tensors), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if complete and config is not None and hasattr(config, "to_json_string"):
            atomic_write_text(tmp / CONFIG_NAME, config.to_json_string())
        for rel, content in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                atomic_write_text(tmp / rel, content)
            else:
                save_file(_contiguous_cpu(content), str(tmp / rel), metadata={"format": "pt"})
        for f in tmp.rglob("*"):  # data on disk before the commit record below says the folder is complete
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        # Written last: a temporary folder holding ema_state.json is a complete save, which find_ema_dir finishes
        # (renames into place) if this process dies before the renames below.
        text = json.dumps(dict(meta), indent=2, sort_keys=True)
        atomic_write_text(tmp / STATE_NAME, text)
        if final.exists():
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except FileNotFoundError:
            # A reader finished this save first (find_ema_dir renames a complete temporary folder into place):
            # nothing is lost when `ema_net` holds exactly what this save wrote.
            if not _holds_state(final, text):
                raise
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    # Also the leftovers of earlier interrupted saves into this folder (a save is never concurrent with another
    # into the same folder: only the main process writes).
    for stale in [old, *_leftovers(directory, _old_prefix(dirname)), *_leftovers(directory, _tmp_prefix(dirname))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def remove_ema_dir(directory: str | os.PathLike, dirname: str = EMA_DIRNAME) -> None:
    """Delete ``directory/<dirname>`` and the leftovers of interrupted saves into it (temporary and moved-aside
    folders), so that nothing there can be loaded or finished by :func:`find_ema_dir` any more.

    The Trainer callback calls it before the Trainer rewrites a checkpoint folder that an earlier run left in a
    reused ``output_dir``: that folder's EMA belongs to the earlier run, and a process killed before the new EMA is
    saved must not leave it to be resumed from.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = save_ema_net(d, {"w": torch.ones(1)}, {"step": 0})
        >>> remove_ema_dir(d); find_ema_dir(d) is None
        True
    """
    if not _is_ema_dirname(dirname):
        raise ValueError(f"`dirname` must be 'ema_net' or 'ema_net-<name>' (see ema_dirname), got {dirname!r}")
    directory = Path(directory)
    for folder in [
        directory / dirname,
        *_leftovers(directory, _tmp_prefix(dirname)),
        *_leftovers(directory, _old_prefix(dirname)),
    ]:
        shutil.rmtree(folder, ignore_errors=True)
    _fsync_dir(directory)


def _holds_state(folder: Path, text: str) -> bool:
    try:
        return (folder / STATE_NAME).read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        return False


def _has_files(folder: Path) -> bool:
    return (folder / WEIGHTS_NAME).is_file() and (folder / STATE_NAME).is_file()


def _safetensors_complete(path: Path) -> bool:
    """Whether ``path`` is a whole safetensors file: its header parses and the file is exactly as long as the
    header says (8-byte little-endian header length, JSON header, then the tensors' data)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return False
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return False
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return size == 8 + n + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False


def _complete_save(folder: Path) -> bool:
    """Whether a temporary folder of :func:`save_ema_net` holds a finished save: its commit record
    (``ema_state.json``, valid JSON) and whole weights."""
    if not _has_files(folder):
        return False
    try:
        json.loads((folder / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return _safetensors_complete(folder / WEIGHTS_NAME)


def _finish_interrupted_save(final: Path) -> Path | None:
    """``final`` (an ``ema_net`` path that does not exist) after finishing the save that a crash interrupted
    there, or ``None`` when no complete EMA was left beside it. See the module docstring for the rule."""
    parent = final.parent
    dirname = final.name

    def newest(folders: list[Path]) -> Path:
        return max(folders, key=lambda f: ((f / STATE_NAME).stat().st_mtime, f.name))

    try:
        done = [t for t in _leftovers(parent, _tmp_prefix(dirname)) if _complete_save(t)]
        moved_aside = [o for o in _leftovers(parent, _old_prefix(dirname)) if _has_files(o)]
        if done:  # the save had written everything: publish it, as it was about to
            source, what = newest(done), "the complete EMA that the interrupted save had written"
        elif moved_aside:  # only a save that failed and was rolling back leaves this alone
            source, what = newest(moved_aside), "the previous EMA, which the interrupted save had moved aside"
        else:
            return None
    except OSError:  # pragma: no cover - a folder vanished while listing (another process repairing)
        return final if _has_files(final) else None
    try:
        os.rename(source, final)
    except OSError as e:
        if _has_files(final):  # another process finished it first
            return final
        logger.warning(
            "%s is missing after an interrupted save and %s cannot be renamed to it (%s): reading it where it is",
            final,
            source,
            e,
        )
        return source
    _fsync_dir(parent)
    logger.warning(
        "Finished an interrupted save of the EMA: %s was missing; %s renamed to it (%s).",
        final,
        source.name,
        what,
    )
    for stale in _leftovers(parent, _old_prefix(dirname)):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def find_ema_dir(path: str | os.PathLike, name: str | None = None) -> Path | None:
    """The complete EMA folder for ``path``, or ``None`` when there is none.

    ``path`` is a checkpoint folder holding ``ema_net/`` (``ema_net-<name>/`` when ``name`` is given) or the EMA
    folder itself. When ``ema_net`` is
    missing because a process died inside :func:`save_ema_net` after its data was complete (killed between the
    commit record and the rename, or between the two renames of an overwrite), the save is finished here, on disk:
    the complete folder it left is renamed to ``ema_net`` (with a warning), so that
    ``from_pretrained(<dir>/ema_net)`` works again. Where the folder cannot be renamed (read-only storage) it is
    returned where it is. A save killed before its data was complete leaves nothing usable: ``None``.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> find_ema_dir(d) is None
        True
        >>> find_ema_dir(save_ema_net(d, {"w": torch.ones(1)}, {"step": 0}).parent).name
        'ema_net'
    """
    d = _ema_dir(path, name)
    if d.is_dir():
        return d if _has_files(d) else None
    if not _is_ema_dirname(d.name) or not d.parent.is_dir():
        return None
    return _finish_interrupted_save(d)


def _checked_ema_dir(path: str | os.PathLike, name: str | None = None) -> Path:
    found = find_ema_dir(path, name)
    if found is not None:
        return found
    d = _ema_dir(path, name)
    if not d.is_dir():
        raise EMAFileError(f"No EMA folder at {str(d)!r} (expected an `{d.name}` folder written by hf_ema)")
    missing = [f for f in (WEIGHTS_NAME, STATE_NAME) if not (d / f).is_file()]
    raise EMAFileError(f"EMA folder {str(d)!r} is incomplete: {missing[0]!r} is missing")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_float_dtype_name(v: Any) -> bool:
    dtype = getattr(torch, v, None) if isinstance(v, str) else None
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


#: The fields of an EMA state that hf_ema reads back: (check, what is expected).
_META_FIELDS: dict[str, tuple[Any, str]] = {
    "step": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "num_updates": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "update_every": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "total_steps": (lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"),
    "decay": (lambda v: _is_real(v) and 0 < v < 1, "a number strictly between 0 and 1"),
    "last_decay": (lambda v: v is None or (_is_real(v) and 0 <= v <= 1), "null or a number in [0, 1]"),
    "decay_type": (lambda v: isinstance(v, str) and bool(v), "a schedule name"),
    "schedule_kwargs": (
        lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
        "an object of schedule arguments",
    ),
    "dtype": (
        lambda v: v is None or _is_float_dtype_name(v),
        "null or a floating dtype name such as 'float32'",
    ),
    "buffers": (lambda v: v in ("average", "copy", "ignore"), "'average', 'copy' or 'ignore'"),
    "trainable_only": (lambda v: isinstance(v, bool), "true or false"),
    "names": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a list of tensor names"),
}


def check_ema_meta(meta: Any, source: str) -> None:
    """Check the EMA state that hf_ema reads back (``ema_state.json``, or the ``meta`` of a state dict).

    Each known field that is present must have the type and range that :class:`hf_ema.EMAState` writes, so a file
    edited by hand (``"update_every": 0``, ``"step": -3``, ``"step": "3"``) is refused as a whole rather than half
    used; fields it does not know are ignored.

    Args:
        meta: The decoded JSON.
        source: Where it comes from, for the message (e.g. the file's path).

    Raises:
        ValueError: Naming ``source`` and every field that is wrong, with its value.

    Example:
        >>> check_ema_meta({"step": 3, "update_every": 2}, "'x.json'")
        >>> check_ema_meta({"step": -3}, "'x.json'")
        Traceback (most recent call last):
        ...
        ValueError: Invalid EMA state in 'x.json': 'step' must be an integer >= 0, got -3
    """
    if not isinstance(meta, Mapping):
        raise ValueError(f"Invalid EMA state in {source}: expected a JSON object, got {type(meta).__name__}")
    problems = [
        f"{key!r} must be {want}, got {meta[key]!r}"
        for key, (ok, want) in _META_FIELDS.items()
        if key in meta and not ok(meta[key])
    ]
    step, num_updates = meta.get("step"), meta.get("num_updates")
    if not problems and _is_int(step) and _is_int(num_updates) and num_updates > step:
        problems.append(f"'num_updates' ({num_updates}) cannot exceed 'step' ({step})")
    if problems:
        raise ValueError(f"Invalid EMA state in {source}: " + "; ".join(problems))


def _read_meta(d: Path) -> dict:
    state = d / STATE_NAME
    try:
        meta = json.loads(state.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EMAFileError(f"Corrupt EMA state file {str(state)!r}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise EMAFileError(f"Corrupt EMA state file {str(state)!r}: expected a JSON object")
    try:
        check_ema_meta(meta, repr(str(state)))
    except ValueError as e:
        raise EMAFileError(str(e)) from e
    return meta


def load_ema_meta(path: str | os.PathLike, name: str | None = None) -> dict:
    """Read only the JSON state of an ``ema_net`` folder (step, schedule, options), not its weights.

    ``name`` picks a named EMA's folder (``ema_net-<name>``) when ``path`` is a checkpoint folder.

    Raises:
        EMAFileError: As :func:`load_ema_net`.
    """
    return _read_meta(_checked_ema_dir(path, name))


class EMANetReader:
    """An open ``ema_net`` folder whose tensors are read on demand, whole or by region, without unpickling.

    The safetensors header is read and checked when the reader opens; tensor data is read only by :meth:`read`, and a
    region reads just its own bytes (a rank of a sharded model reads its rows, not the whole model).

    Attributes:
        path: The ``ema_net`` folder.
        meta: The JSON state (step, schedule, options).
        shapes: Full shape of every saved tensor, by state-dict name.

    Example:
        >>> import tempfile
        >>> d = save_ema_net(tempfile.mkdtemp(), {"w": torch.arange(6.0).reshape(3, 2)}, {"step": 1})
        >>> with open_ema_net(d) as r:
        ...     r.shapes["w"], r.read("w", (slice(1, 2),)).tolist()
        ((3, 2), [[2.0, 3.0]])
    """

    def __init__(self, path: Path, meta: dict, handle: Any, weights: str = WEIGHTS_NAME) -> None:
        self.path = path
        self.meta = meta
        self.weights = weights
        self._handle = handle
        self.shapes: dict[str, tuple[int, ...]] = {
            name: tuple(handle.get_slice(name).get_shape())
            for name in handle.keys()  # noqa: SIM118 (a safe_open handle is not iterable)
        }

    def read(self, name: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """The tensor ``name``, or only its region ``index`` (one slice per leading dimension), on the CPU."""
        from safetensors import SafetensorError

        if self._handle is None:
            raise EMAFileError(f"The EMA reader of {str(self.path)!r} is closed")
        if name not in self.shapes:
            raise KeyError(f"{name!r} is not in {str(self.path / self.weights)!r}")
        try:
            if not index:
                return self._handle.get_tensor(name)
            return self._handle.get_slice(name)[index]
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            weights = self.path / self.weights
            raise EMAFileError(
                f"Corrupt EMA weights file {str(weights)!r}: cannot read {name!r} ({e})"
            ) from e

    def close(self) -> None:
        """Drop this reader's handle on the file (also done on leaving a ``with`` block); tensors already read
        stay valid."""
        self._handle = None

    def __enter__(self) -> EMANetReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_ema_net(path: str | os.PathLike, name: str | None = None) -> EMANetReader:
    """Open an ``ema_net`` folder for reading: the JSON state and the safetensors header, no tensor data yet.

    Args:
        path: A checkpoint folder holding ``ema_net/``, or the ``ema_net`` folder itself (see :func:`find_ema_dir`
            for the recovery of an interrupted save).
        name: In a checkpoint folder, open the named EMA's ``ema_net-<name>`` instead.

    Raises:
        EMAFileError: If the folder or a file is missing, or a file is not valid safetensors / JSON. The message
            names the path.
    """
    from safetensors import SafetensorError, safe_open

    d = _checked_ema_dir(path, name)
    meta = _read_meta(d)
    weights = d / WEIGHTS_NAME
    try:
        handle = safe_open(str(weights), framework="pt", device="cpu")
        return EMANetReader(d, meta, handle)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise EMAFileError(
            f"Corrupt EMA weights file {str(weights)!r}: not a valid safetensors file ({e})"
        ) from e


def open_ema_file(folder: str | os.PathLike, filename: str, meta: dict | None = None) -> EMANetReader:
    """Open another safetensors file of an ``ema_net`` folder (e.g. :data:`BEMA_EMA_NAME`) as an
    :class:`EMANetReader` (header now, data on demand), with ``meta`` as its JSON state.

    Raises:
        EMAFileError: If the file is missing or not valid safetensors; the message names it.
    """
    from safetensors import SafetensorError, safe_open

    d = Path(folder)
    f = d / filename
    if not f.is_file():
        raise EMAFileError(f"EMA folder {str(d)!r} is incomplete: {filename!r} is missing")
    try:
        handle = safe_open(str(f), framework="pt", device="cpu")
        return EMANetReader(d, dict(meta or {}), handle, weights=filename)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise EMAFileError(f"Corrupt EMA file {str(f)!r}: not a valid safetensors file ({e})") from e


def load_ema_net(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an ``ema_net`` folder without unpickling anything.

    Args:
        path: A checkpoint folder holding ``ema_net/``, or the ``ema_net`` folder itself (see
            :func:`find_ema_dir` for the recovery of an interrupted save).
        device: Where to put the tensors.

    Returns:
        ``(tensors, meta)``: the EMA weights by state-dict name, and the JSON state.

    Raises:
        EMAFileError: If the folder or a file is missing, or a file is not valid safetensors / JSON. The message
            names the path.

    Example:
        >>> import tempfile
        >>> d = save_ema_net(tempfile.mkdtemp(), {"w": torch.ones(2)}, {"step": 3})
        >>> tensors, meta = load_ema_net(d.parent); meta["step"], tensors["w"].tolist()
        (3, [1.0, 1.0])
    """
    with open_ema_net(path) as reader:
        tensors = {name: reader.read(name).to(device) for name in reader.shapes}
        return tensors, reader.meta
