"""Post-hoc EMA costs: update of two power profiles vs one EMA, snapshot stall vs write, synthesis time and memory.

1. **Update**: ``PostHocEMA.update()`` with two profiles (no snapshot due) vs one ``EMAState.update()`` on the same
   model, interleaved rounds in one process; target <= 2.2x (two fused lerps plus Python bookkeeping).
2. **Snapshot**: the time the training thread spends in a snapshot (device-to-host copy of both profiles in the
   snapshot dtype, handed to the writer) vs the time the background thread spends writing the files. "hidden" is
   the share of the synchronous cost (copy + write) that the training thread does not wait for. The bare copy
   (``tensor.to(bf16)`` of both profiles) is timed too: the floor of any stall.
3. **Synthesis**: ``synthesize`` of one ``sigma_rel`` from S snapshot files of a P-parameter model, in a child
   process: wall time and peak resident memory above the process's baseline, in fp32 model copies.

Run: ``python benchmarks/bench_posthoc.py`` (``--quick`` for a smoke run; ``--device cuda``; ``--json out.json``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import (
    ManyTensors,
    arg_parser,
    emit,
    interleaved_median,
    machine_info,
    md_table,
    paired_ratio,
    sync,
)

from hf_ema import EMAState, PostHocEMA
from hf_ema.posthoc import _host_copy

TARGET_UPDATE = 2.2


def bench_update(params: int, tensors: int, rounds: int, device: str) -> tuple[list, dict]:
    model = ManyTensors(params, tensors).to(device)
    single = EMAState(model, decay=0.999)
    power = EMAState(model, decay_type="power", sigma_rel=0.1)
    with tempfile.TemporaryDirectory() as d:
        ph = PostHocEMA(model, d, snapshot_every=10**9)
        stats = interleaved_median(
            {
                "EMAState (1 EMA)": single.update,
                "EMAState power (1 EMA)": power.update,
                "PostHocEMA (2)": ph.update,
            },
            rounds,
            device=device,
            max_seconds=120,
        )
        ph.close()
    ratio = paired_ratio(stats, "PostHocEMA (2)", "EMAState (1 EMA)")
    rows = [
        [name, f"{s['median'] * 1e3:.2f}", f"{paired_ratio(stats, name, 'EMAState (1 EMA)'):.2f}"]
        for name, s in stats.items()
    ]
    return rows, {
        "ratio": ratio,
        "stats": {k: {kk: v for kk, v in s.items() if kk != "samples"} for k, s in stats.items()},
    }


def bench_snapshot(params: int, tensors: int, count: int, device: str, dtype: torch.dtype) -> dict:
    model = ManyTensors(params, tensors).to(device)
    with tempfile.TemporaryDirectory() as d:
        ph = PostHocEMA(model, d, snapshot_every=1, snapshot_dtype=dtype, max_pending=2)
        ph.update()  # first snapshot: creates the folder and manifest; not timed
        ph.flush()
        base = dict(ph.write_stats)
        copies = []
        for _ in range(count):
            ph.update()  # one averaging update + a snapshot of both profiles
            ph.flush()  # (untimed) let the writer finish, so each snapshot finds the queue empty
            sync(device)
            t0 = time.perf_counter()
            for p in ph.profiles:  # the same host copy a snapshot makes, without handing it to the writer
                _ = {k: _host_copy(v, dtype) for k, v in p.state_dict()["ema"].items()}
            sync(device)
            copies.append(time.perf_counter() - t0)
        st = ph.write_stats
        ph.close()
    caller = (st["caller_seconds"] - base["caller_seconds"]) / count
    writer = (st["writer_seconds"] - base["writer_seconds"]) / count
    copies.sort()
    return {
        "caller_ms": caller * 1e3,
        "writer_ms": writer * 1e3,
        "copy_ms": copies[len(copies) // 2] * 1e3,
        "hidden": writer / (caller + writer),
        "mb_per_snapshot": (st["bytes"] - base["bytes"]) / count / 2**20,
    }


_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[3])
import torch
from hf_ema import synthesize
torch.set_num_threads(int(sys.argv[4]))
def status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
import numpy, safetensors  # loaded by synthesize: part of the baseline, not of its working memory
base = status_mb("VmRSS")
t0 = time.perf_counter()
res = synthesize(sys.argv[1], sigma_rel=[float(sys.argv[2])], progress=False)
dt = time.perf_counter() - t0
# VmHWM, not ru_maxrss: the latter keeps the high-water mark of the forking parent across exec
peak = status_mb("VmHWM")
print(json.dumps({"seconds": dt, "peak_mb": peak, "base_mb": base, "residual": res[0].residual}))
"""


