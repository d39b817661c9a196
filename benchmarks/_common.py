"""Shared helpers for the benchmark scripts: timing, workloads, machine info, tables, JSON output.

Timing rule used everywhere: all candidates of one table run in ONE process, in interleaved rounds
(round r runs every candidate once, in a rotating order), and the table reports the median over rounds.
On a shared, noisy machine the ratios between candidates are what stay comparable, not the absolute times.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


# ----------------------------------------------------------------------------- timing
def sync(device: str | torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median(
    candidates: dict[str, Callable[[], Any]],
    rounds: int,
    *,
    warmup: int = 2,
    inner: int = 1,
    device: str | torch.device = "cpu",
    max_seconds: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Time every candidate in interleaved rounds; return ``{name: {"median": s, "min": s, "max": s, ...}}``.

    Each sample is the wall time of ``inner`` back-to-back calls divided by ``inner`` (seconds per call).
    The candidate order rotates every round so none always runs right after the same neighbour.
    With ``max_seconds``, rounds stop early once that much time has passed (at least 3 rounds run), so a
    heavily loaded machine cannot push a benchmark past its budget; ``n`` says how many rounds ran.
    """
    names = list(candidates)
    for _ in range(warmup):
        for n in names:
            candidates[n]()
    sync(device)
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(rounds):
        if max_seconds is not None and r >= 3 and time.perf_counter() - start > max_seconds:
            break
        k = r % len(names)
        for n in names[k:] + names[:k]:
            f = candidates[n]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            sync(device)
            samples[n].append((time.perf_counter() - t0) / inner)
    return {
        n: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v), "samples": v}
        for n, v in samples.items()
    }


def paired_ratio(stats: dict[str, dict[str, Any]], num: str, den: str) -> float:
    """Median over rounds of ``time(num) / time(den)`` measured in the same round.

    Both candidates of a pair ran close together in time, so slow drifts of the machine's load cancel in each
    ratio; this is the figure the tables report as "x copy" / "x timm V3".
    """
    a, b = stats[num]["samples"], stats[den]["samples"]
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------- workloads
class ManyTensors(nn.Module):
    """A module holding ``n_tensors`` parameters that together have about ``total`` elements.

    Sizes are drawn once from a seeded generator (between 0.2x and 1.2x of the mean), so the
    workload is the same in every run; shapes are 2-D like linear weights where the size allows.
    """

    def __init__(self, total: int, n_tensors: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        raw = torch.rand(n_tensors, generator=g) + 0.2
        sizes = [max(1, int(s)) for s in (raw / raw.sum() * total).tolist()]
        sizes[-1] = max(1, sizes[-1] + total - sum(sizes))
        self.params = nn.ParameterList()
        for s in sizes:
            cols = 64 if s % 64 == 0 and s >= 64 else 1
            t = (
                torch.randn(s // cols, cols, generator=g).to(dtype)
                if cols > 1
                else torch.randn(s, generator=g)
            )
            self.params.append(nn.Parameter(t.to(dtype)))

    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters())


def bert_config(hidden: int, layers: int, vocab: int, heads: int, **extra: Any) -> Any:
    """A small ``BertConfig`` built offline (no download): FFN 4x hidden, 128 positions."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=128,
        **extra,
    )


@torch.no_grad()  # in-place moves of leaf parameters that require grad
def perturb_(model: nn.Module, scale: float = 1.0, seed: int = 1) -> None:
    """Move every parameter by seeded noise (the model "trains"; the EMA lags behind)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.device)
        p.add_((noise * scale).to(p.dtype))


@torch.no_grad()
def distance(emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> float:
    """Euclidean distance between the EMA tensors and the parameters, accumulated in float64."""
    total = 0.0
    for e, p in zip(emas, params, strict=True):
        total += float((e.double() - p.to(e.device).double()).pow(2).sum())
    return total**0.5


# ----------------------------------------------------------------------------- peers
_TIMM_EMA_MODULE = "_hf_ema_bench_timm_model_ema"


def timm_model_ema() -> ModuleType:
    """timm's ``timm/utils/model_ema.py`` (``ModelEmaV3`` ...), loaded WITHOUT importing the ``timm`` package.

    ``import timm.utils.model_ema`` first runs ``timm/__init__.py``, which imports ``timm.layers`` and
    ``timm.models`` and through them torchvision: a hard requirement of timm whose PyPI wheels are built for the
    matching PyPI torch (a multi-GB CUDA build), so on a CPU-only torch it is either a huge download or a broken
    import. The EMA classes do not need any of it: ``model_ema.py`` imports only the standard library and torch.
    So ``make bench`` installs timm with ``pip install --no-deps timm`` (plus pyyaml and huggingface_hub), and this
    function finds the installed package with ``importlib.util.find_spec("timm")`` (which locates a top-level
    package without executing its ``__init__``) and executes that one file as a standalone module. The same path
    is used whether or not torchvision is installed, so every run times the same code.

    Raises:
        ModuleNotFoundError: timm is not installed.
        ImportError: timm is installed but its ``utils/model_ema.py`` is missing or no longer loads on its own
            (e.g. it gained relative imports in a new timm release).
    """
    if _TIMM_EMA_MODULE in sys.modules:
        return sys.modules[_TIMM_EMA_MODULE]
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("No module named 'timm'", name="timm")
    path = Path(next(iter(spec.submodule_search_locations)), "utils", "model_ema.py")
    file_spec = importlib.util.spec_from_file_location(_TIMM_EMA_MODULE, path)
    if not path.is_file() or file_spec is None or file_spec.loader is None:
        raise ImportError(f"timm is installed but {path} is missing", name="timm")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[_TIMM_EMA_MODULE] = module
    try:
        file_spec.loader.exec_module(module)
    except ImportError as e:
        del sys.modules[_TIMM_EMA_MODULE]
        raise ImportError(f"{path} does not load on its own any more: {e}", name="timm") from e
    return module


# ----------------------------------------------------------------------------- reporting
def machine_info() -> dict[str, Any]:
    """CPU/GPU model, core count, load, and library versions for the results file."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    # Installed distributions' versions, read from their metadata: importing timm would need torchvision.
    for dist in ("transformers", "accelerate", "timm", "diffusers", "ema-pytorch", "torch-ema", "peft"):
        try:
            versions[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist.replace("-", "_")] = "not installed"
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions,
    }
    return info


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def arg_parser(description: str) -> argparse.ArgumentParser:
    """Common flags: ``--json PATH`` to store the results, ``--quick`` for a smoke run."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few rounds (smoke test only)")
    return p


def emit(result: dict[str, Any], json_path: Path | None) -> None:
    """Print the result's markdown and optionally save the whole result as JSON.

    If ``result["failures"]`` is not empty (hf_ema itself computed something wrong or did not run: a benchmark
    must not quietly report a table without our row), they are printed to stderr after the table and the
    process exits with status 1, so ``run_all.py``, ``make bench`` and the quick-mode tests fail loudly.
    A peer that is missing or that fails is only a row in the table, never a failure.
    """
    print(result["markdown"], flush=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_path.with_suffix(json_path.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        os.replace(tmp, json_path)
    failures = result.get("failures") or []
    if failures:
        print(f"{result.get('name', 'benchmark')} FAILED:", *failures, sep="\n  ", file=sys.stderr)
        sys.exit(1)
