"""Shared by the two-process tests: launch a worker under ``torchrun`` and read back what it recorded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from safetensors.torch import load_file

from tests.reference import record, to_numpy

ROOT = Path(__file__).resolve().parents[1]


def exit_worker() -> NoReturn:
    """End a two-process worker whose results are on disk: wait for the other rank, then leave without interpreter
    teardown.

    A gloo process group still alive when the interpreter finalizes can abort a run that has finished its work
    ("terminate called without an active exception": gloo's threads outlive Python; pytorch/pytorch#190489). On torch
    2.13 CPU that hit about 1 run in 24 of a plain Trainer+DDP script without hf_ema, and still 1 in 24 after
    ``destroy_process_group()``; leaving with ``os._exit`` after a barrier hit 0 in 24. Exceptions raised before this
    call still fail the worker as usual.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_torchrun(worker: Path, *args: str, timeout: int, label: str = "worker") -> None:
    """Run ``worker *args`` as 2 processes (``torchrun --standalone``: the rendezvous picks a free port), from the
    repo root, with CUDA hidden (the workers are CPU gloo processes; on a one-GPU machine rank 1 would otherwise
    pick a device that does not exist), within ``timeout`` seconds; raise with the output's tail on failure."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(worker), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"{label} failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")


def load_history(path: Path) -> list[dict[str, np.ndarray]]:
    """The per-step parameter records a worker saved as ``{step}/{name}`` tensors, in step order."""
    flat = load_file(str(path))
    steps = sorted({int(k.split("/", 1)[0]) for k in flat})
    return [record((k.split("/", 1)[1], v) for k, v in flat.items() if k.startswith(f"{i}/")) for i in steps]


def assert_close(got: dict[str, torch.Tensor], want: dict[str, np.ndarray]) -> None:
    """Same names, and every tensor within the two-process tests' tolerance of the NumPy reference."""
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        np.testing.assert_allclose(to_numpy(got[name]), w, rtol=1e-5, atol=1e-6, err_msg=name)


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names, and every tensor bitwise equal (e.g. the EMA on two ranks)."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_shards_stack_to(
    gathered: dict[str, torch.Tensor], out: Path, prefix: str
) -> dict[str, torch.Tensor]:
    """Each rank's local tensors (``<prefix>0/1.safetensors`` in ``out``) are its own rows of ``gathered``
    (FSDP2 ``Shard(0)``, rank 0 first). Returns rank 0's tensors for further checks."""
    l0 = load_file(str(out / f"{prefix}0.safetensors"))
    l1 = load_file(str(out / f"{prefix}1.safetensors"))
    for name, g in gathered.items():
        assert torch.equal(torch.cat([l0[name], l1[name]]), g), name
    return l0
