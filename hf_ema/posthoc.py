"""Post-hoc EMA: track two power-function EMAs, store snapshots of them, choose the EMA length after training.

Karras et al. 2024 (EDM2, arXiv:2312.02696, Section 3.2 and Appendix C; NVlabs/edm2 ``training/phema.py`` and
``reconstruct_phema.py``): during training keep power-function EMAs of a few widths ``sigma_rel`` (default 0.05
and 0.10) and write a snapshot of each every ``K`` optimizer steps; afterwards, the EMA of any width at any snapshot
time is reconstructed as a linear combination of the snapshots whose coefficients solve a least-squares fit of the
target's averaging profile (:func:`hf_ema.power.solve_weights`). The maths is in :mod:`hf_ema.power`.

Run folder (``run_dir``)::

    manifest.json                     the list of snapshots (written atomically: temp file + rename)
    config.json                       the model's Hugging Face config, when it has one (copied into outputs)
    snapshots/step-000000100.p0.safetensors   profile 0 at optimizer step 100 (model state-dict names)
    snapshots/step-000000100.p1.safetensors   ...
    snapshots/step-000000100.p0.rank1-of-2.safetensors   (layout="per_rank": one file per rank)

Files are found through ``manifest.json`` only, never by listing the folder, so a stray or half-written file is
never picked up. Each snapshot file also carries, in its safetensors metadata, the run id, step, time and profile,
which synthesis checks against the manifest.

Sharded models (FSDP2, ZeRO-3): the profiles are kept per shard next to the parameters, and :meth:`PostHocEMA.update`
does no communication. Snapshots are written either

* ``layout="gathered"`` (default): the shards are gathered to the main process, which writes one file per profile in
  the model's own names: a collective every ``K`` steps (not every step), and files that do not depend on the world
  size (each is itself loadable as the model's weights); or
* ``layout="per_rank"``: every rank writes its own shard with no communication at all (the layout of each piece is
  in the file's metadata), which keeps the stall at the device-to-host copy of one shard; synthesis reassembles the
  full tensors one at a time.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import math
import numbers
import os
import queue
import struct
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed as dist_utils
from .io import atomic_write_text, save_ema_net
from .power import (
    PowerDecay,
    check_sigma_rel,
    gamma_to_sigma_rel,
    power_beta,
    sigma_rel_to_gamma,
    solve_weights,
)
from .state import EMAState, _persistent_buffers, _resolve_dtype

__all__ = [
    "PostHocEMA",
    "PostHocError",
    "SynthesisResult",
    "read_manifest",
    "synthesize",
    "write_safetensors",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "config.json"
SNAPSHOT_DIR = "snapshots"
STATE_DIRNAME = "posthoc_ema"
STATE_NAME = "posthoc_state.json"
FORMAT = "hf_ema.posthoc"
FORMAT_VERSION = 1
_META_KEY = "hf_ema_posthoc"
_TIME_UNITS = ("steps", "samples")
_LAYOUTS = ("gathered", "per_rank")


class PostHocError(ValueError):
    """A post-hoc EMA run folder, manifest, snapshot or request is missing, inconsistent or invalid."""


def _library_version() -> str:
    from . import __version__

    return __version__


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _digest(tensors: Mapping[str, Mapping[str, Any]]) -> str:
    """Short fingerprint of the tensor table (names, shapes): equal fingerprints, same model layout."""
    text = json.dumps({k: list(v["shape"]) for k, v in sorted(tensors.items())}, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _shared_run_id(run_id: str | None, device: torch.device) -> str:
    """A run id, the same on every rank: the main process draws it and broadcasts its 32 hex digits (once, at
    construction; no pickling)."""
    if run_id is not None:
        if not isinstance(run_id, str) or not run_id or len(run_id) > 128:
            raise ValueError(f"`run_id` must be a non-empty string of at most 128 characters, got {run_id!r}")
        return run_id
    drawn = uuid.uuid4().hex
    _, world = _world()
    if world == 1:
        return drawn
    backend = torch.distributed.get_backend()
    dev = device if backend == "nccl" else torch.device("cpu")
    buf = torch.tensor(list(drawn.encode()), dtype=torch.uint8, device=dev)
    torch.distributed.broadcast(buf, src=0)
    return bytes(buf.cpu().tolist()).decode()


def _host_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh CPU copy of ``t``, floating tensors cast to ``dtype`` (on the device first: fewer bytes to move).

    From a CUDA tensor the copy goes into pinned host memory and is only *enqueued* (``non_blocking``) on the
    current stream: the training thread does not wait for it, and the profile's next update, queued after it on
    the same stream, cannot overwrite the values before they are copied. The writer waits for the copies with
    :func:`_copies_done` before it reads them.
    """
    t = t.detach()
    if t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
        if t.device.type == "cpu":
            return t
    elif t.device.type == "cpu":
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


def _copies_done(devices: set[torch.device]) -> Any:
    """An event recorded after the copies :func:`_host_copy` enqueued on ``devices`` (CUDA), or None."""
    cuda = [d for d in devices if d.type == "cuda"]
    if not cuda:
        return None
    events = []
    for d in cuda:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(d))
        events.append(ev)
    return events