def bench_synthesis(params: int, tensors: int, snapshots: int, threads: int) -> dict:
    model = ManyTensors(params, tensors)
    with tempfile.TemporaryDirectory() as d:
        ph = PostHocEMA(model, d, snapshot_every=1)
        for _ in range(snapshots // 2):  # two profiles: two files per step
            ph.update()
        ph.close()
        del ph
        root = str(Path(__file__).resolve().parent.parent)
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, d, "0.08", root, str(threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        disk = sum(f.stat().st_size for f in Path(d, "snapshots").iterdir()) / 2**20
    model_mb = params * 4 / 2**20
    r.update(
        files=snapshots,
        disk_mb=disk,
        model_fp32_mb=model_mb,
        extra_mb=r["peak_mb"] - r["base_mb"],
        extra_copies=(r["peak_mb"] - r["base_mb"]) / model_mb,
    )
    return r


def main() -> None:
    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--params", type=int, default=20_000_000, help="parameters of the update/snapshot model")
    p.add_argument("--synth-params", type=int, default=10_000_000)
    p.add_argument("--synth-snapshots", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.params, args.synth_params, args.synth_snapshots = 1_000_000, 1_000_000, 8
    rounds = 5 if args.quick else 25
    tensors = 200

    rows, upd = bench_update(args.params, tensors, rounds, args.device)
    snaps = {
        name: bench_snapshot(args.params, tensors, 3 if args.quick else 8, args.device, dt)
        for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32))
    }
    syn = bench_synthesis(args.synth_params, tensors, args.synth_snapshots, args.threads)

    snap_rows = [
        [
            name,
            f"{s['mb_per_snapshot']:.0f}",
            f"{s['copy_ms']:.1f}",
            f"{s['caller_ms']:.1f}",
            f"{s['writer_ms']:.1f}",
            f"{100 * s['hidden']:.0f}%",
        ]
        for name, s in snaps.items()
    ]
    targets = [
        [
            f"PostHocEMA (2 profiles) update <= {TARGET_UPDATE}x one EMAState update",
            f"{upd['ratio']:.2f}x",
            "met" if upd["ratio"] <= TARGET_UPDATE else "MISSED",
        ]
    ]
    md = (
        f"**Post-hoc EMA** on {args.device}, {args.threads} torch thread(s)\n\n"
        f"Update: {args.params / 1e6:.0f}M fp32 parameters in {tensors} tensors, median of {rounds} interleaved "
        "rounds\n\n"
        + md_table(["candidate", "ms / update", "x EMAState"], rows)
        + "\n\nSnapshot of both profiles (training-thread stall vs background write)\n\n"
        + md_table(
            [
                "snapshot dtype",
                "MiB written",
                "bare copy ms",
                "stall ms (training thread)",
                "write ms (background)",
                "hidden",
            ],
            snap_rows,
        )
        + f"\n\nSynthesis of one sigma_rel from {syn['files']} bf16 snapshot files of {args.synth_params / 1e6:.0f}M "
        f"parameters ({syn['disk_mb']:.0f} MiB on disk): {syn['seconds']:.1f} s, peak memory "
        f"+{syn['extra_mb']:.0f} MiB = {syn['extra_copies']:.2f} fp32 model copies (fit residual "
        f"{syn['residual']:.2g})\n\n" + md_table(["target", "measured", "status"], targets)
    )
    emit(
        {
            "machine": machine_info(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "update": upd,
            "snapshot": snaps,
            "synthesis": syn,
            "markdown": md,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
