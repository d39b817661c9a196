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
"""

from __future__ import annotations

import json
import logging
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
    "ema_dirname",
    "find_ema_dir",
    "load_ema_meta",
    "load_ema_net",
    "open_ema_file",
    "open_ema_net",
    "save_ema_net",
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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename it into place.

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
    tmp = directory / f".{dirname}.tmp-{uuid.uuid4().hex[:8]}"
    old = directory / f".{dirname}.old-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(_contiguous_cpu(tensors), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        text = json.dumps(dict(meta), indent=2, sort_keys=True)
        atomic_write_text(tmp / STATE_NAME, text)
        if complete and config is not None and hasattr(config, "to_json_string"):
            atomic_write_text(tmp / CONFIG_NAME, config.to_json_string())
        for rel, content in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                atomic_write_text(tmp / rel, content)
            else:
                save_file(_contiguous_cpu(content), str(tmp / rel), metadata={"format": "pt"})
        for f in tmp.rglob("*"):  # data on disk before the folder becomes visible under its real name
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    for stale in [old, *directory.glob(f".{dirname}.old-{_TMP_SUFFIX_GLOB}")]:  # incl. interrupted saves
        shutil.rmtree(stale, ignore_errors=True)
    return final


def find_ema_dir(path: str | os.PathLike, name: str | None = None) -> Path | None:
    """The complete EMA folder for ``path``, or ``None`` when there is none.

    ``path`` is a checkpoint folder holding ``ema_net/`` (``ema_net-<name>/`` when ``name`` is given) or the EMA
    folder itself. A crash between the two
    renames of :func:`save_ema_net` leaves the previous, complete folder under a ``.ema_net.old-*`` name and no
    ``ema_net``: that folder is returned then (the newest one), with a warning, rather than losing the EMA.

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
        return d if (d / WEIGHTS_NAME).is_file() and (d / STATE_NAME).is_file() else None
    if not _is_ema_dirname(d.name):
        return None
    olds = [
        o
        for o in d.parent.glob(f".{d.name}.old-{_TMP_SUFFIX_GLOB}")
        if (o / WEIGHTS_NAME).is_file() and (o / STATE_NAME).is_file()
    ]
    if not olds:
        return None
    old = max(olds, key=lambda o: o.stat().st_mtime)
    logger.warning(
        "No %s at %r: using the previous EMA left by an interrupted save, %r", d.name, str(d), str(old)
    )
    return old


def _checked_ema_dir(path: str | os.PathLike, name: str | None = None) -> Path:
    found = find_ema_dir(path, name)
    if found is not None:
        return found
    d = _ema_dir(path, name)
    if not d.is_dir():
        raise EMAFileError(f"No EMA folder at {str(d)!r} (expected an `{d.name}` folder written by hf_ema)")
    missing = [f for f in (WEIGHTS_NAME, STATE_NAME) if not (d / f).is_file()]
    raise EMAFileError(f"EMA folder {str(d)!r} is incomplete: {missing[0]!r} is missing")


def _read_meta(d: Path) -> dict:
    state = d / STATE_NAME
    try:
        meta = json.loads(state.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EMAFileError(f"Corrupt EMA state file {str(state)!r}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise EMAFileError(f"Corrupt EMA state file {str(state)!r}: expected a JSON object")
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