_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Write CPU tensors to ``path`` in the safetensors format, streaming each tensor's bytes from its own memory.

    The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header
    (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, space-padded to a multiple
    of 8 bytes), then the tensors' bytes back to back. Unlike ``safetensors.torch.save_file`` no copy of the whole
    model is made as Python ``bytes``, and the big ``write`` calls release the GIL, so a background writer does not
    stall the training thread. The file is fsynced. Read it with ``safetensors`` as usual.

    Example:
        >>> import tempfile, os
        >>> from safetensors.torch import load_file
        >>> f = os.path.join(tempfile.mkdtemp(), "a.safetensors")
        >>> write_safetensors(f, {"w": torch.ones(2, dtype=torch.bfloat16)}, {"format": "pt"})
        >>> load_file(f)["w"].tolist()
        [1.0, 1.0]
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    views = []
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES or t.device.type != "cpu":
            raise ValueError(
                f"write_safetensors: {name!r} is a {t.dtype} tensor on {t.device}; expected a CPU tensor"
            )
        t = t.detach().contiguous()
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        if nbytes:
            views.append(t.reshape(-1).view(torch.uint8).numpy())
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for v in views:
            f.write(memoryview(v))
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- manifest
class _Manifest:
    """The run's ``manifest.json``: header (run, model tensors, profiles) and the list of snapshots."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.lock = threading.Lock()

    @property
    def entries(self) -> list[dict[str, Any]]:
        return self.data["snapshots"]

    def add(self, entry: dict[str, Any]) -> None:
        """Record a written snapshot (replacing an entry of the same step and profile) and rewrite the file."""
        with self.lock:
            key = (entry["step"], entry["profile"])
            self.data["snapshots"] = [e for e in self.entries if (e["step"], e["profile"]) != key] + [entry]
            self.data["snapshots"].sort(key=lambda e: (e["step"], e["profile"]))
            self._write()

    def truncate(self, step: int) -> list[dict[str, Any]]:
        """Drop the entries written after ``step`` (a run resumed from an earlier checkpoint); return them."""
        with self.lock:
            dropped = [e for e in self.entries if e["step"] > step]
            if dropped:
                self.data["snapshots"] = [e for e in self.entries if e["step"] <= step]
                self._write()
            return dropped

    def _write(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True))

    def write(self) -> None:
        with self.lock:
            self._write()


def read_manifest(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check the ``manifest.json`` of a post-hoc EMA run folder.

    Raises:
        PostHocError: If the folder or its manifest is missing, or the manifest is not one written by hf_ema.

    Example:
        >>> read_manifest("/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        PostHocError: No post-hoc EMA manifest ...
    """
    path = Path(run_dir) / MANIFEST_NAME
    if not path.is_file():
        hint = "" if Path(run_dir).is_dir() else " (the folder does not exist)"
        raise PostHocError(
            f"No post-hoc EMA manifest at {str(path)!r}{hint}: `run_dir` must be the folder given to PostHocEMA, "
            f"which writes {MANIFEST_NAME} with its first snapshot"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PostHocError(f"Corrupt post-hoc EMA manifest {str(path)!r}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PostHocError(
            f"{str(path)!r} is not a post-hoc EMA manifest written by hf_ema (format {FORMAT!r})"
        )
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise PostHocError(
            f"{str(path)!r} has format version {data.get('format_version')}, newer than this hf_ema reads "
            f"({FORMAT_VERSION}); upgrade hf_ema"
        )
    for key in ("run_id", "time_unit", "tensors", "snapshots"):
        if key not in data:
            raise PostHocError(f"Corrupt post-hoc EMA manifest {str(path)!r}: no {key!r}")
    return data


# ----------------------------------------------------------------------------- background writer
_LIVE_WRITERS: weakref.WeakSet[_SnapshotWriter] = weakref.WeakSet()


@atexit.register
def _flush_writers_at_exit() -> None:  # pragma: no cover - runs at interpreter exit
    for writer in list(_LIVE_WRITERS):
        with contextlib.suppress(Exception):
            writer.close()


@dataclass
class _Job:
    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    entry: (
        dict[str, Any] | None
    )  # manifest entry to add once written (None: a per-rank piece of another rank)
    ready: Any = None  # CUDA events after the device-to-host copies of ``tensors`` (None: already on the host)


class _SnapshotWriter:
    """Writes snapshot files on one background thread, from host tensors handed over by the training thread.

    The queue is bounded (``max_pending`` snapshots): when the disk is slower than the snapshots, :meth:`submit` waits,
    so host memory stays bounded. An error on the thread is raised by the next :meth:`submit` / :meth:`flush`.
    """

    def __init__(self, manifest: _Manifest | None, max_pending: int) -> None:
        self.manifest = manifest
        self._queue: queue.Queue[list[_Job] | None] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.write_seconds = 0.0
        self.files_written = 0
        self.bytes_written = 0
        _LIVE_WRITERS.add(self)

    def submit(self, jobs: list[_Job]) -> None:
        """Queue the files of one snapshot (one hand-over: the writer thread is woken once)."""
        self._raise()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="hf_ema-posthoc-writer", daemon=True)
            self._thread.start()
        self._queue.put(jobs)

    def flush(self) -> None:
        """Wait until every submitted snapshot is on disk and in the manifest."""
        if self._thread is not None:
            self._queue.join()
        self._raise()

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"Writing a post-hoc EMA snapshot failed: {err!r}") from err

    def _run(self) -> None:
        while True:
            jobs = self._queue.get()
            try:
                if jobs is None:
                    return
                if self._error is None:
                    for job in jobs:
                        self._write(job)
            except BaseException as e:  # reported on the training thread
                self._error = e
            finally:
                self._queue.task_done()

    def _write(self, job: _Job) -> None:
        start = time.perf_counter()
        for event in job.ready or ():  # the device-to-host copies the training thread only enqueued
            event.synchronize()
        job.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = job.path.with_name(f".{job.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            write_safetensors(tmp, job.tensors, job.metadata)
            os.replace(tmp, job.path)
        except BaseException:
            if tmp.exists():
                tmp.unlink()
            raise
        if job.entry is not None and self.manifest is not None:
            self.manifest.add(job.entry)
        self.bytes_written += sum(t.numel() * t.element_size() for t in job.tensors.values())
        self.files_written += 1
        self.write_seconds += time.perf_counter() - start


# ----------------------------------------------------------------------------- sample clock
class _Clock:
    """Training time in samples: ``t`` now, at the previous optimizer step, and at the last averaging update."""

    def __init__(self) -> None:
        self.t = 0.0
        self.t_prev_step = 0.0
        self.t_last_avg = 0.0


class _SampleClockPowerDecay(PowerDecay):
    """:class:`PowerDecay` on a clock that counts samples: ``beta = (1 - dt / t)**(gamma + 1)`` with ``t`` the
    samples seen so far and ``dt`` those since the previous update (EDM2 Eq. 127 with time in images, as EDM2 does)."""

    def __init__(self, clock: _Clock, gamma: float) -> None:
        super().__init__(gamma=gamma)
        self.clock = clock

    def __call__(self, decay: float, step: int, total_steps: int | None) -> float:
        c = self.clock
        return power_beta(self.gamma, c.t, c.t - c.t_prev_step)

    def interval_decay(self, decay: float, step: int, total_steps: int | None, interval: int) -> float:
        c = self.clock
        return power_beta(self.gamma, c.t, c.t - c.t_last_avg)


# ----------------------------------------------------------------------------- PostHocEMA
class PostHocEMA:
    """Track power-function EMAs of a model and write snapshots of them, to choose the EMA length after training.

    Each profile is an :class:`~hf_ema.EMAState` with ``decay_type="power"`` (fp32, next to the parameters, per
    shard under FSDP2/ZeRO-3), updated by :meth:`update` after every optimizer step with
    ``beta = (1 - dt/t)**(gamma + 1)`` (EDM2 Eq. 127; see :mod:`hf_ema.power`). Every ``snapshot_every`` optimizer
    steps (and at ``total_steps``) each profile is copied to host memory on the training thread and written as
    safetensors by a background thread, then listed in ``run_dir/manifest.json``. :func:`synthesize` then builds the
    EMA of any ``sigma_rel`` at any snapshot time.

    Args:
        model: The model (wrapped or not), after ``accelerator.prepare`` / sharding.
        run_dir: Folder of the snapshots and manifest (created if needed). Use one folder per training run.
        sigma_rels: Relative widths of the tracked profiles, each in (0, 1/sqrt(12)), at least two (default EDM2's
            0.05 and 0.10); or give ``gammas``.
        gammas: The profiles' exponents instead of ``sigma_rels``.
        snapshot_every: An int: every that many optimizer steps (a multiple of ``update_every``); or a float in
            (0, 1]: that fraction of ``total_steps``. Default 0.05 (20 snapshots per profile). Disk use is
            ``len(profiles) * (total_steps / K)`` model copies in ``snapshot_dtype``.
        total_steps: Planned optimizer steps (needed by a fractional ``snapshot_every``; settable later, before the
            first update). A snapshot is also taken at this step.
        snapshot_dtype: dtype of the snapshot files' floating tensors: ``torch.bfloat16`` (default) or
            ``torch.float32``. The profiles themselves are always fp32.
        update_every: Average every N-th optimizer step only, with ``dt = N`` (the profile is the same).
        time_unit: ``"steps"`` (default: ``t`` counts optimizer steps) or ``"samples"`` (``t`` counts training
            samples, passed to :meth:`update`; the profile then does not depend on a changing batch size).
        layout: Sharded models only: ``"gathered"`` (main process writes full tensors; a gather every snapshot) or
            ``"per_rank"`` (each rank writes its shard; no communication). Unsharded models always write one file.
        run_id: Identifier of the run stored in the manifest and every snapshot (default: a random one).
        buffers: How the profiles treat floating-point buffers, as in :class:`~hf_ema.EMAState`.
        trainable_only: Track only parameters with ``requires_grad``.
        accelerator: An ``accelerate.Accelerator``: unwraps the model, skips optimizer steps it reports as
            skipped, and makes ``accelerator.save_state(dir)`` / ``load_state(dir)`` save and restore
            ``dir/posthoc_ema/`` (:meth:`save` / :meth:`load`; one PostHocEMA per accelerator).
        max_pending: Snapshots that may wait in host memory for the writer (default 2) before :meth:`update` waits.

    Attributes:
        profiles: The :class:`~hf_ema.EMAState` of each profile (e.g. ``with ph.profiles[1].average_parameters():``
            evaluates with the sigma_rel=0.10 EMA).
        step: Optimizer steps counted. ``time``: training time in ``time_unit``.

    Example:
        >>> import tempfile
        >>> model = nn.Linear(4, 4)
        >>> run = tempfile.mkdtemp()
        >>> ph = PostHocEMA(model, run, snapshot_every=5)
        >>> for _ in range(10):
        ...     ph.update()  # after each optimizer step
        >>> ph.close()
        >>> [e["step"] for e in read_manifest(run)["snapshots"]]
        [5, 5, 10, 10]
        >>> res = synthesize(run, sigma_rel=[0.08], progress=False)[0]
        >>> sorted(res.tensors)
        ['bias', 'weight']
    """

    def __init__(
        self,
        model: nn.Module,
        run_dir: str | os.PathLike,
        sigma_rels: Sequence[float] | None = (0.05, 0.10),
        *,
        gammas: Sequence[float] | None = None,
        snapshot_every: int | float = 0.05,
        total_steps: int | None = None,
        snapshot_dtype: torch.dtype | str = torch.bfloat16,
        update_every: int = 1,
        time_unit: str = "steps",
        layout: str = "gathered",
        run_id: str | None = None,
        buffers: str = "average",
        trainable_only: bool = False,
        accelerator: Any = None,
        max_pending: int = 2,
    ) -> None:
        if gammas is not None:
            if sigma_rels not in (None, (0.05, 0.10)):
                raise ValueError("Pass `sigma_rels` or `gammas`, not both")
            self.gammas = [PowerDecay(gamma=g).gamma for g in gammas]
        else:
            if (
                sigma_rels is None
                or isinstance(sigma_rels, (str, bytes))
                or not isinstance(sigma_rels, Sequence)
            ):
                raise ValueError(f"`sigma_rels` must be a sequence of numbers, got {sigma_rels!r}")
            self.gammas = [
                sigma_rel_to_gamma(check_sigma_rel(s, f"sigma_rels[{i}]")) for i, s in enumerate(sigma_rels)
            ]
        if len(self.gammas) < 2:
            raise ValueError(
                f"PostHocEMA needs at least two profiles (e.g. sigma_rels=(0.05, 0.10)), got {len(self.gammas)}: "
                "one profile's snapshots can only reproduce that profile"
            )
        if len(set(self.gammas)) != len(self.gammas):
            raise ValueError(f"PostHocEMA profiles must differ, got gammas {self.gammas}")
        self.sigma_rels = [gamma_to_sigma_rel(g) for g in self.gammas]
        if time_unit not in _TIME_UNITS:
            raise ValueError(f"`time_unit` must be one of {_TIME_UNITS}, got {time_unit!r}")
        if layout not in _LAYOUTS:
            raise ValueError(f"`layout` must be one of {_LAYOUTS}, got {layout!r}")
        try:
            dtype = _resolve_dtype(snapshot_dtype)
        except (TypeError, ValueError):
            dtype = None  # refused just below, with this argument's name
        if dtype not in (torch.bfloat16, torch.float32, torch.float16):
            raise ValueError(
                "`snapshot_dtype` must be torch.bfloat16, torch.float16 or torch.float32 (or their names, e.g. "
                f"'bfloat16'), got {snapshot_dtype!r}"
            )
        if isinstance(max_pending, bool) or not isinstance(max_pending, numbers.Integral) or max_pending < 1:
            raise ValueError(f"`max_pending` must be an integer >= 1, got {max_pending!r}")
        self.snapshot_dtype: torch.dtype = dtype
        self.time_unit = time_unit
        self.layout = layout
        self.accelerator = accelerator
        self.model = dist_utils.unwrap_model(model, accelerator)
        self.run_dir = Path(run_dir)

        self._clock = _Clock() if time_unit == "samples" else None
        self.profiles: list[EMAState] = []
        for g in self.gammas:
            schedule = PowerDecay(gamma=g) if self._clock is None else _SampleClockPowerDecay(self._clock, g)
            ema = EMAState(
                self.model,
                decay_type=schedule,
                update_every=update_every,
                total_steps=total_steps,
                dtype=torch.float32,
                buffers=buffers,
                trainable_only=trainable_only,
            )
            ema.decay_type = "power"  # (also for the sample clock: a saved profile reloads as a power EMA)
            self.profiles.append(ema)
        self.update_every = self.profiles[0].update_every
        self.buffers = buffers
        self.trainable_only = trainable_only
        self._snapshot_every_arg = self._check_snapshot_every(snapshot_every)
        self._snapshot_every: int | None = None
        self._total_steps: int | None = None
        self.total_steps = total_steps

        self.step = 0
        self.time = 0.0
        self._last_avg_step = 0
        self._last_avg_time = 0.0
        self._last_snapshot_step = 0
        self.snapshot_seconds = 0.0  # time spent on the training thread in snapshots (device-to-host copies)
        self.snapshots_taken = 0

        self.rank, self.world_size = _world()
        self.is_main = dist_utils.is_main_process()
        self._sharded = any(p.is_sharded for p in self.profiles)
        self._per_rank = self._sharded and layout == "per_rank"
        self._tensors = self._tensor_table()
        self._digest = _digest(self._tensors)
        self._layout_meta = json.dumps(self._piece_layout()) if self._per_rank else None
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self.run_id = _shared_run_id(run_id, device)
        self._adopted = False  # set by load(): the run folder's earlier snapshots belong to this run
        self._manifest = self._open_manifest() if self.is_main else None
        self._writer = _SnapshotWriter(self._manifest, max_pending)
        if accelerator is not None and hasattr(accelerator, "register_save_state_pre_hook"):
            from .accelerate_hooks import register_posthoc_with_accelerator

            register_posthoc_with_accelerator(self, accelerator)

    # ------------------------------------------------------------------ set-up helpers
    @staticmethod
    def _check_snapshot_every(value: Any) -> int | float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(
                f"`snapshot_every` must be an int (optimizer steps) or a float in (0, 1] (a fraction of "
                f"total_steps), got {value!r}"
            )
        if isinstance(value, numbers.Integral):
            if value < 1:
                raise ValueError(f"`snapshot_every` (optimizer steps) must be >= 1, got {value!r}")
            return int(value)
        if not (0.0 < float(value) <= 1.0):
            raise ValueError(
                f"`snapshot_every` as a float is a fraction of total_steps and must lie in (0, 1], got {value!r} "
                "(pass an int for a number of optimizer steps)"
            )
        return float(value)

    @property
    def total_steps(self) -> int | None:
        """Planned number of optimizer steps (a snapshot is taken there; fractions of ``snapshot_every`` use it)."""
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1
        ):
            raise ValueError(f"`total_steps` must be a positive integer or None, got {value!r}")
        self._total_steps = None if value is None else int(value)
        for p in self.profiles:
            p.total_steps = self._total_steps
        if self._snapshot_every is None:
            self._snapshot_every = self._resolve_snapshot_every()

    def _resolve_snapshot_every(self) -> int | None:
        arg, n = self._snapshot_every_arg, self.update_every
        if isinstance(arg, int):
            if arg % n:
                raise ValueError(
                    f"`snapshot_every`={arg} must be a multiple of `update_every`={n}: a snapshot is the EMA right "
                    "after an averaging update"
                )
            return arg
        if self._total_steps is None:
            return None
        k = max(1, round(arg * self._total_steps))
        return max(n, round(k / n) * n)

    @property
    def snapshot_every(self) -> int | None:
        """Optimizer steps between snapshots (``None`` while a fractional one waits for ``total_steps``)."""
        return self._snapshot_every

    def _tensor_table(self) -> dict[str, dict[str, Any]]:
        """Full shape, EMA dtype and whether it is averaged, of every tensor a snapshot holds."""
        sources = dict(self.model.named_parameters())
        sources.update(_persistent_buffers(self.model))
        params = {n for n, _ in self.model.named_parameters()}
        sd = self.profiles[0].state_dict()["ema"]
        table: dict[str, dict[str, Any]] = {}
        for name, ema in sd.items():
            average = ema.is_floating_point() and (name in params or self.buffers == "average")
            table[name] = {
                "shape": list(dist_utils.full_shape(sources[name])),
                "dtype": _dtype_name(ema.dtype),
                "average": bool(average),
            }
        for name, buf in self._untracked_buffers():
            table[name] = {
                "shape": list(dist_utils.full_shape(buf)),
                "dtype": _dtype_name(buf.dtype),
                "average": False,
            }
        return table

    def _untracked_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """Persistent buffers the profiles do not track (``buffers="ignore"``): written as they are, so that a
        snapshot and a synthesised EMA load as a complete model."""
        if self.trainable_only or self.buffers != "ignore":
            return []
        tracked = set(self.profiles[0].names)
        return [(n, b) for n, b in _persistent_buffers(self.model) if n not in tracked]

    def _piece_layout(self) -> dict[str, Any]:
        """Where this rank's local tensor of each name sits in the full tensor (``layout="per_rank"``)."""
        sources = dict(self.model.named_parameters())
        sources.update(_persistent_buffers(self.model))
        out: dict[str, Any] = {}
        for name in self._tensors:
            src = sources[name]
            if dist_utils.is_dtensor(src):
                compute = dist_utils._dtensor_api()[1]
                shape, offset = compute(src.shape, src.device_mesh, src.placements)
                out[name] = {"kind": "block", "offset": list(offset), "shape": list(shape)}
            elif dist_utils.is_zero3_param(src):
                _, _, rank, n = dist_utils._zero3_layout(src)
                numel = math.prod(src.ds_shape)
                start = min(rank * n, numel)
                out[name] = {"kind": "flat", "start": start, "stop": min(start + n, numel)}
            else:
                out[name] = {"kind": "full"}
        return out

    def _header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": _library_version(),
            "run_id": self.run_id,
            "time_unit": self.time_unit,
            "update_every": self.update_every,
            "profiles": [
                {"gamma": g, "sigma_rel": s} for g, s in zip(self.gammas, self.sigma_rels, strict=True)
            ],
            "tensors": self._tensors,
            "tensors_digest": self._digest,
            "trainable_only": self.trainable_only,
            "config": CONFIG_NAME if getattr(self.model, "config", None) is not None else None,
            "snapshots": [],
        }

    def _open_manifest(self) -> _Manifest:
        path = self.run_dir / MANIFEST_NAME
        if path.is_file():
            data = read_manifest(self.run_dir)
            if data.get("tensors_digest") != self._digest:
                raise PostHocError(
                    f"{str(path)!r} belongs to a run of another model (its snapshots hold other tensor names or "
                    "shapes); use a new `run_dir`"
                )
            if data["snapshots"]:
                logger.info(
                    "%s holds %d snapshot(s) of run %s: call load(checkpoint) to resume that run",
                    path,
                    len(data["snapshots"]),
                    data["run_id"],
                )
            return _Manifest(path, data)
        return _Manifest(path, self._header())

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def update(self, samples: int | float | None = None) -> None:
        """Account for one finished optimizer step: update every profile and, when due, take a snapshot.

        Args:
            samples: With ``time_unit="samples"``: the training samples of this optimizer step, summed over all
                processes (the same number on every rank). Not used with ``time_unit="steps"``.

        Example:
            >>> import tempfile
            >>> ph = PostHocEMA(nn.Linear(2, 2), tempfile.mkdtemp(), snapshot_every=10)
            >>> ph.update(); ph.step
            1
        """
        if self._clock is None:
            if samples is not None:
                raise ValueError("`samples` is only used with time_unit='samples'")
            dt = 1.0
        else:
            if (
                samples is None
                or isinstance(samples, bool)
                or not isinstance(samples, numbers.Real)
                or not math.isfinite(samples)
                or samples <= 0
            ):
                raise ValueError(
                    f"time_unit='samples': update(samples=...) needs the number of training samples of this "
                    f"optimizer step (> 0), got {samples!r}"
                )
            dt = float(samples)
        if self.accelerator is not None and getattr(self.accelerator, "optimizer_step_was_skipped", False):
            return
        if self._snapshot_every is None:
            raise ValueError(
                f"snapshot_every={self._snapshot_every_arg} is a fraction of training: set `total_steps` (the "
                "planned number of optimizer steps) before the first update"
            )
        if self._clock is not None:
            self._clock.t_prev_step = self.time
            self._clock.t = self.time + dt
        for p in self.profiles:
            p.update()
        self.step += 1
        self.time += dt
        if self.step % self.update_every == 0:
            self._last_avg_step, self._last_avg_time = self.step, self.time
            if self._clock is not None:
                self._clock.t_last_avg = self.time
        if self.step % self._snapshot_every == 0 or self.step == self._total_steps:
            self.snapshot()

    def snapshot(self) -> list[Path]:
        """Snapshot every profile as of its last averaging update (also called by :meth:`update` when due).

        The profiles are copied to host memory here, on the calling thread (in sharded ``"gathered"`` layout the
        shards are gathered: call it on every rank); the files are written by a background thread. A step that
        already has its snapshot is not written again.

        Returns:
            The paths that will hold this process's snapshot files (empty if there was nothing new).
        """
        if self._last_avg_step == 0:
            raise RuntimeError("Nothing to snapshot yet: no averaging update has happened")
        step, t = self._last_avg_step, self._last_avg_time
        if step == self._last_snapshot_step:
            return []
        self._check_run_dir()
        start = time.perf_counter()
        # All copies first, then the hand-over: the writer never competes with the copies for the GIL.
        jobs = [job for i, p in enumerate(self.profiles) for job in self._snapshot_profile(i, p, step, t)]
        if jobs:
            ready = _copies_done({e.ema.device for p in self.profiles for e in p._entries})
            for job in jobs:
                job.ready = ready
            self._writer.submit(jobs)
        self._last_snapshot_step = step
        self.snapshot_seconds += time.perf_counter() - start
        self.snapshots_taken += 1
        return [job.path for job in jobs]

    def _check_run_dir(self) -> None:
        if self._manifest is None or self._adopted:
            return
        run = self._manifest.data["run_id"]
        if run != self.run_id and self._manifest.entries:
            raise PostHocError(
                f"{str(self._manifest.path)!r} lists {len(self._manifest.entries)} snapshot(s) of run {run}, not "
                f"of this run ({self.run_id}): resume that run with load(checkpoint) or use a new `run_dir`"
            )
        self._manifest.data["run_id"] = self.run_id
        self._adopted = True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            atomic_write_text(self.run_dir / CONFIG_NAME, config.to_json_string())
        self._manifest.write()

    def _snapshot_profile(self, i: int, profile: EMAState, step: int, t: float) -> list[_Job]:
        """Host copy of one profile and the file job(s) that write it (none on ranks that write nothing)."""
        dtype = self.snapshot_dtype
        base = f"{SNAPSHOT_DIR}/step-{step:09d}.p{i}"
        info = {
            "run_id": self.run_id,
            "step": step,
            "t": t,
            "time_unit": self.time_unit,
            "profile": i,
            "gamma": self.gammas[i],
            "sigma_rel": self.sigma_rels[i],
            "dtype": _dtype_name(dtype),
            "world_size": self.world_size,
            "tensors_digest": self._digest,
        }
        if self._per_rank:
            local = {k: _host_copy(v, dtype) for k, v in profile.state_dict()["ema"].items()}
            local.update(
                (n, _host_copy(dist_utils.local_tensor(b), dtype)) for n, b in self._untracked_buffers()
            )
            files = [f"{base}.rank{r}-of-{self.world_size}.safetensors" for r in range(self.world_size)]
            entry = {**info, "layout": "per_rank", "files": files} if self.is_main else None
            meta = {
                "format": "pt",
                _META_KEY: json.dumps({**info, "rank": self.rank}),
                "layout": self._layout_meta,
            }
            return [_Job(self.run_dir / files[self.rank], local, meta, entry)]
        if self._sharded:
            # a collective: every rank joins, the main process keeps the result
            full = profile.ema_state_dict()
            tensors = {k: _host_copy(v, dtype) for k, v in full.items()}
        elif self.is_main:
            tensors = {k: _host_copy(v, dtype) for k, v in profile.state_dict()["ema"].items()}
            tensors.update((n, _host_copy(b, dtype)) for n, b in self._untracked_buffers())
        else:
            return []
        if not self.is_main:
            return []
        file = f"{base}.safetensors"
        entry = {**info, "layout": "gathered", "files": [file]}
        meta = {"format": "pt", _META_KEY: json.dumps({**info, "rank": 0})}
        return [_Job(self.run_dir / file, tensors, meta, entry)]

    # ------------------------------------------------------------------ files
    def flush(self) -> None:
        """Wait until every snapshot taken so far is written and listed in the manifest."""
        self._writer.flush()

    def close(self) -> None:
        """Write the pending snapshots and stop the writer thread (:meth:`snapshot` restarts it)."""
        self._writer.close()

    def __enter__(self) -> PostHocEMA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def write_stats(self) -> dict[str, float]:
        """Seconds spent by the training thread in snapshots vs by the writer thread, and bytes written."""
        return {
            "snapshots": self.snapshots_taken,
            "caller_seconds": self.snapshot_seconds,
            "writer_seconds": self._writer.write_seconds,
            "files": self._writer.files_written,
            "bytes": self._writer.bytes_written,
        }

    def _meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": _library_version(),
            "run_id": self.run_id,
            "step": self.step,
            "time": self.time,
            "last_avg_step": self._last_avg_step,
            "last_avg_time": self._last_avg_time,
            "last_snapshot_step": self._last_snapshot_step,
            "time_unit": self.time_unit,
            "update_every": self.update_every,
            "snapshot_every": self._snapshot_every,
            "total_steps": self._total_steps,
            "gammas": list(self.gammas),
            "sigma_rels": list(self.sigma_rels),
            "snapshot_dtype": _dtype_name(self.snapshot_dtype),
            "layout": self.layout,
            "world_size": self.world_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """``{"profiles": [EMAState.state_dict(), ...], "meta": {...JSON...}}``; waits for pending snapshots first,
        so that the manifest on disk lists every snapshot up to this step."""
        self.flush()
        return {"profiles": [p.state_dict() for p in self.profiles], "meta": self._meta()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` output (this process's tensors), and bring the run folder back to that
        step: manifest entries of later steps (left by the run being resumed) are dropped and their files deleted."""
        meta = state_dict["meta"]
        self._check_meta(meta)
        for p, sd in zip(self.profiles, state_dict["profiles"], strict=True):
            p.load_state_dict(sd)
        self._apply_meta(meta)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/posthoc_ema/`` (each profile as an ``ema_net`` folder + ``posthoc_state.json``).

        On several processes every rank must call it (sharded profiles are gathered). Pending snapshots are
        written first. Returns the ``posthoc_ema`` folder.
        """
        self.flush()
        out = Path(directory) / STATE_DIRNAME
        for i, p in enumerate(self.profiles):
            p.save(out / f"profile-{i}")
        if self.is_main:
            atomic_write_text(out / STATE_NAME, json.dumps(self._meta(), indent=2, sort_keys=True))
        return out

    def load(self, directory: str | os.PathLike) -> PostHocEMA:
        """Resume from :meth:`save` output (``directory/posthoc_ema`` or that folder itself).

        The profiles, step, time and run id are restored; the run folder's manifest is cut back to the saved step
        (entries written later, by the run being resumed, are dropped and their files deleted), so the resumed run
        writes neither duplicate nor stale snapshots.

        Raises:
            PostHocError: If the folder is missing or incomplete, or it was saved with other profiles.
        """
        d = Path(directory)
        if not (d / STATE_NAME).is_file():
            d = d / STATE_DIRNAME
        path = d / STATE_NAME
        if not path.is_file():
            raise PostHocError(f"No post-hoc EMA state at {str(path)!r} (written by PostHocEMA.save)")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PostHocError(f"Corrupt post-hoc EMA state {str(path)!r}: {e}") from e
        self._check_meta(meta)
        for i, p in enumerate(self.profiles):
            p.load(d / f"profile-{i}")
            if p.step != meta["step"]:
                raise PostHocError(
                    f"{str(d)!r} is inconsistent: profile {i} is at step {p.step}, the state at step {meta['step']}"
                )
        self._apply_meta(meta)
        return self

    def _check_meta(self, meta: Mapping[str, Any]) -> None:
        if meta.get("format") != FORMAT:
            raise PostHocError("Not a post-hoc EMA state (format mismatch)")
        saved = [float(g) for g in meta.get("gammas", [])]
        if len(saved) != len(self.gammas) or any(
            not math.isclose(a, b, rel_tol=1e-12) for a, b in zip(saved, self.gammas, strict=False)
        ):
            raise PostHocError(
                f"The saved post-hoc EMA tracks profiles with sigma_rels {meta.get('sigma_rels')}, this one "
                f"{self.sigma_rels}: build PostHocEMA with the same profiles to resume"
            )
        if meta.get("time_unit") != self.time_unit:
            raise PostHocError(
                f"The saved post-hoc EMA counts time in {meta.get('time_unit')}, this one in {self.time_unit}"
            )

    def _apply_meta(self, meta: Mapping[str, Any]) -> None:
        self.flush()
        self.step = int(meta["step"])
        self.time = float(meta["time"])
        self._last_avg_step = int(meta["last_avg_step"])
        self._last_avg_time = float(meta["last_avg_time"])
        self._last_snapshot_step = int(meta["last_snapshot_step"])
        if self._clock is not None:
            self._clock.t = self._clock.t_prev_step = self.time
            self._clock.t_last_avg = self._last_avg_time
        if meta.get("snapshot_every") is not None:
            if self._snapshot_every not in (None, meta["snapshot_every"]):
                logger.warning(
                    "Resuming with snapshot_every=%s as saved (not %s), so the snapshot times stay the same",
                    meta["snapshot_every"],
                    self._snapshot_every,
                )
            self._snapshot_every = int(meta["snapshot_every"])
        if self._total_steps is None and meta.get("total_steps") is not None:
            self.total_steps = int(meta["total_steps"])
        self.run_id = str(meta["run_id"])
        if self._manifest is not None:
            self._resume_manifest()
        self._adopted = True

    def _resume_manifest(self) -> None:
        m = self._manifest
        assert m is not None
        if m.entries and m.data["run_id"] != self.run_id:
            raise PostHocError(
                f"{str(m.path)!r} lists snapshots of run {m.data['run_id']}, but the checkpoint is of run "
                f"{self.run_id}: resume with the run folder of that run"
            )
        if not m.path.is_file() and self.step > 0:
            logger.warning(
                "Resuming run %s at step %d into %s, which holds no manifest: the earlier snapshots are not there",
                self.run_id,
                self.step,
                self.run_dir,
            )
        m.data["run_id"] = self.run_id
        dropped = m.truncate(self.step)
        for e in dropped:  # files named by the manifest only; never a listing of the folder
            for f in e["files"]:
                with contextlib.suppress(FileNotFoundError):
                    (self.run_dir / f).unlink()
        if dropped:
            logger.warning(
                "Resumed at step %d: dropped %d later snapshot(s) of the interrupted run (steps %s)",
                self.step,
                len(dropped),
                sorted({e["step"] for e in dropped}),
            )
        missing = [f for e in m.entries for f in e["files"] if not (self.run_dir / f).is_file()]
        if missing:
            logger.warning(
                "The manifest lists %d snapshot file(s) that are missing: %s", len(missing), missing[:5]
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        m.write()

    def __repr__(self) -> str:
        return (
            f"PostHocEMA(sigma_rels={[round(s, 4) for s in self.sigma_rels]}, step={self.step}, "
            f"snapshot_every={self._snapshot_every}, run_dir={str(self.run_dir)!r})"
        )


# ----------------------------------------------------------------------------- synthesis
@dataclass
class SynthesisResult:
    """One synthesised EMA.

    Attributes:
        sigma_rel: Its relative width; ``gamma`` its exponent.
        step: Optimizer step it is the EMA at; ``t``: that time in the run's ``time_unit``.
        tensors: The EMA weights by state-dict name (``None`` when written to ``path``).
        path: The folder holding its ``ema_net/`` (when ``out_dir`` was given): load it with
            ``load_model(cls, path)`` or ``cls.from_pretrained(path / "ema_net")``.
        residual: Relative L2 error of the fitted averaging profile (0: exact).
        coefficients: ``{snapshot file: weight}``, weights summing to 1.
    """

    sigma_rel: float
    gamma: float
    step: int
    t: float
    residual: float
    coefficients: dict[str, float]
    tensors: dict[str, torch.Tensor] | None = None
    path: Path | None = None
    cond: float = field(default=0.0, repr=False)


class _SnapshotReader:
    """Reads one snapshot's tensors by name, whole, from one gathered file or the pieces of per-rank files."""

    def __init__(self, run_dir: Path, entry: Mapping[str, Any], manifest: Mapping[str, Any]) -> None:
        from safetensors import SafetensorError, safe_open

        self.entry = entry
        self.table: Mapping[str, Mapping[str, Any]] = manifest["tensors"]
        self.handles: list[Any] = []
        self.layouts: list[dict[str, Any] | None] = []
        files = entry.get("files") or [entry["file"]]
        for rank, f in enumerate(files):
            path = run_dir / f
            if not path.is_file():
                raise PostHocError(f"Snapshot file {str(path)!r} listed in the manifest is missing")
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
                meta = handle.metadata() or {}
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise PostHocError(f"Corrupt snapshot file {str(path)!r}: {e}") from e
            names = set(handle.keys())
            expected = set(self.table)
            if names != expected:
                raise PostHocError(
                    f"Snapshot file {str(path)!r} holds other tensors than the run's model: "
                    f"{len(names - expected)} unexpected (e.g. {sorted(names - expected)[:3]}), "
                    f"{len(expected - names)} missing (e.g. {sorted(expected - names)[:3]})"
                )
            if "layout" not in meta:
                bad = [
                    n for n in names if list(handle.get_slice(n).get_shape()) != list(self.table[n]["shape"])
                ]
                if bad:
                    raise PostHocError(
                        f"Snapshot file {str(path)!r} holds tensors of other shapes than the run's model: {bad[:5]}"
                    )
            try:
                info = json.loads(meta.get(_META_KEY, "{}"))
                layout = json.loads(meta["layout"]) if "layout" in meta else None
            except json.JSONDecodeError as e:
                raise PostHocError(f"Corrupt metadata in snapshot file {str(path)!r}: {e}") from e
            want = {k: entry[k] for k in ("run_id", "step", "profile")}
            got = {k: info.get(k) for k in want}
            if got != want or info.get("rank", 0) != rank:
                raise PostHocError(
                    f"Snapshot file {str(path)!r} is not the one the manifest lists: it holds {got} "
                    f"(rank {info.get('rank')}), the manifest expects {want} (rank {rank})"
                )
            self.handles.append(handle)
            self.layouts.append(layout)

    def read(self, name: str) -> torch.Tensor:
        if self.layouts[0] is None:
            return self.handles[0].get_tensor(name)
        shape = self.table[name]["shape"]
        full: torch.Tensor | None = None
        for handle, layout in zip(self.handles, self.layouts, strict=True):
            assert layout is not None
            piece = handle.get_tensor(name)
            where = layout[name]
            if where["kind"] == "full":
                return piece
            if full is None:
                full = torch.empty(shape, dtype=piece.dtype)
            if where["kind"] == "block":
                index = tuple(slice(o, o + n) for o, n in zip(where["offset"], where["shape"], strict=True))
                full[index] = piece.reshape(where["shape"])
            else:
                start, stop = where["start"], where["stop"]
                full.view(-1)[start:stop] = piece.reshape(-1)[: stop - start]
        assert full is not None
        return full

    def close(self) -> None:
        self.handles = []


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="snapshot")
        except ImportError:
            pass
    return None


def synthesize(
    run_dir: str | os.PathLike,
    sigma_rel: float | Sequence[float],
    at_step: int | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 4,
    progress: bool = True,
) -> list[SynthesisResult]:
    """Build the EMA of any width from the snapshots of a :class:`PostHocEMA` run (EDM2 Algorithm 3).

    For the target ``r = (t_r, gamma_r)`` and the snapshots ``i`` with ``0 < t_i <= t_r`` (duplicates of one
    ``(t, gamma)`` used once), the weights ``X`` solve ``A X = B`` in float64 (:func:`hf_ema.power.solve_weights`),
    each column normalised to sum to 1, and ``theta_r = sum_i X_ir * snapshot_i``, accumulated in fp32 one snapshot
    at a time and one tensor at a time, so memory stays at ``batch_size`` fp32 model copies plus one tensor.
    Tensors that are not averaged (integer buffers, copied buffers) are taken from the latest snapshot used.

    Args:
        run_dir: The ``run_dir`` of the :class:`PostHocEMA` (holding ``manifest.json``).
        sigma_rel: The width(s) wanted, each in (0, 1/sqrt(12)).
        at_step: The optimizer step to reconstruct the EMA at (default: the last snapshot). With time counted in
            samples it must be a snapshot's step.
        out_dir: Write each result to ``out_dir/sigma_rel-<value>[-step-<step>]/ema_net/`` (the format of
            :meth:`EMAState.save`, with ``config.json`` when the run had one) instead of returning the tensors.
        dtype: dtype of the returned / written floating tensors (fp32 by default).
        batch_size: Targets synthesised per pass over the snapshots (memory: that many fp32 model copies).
        progress: Show a progress bar (tqdm, when installed).

    Returns:
        One :class:`SynthesisResult` per requested ``sigma_rel``, in order.

    Raises:
        PostHocError: No manifest; a snapshot missing, of another run or of another model; ``at_step`` beyond the
            last snapshot or before the first one.
        ValueError: A ``sigma_rel`` out of range.

    Example:
        >>> res = synthesize("runs/phema", sigma_rel=[0.08, 0.12])  # doctest: +SKIP
        >>> model.load_state_dict(res[0].tensors)  # doctest: +SKIP
    """
    targets = [sigma_rel] if isinstance(sigma_rel, numbers.Real) else list(sigma_rel)
    if not targets:
        raise ValueError("`sigma_rel` must name at least one width")
    target_sigma = [check_sigma_rel(s, "sigma_rel") for s in targets]
    target_gamma = [sigma_rel_to_gamma(s) for s in target_sigma]
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}")
    if at_step is not None and (
        isinstance(at_step, bool) or not isinstance(at_step, numbers.Integral) or at_step < 1
    ):
        raise ValueError(f"`at_step` must be a positive integer (an optimizer step) or None, got {at_step!r}")
    run = Path(run_dir)
    manifest = read_manifest(run)
    entries = list(manifest["snapshots"])
    if not entries:
        raise PostHocError(f"The run in {str(run)!r} has no snapshots yet")
    for e in entries:
        if e.get("run_id") != manifest["run_id"] or e.get(
            "tensors_digest", manifest.get("tensors_digest")
        ) != (manifest.get("tensors_digest")):
            raise PostHocError(
                f"Manifest entry for step {e.get('step')} is of another run or model ({e.get('run_id')}) than the "
                f"manifest ({manifest['run_id']})"
            )
    last = max(entries, key=lambda e: e["step"])
    if at_step is None:
        step, t_r = int(last["step"]), float(last["t"])
    else:
        step = int(at_step)
        if step > last["step"]:
            raise PostHocError(
                f"at_step={step} is beyond the last snapshot (step {last['step']}): the EMA at a later time "
                "cannot be reconstructed"
            )
        same = [e for e in entries if e["step"] == step]
        if same:
            t_r = float(same[0]["t"])
        elif manifest["time_unit"] == "steps":
            t_r = float(step)
        else:
            steps = sorted({e["step"] for e in entries})
            raise PostHocError(
                f"at_step={step} is not a snapshot step; with time counted in samples only snapshot steps can be "
                f"targeted: {steps[:10]}{'...' if len(steps) > 10 else ''}"
            )
    used: dict[tuple[float, float], dict[str, Any]] = {}
    for e in entries:  # later entries win on a duplicate (t, gamma)
        if 0 < float(e["t"]) <= t_r:
            used[(float(e["t"]), float(e["gamma"]))] = e
    if not used:
        first = min(e["step"] for e in entries)
        raise PostHocError(f"at_step={step} is before the first snapshot (step {first}): nothing to combine")
    use = sorted(used.values(), key=lambda e: (e["t"], e["gamma"]))
    fit = solve_weights([e["t"] for e in use], [e["gamma"] for e in use], t_r, target_gamma)
    if fit.ill_conditioned:
        warnings.warn(
            f"post-hoc EMA: the snapshots' Gram matrix is badly conditioned (cond {fit.cond:.3g}); the weights may "
            "be inaccurate (check the residuals)",
            RuntimeWarning,
            stacklevel=2,
        )
    for s, res in zip(target_sigma, fit.residual, strict=True):
        logger.info("post-hoc EMA sigma_rel=%.4f at step %d: fit residual %.3g", s, step, res)

    table: Mapping[str, Mapping[str, Any]] = manifest["tensors"]
    averaged = [n for n, v in table.items() if v.get("average")]
    latest = max(range(len(use)), key=lambda i: (use[i]["t"], use[i]["step"]))
    results: list[SynthesisResult] = []
    batches = [list(range(i, min(i + batch_size, len(targets)))) for i in range(0, len(targets), batch_size)]
    bar = _progress(len(batches) * len(use), progress, "post-hoc EMA")
    try:
        for batch in batches:
            acc = [{n: torch.zeros(table[n]["shape"], dtype=torch.float32) for n in averaged} for _ in batch]
            copied: dict[str, torch.Tensor] = {}
            for i, e in enumerate(use):
                reader = _SnapshotReader(run, e, manifest)
                try:
                    for n in table:
                        x = reader.read(n)
                        if n in acc[0]:
                            for j, r in enumerate(batch):
                                acc[j][n].add_(x, alpha=float(fit.weights[i, r]))
                        elif i == latest:
                            copied[n] = x.clone()
                finally:
                    reader.close()
                if bar is not None:
                    bar.update(1)
            for j, r in enumerate(batch):
                tensors = {}
                for n in table:  # the model's order
                    x = acc[j][n] if n in acc[j] else copied[n]
                    tensors[n] = x.to(dtype) if x.is_floating_point() else x
                acc[j] = {}
                coefficients = {"/".join(e["files"]): float(fit.weights[i, r]) for i, e in enumerate(use)}
                result = SynthesisResult(
                    sigma_rel=target_sigma[r],
                    gamma=target_gamma[r],
                    step=step,
                    t=t_r,
                    residual=float(fit.residual[r]),
                    coefficients=coefficients,
                    cond=fit.cond,
                )
                if out_dir is None:
                    result.tensors = tensors
                else:
                    result.path = _write_result(
                        Path(out_dir), run, manifest, result, tensors, at_step is not None
                    )
                results.append(result)
    finally:
        if bar is not None:
            bar.close()
    return results


class _ConfigText:
    """A stored ``config.json`` handed to :func:`save_ema_net` (which writes ``to_json_string()``)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def to_json_string(self) -> str:
        return self.text


def _write_result(
    out_dir: Path,
    run: Path,
    manifest: Mapping[str, Any],
    result: SynthesisResult,
    tensors: dict[str, torch.Tensor],
    named_step: bool,
) -> Path:
    name = f"sigma_rel-{result.sigma_rel:.4f}" + (f"-step-{result.step}" if named_step else "")
    folder = out_dir / name
    config = None
    if manifest.get("config") and (run / manifest["config"]).is_file():
        config = _ConfigText((run / manifest["config"]).read_text(encoding="utf-8"))
    meta = {
        "format_version": 1,
        "library": "hf_ema",
        "library_version": _library_version(),
        "step": result.step,
        "decay_type": "power",
        "schedule_kwargs": {"gamma": result.gamma, "sigma_rel": result.sigma_rel},
        "dtype": _dtype_name(
            next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
        ),
        "trainable_only": bool(manifest.get("trainable_only", False)),
        "update_every": manifest.get("update_every", 1),
        "names": list(tensors),
        "posthoc": {
            "run_id": manifest["run_id"],
            "t": result.t,
            "time_unit": manifest["time_unit"],
            "residual": result.residual,
            "cond": result.cond,
            "coefficients": result.coefficients,
        },
    }
    save_ema_net(folder, tensors, meta, config)
    return folder
