"""Run every benchmark and write ``benchmarks/RESULTS.md`` (tables, machine, versions) and ``update_time.png``.

Each benchmark runs in its own process (so one workload's memory never disturbs the next), with a time limit;
the GPU benchmark (``bench_cuda.py``) is included only when ``torch.cuda.is_available()``, except with
``--quick``, which smoke-tests every script (``bench_cuda.py --quick`` runs its code on the CPU).
Budget: under 10 minutes on 2 CPU cores shared with other work.

A script that fails (non-zero exit: it crashed, timed out, or hf_ema's own row was wrong) is recorded in the
results with the end of its error output, and this script then exits with status 1 after writing them.

Run: ``python benchmarks/run_all.py`` (``--quick`` for a smoke run of every script that writes to a temporary
folder unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine_info  # noqa: E402

# (key, script, extra args for the full run, time limit in seconds, section title)
BENCHES = [
    (
        "update_1t",
        "bench_update.py",
        ["--rounds", "25", "--threads", "1", "--max-seconds", "45"],
        200,
        "Update time, 1 torch thread (robust to other load on the machine)",
    ),
    (
        "update",
        "bench_update.py",
        ["--rounds", "25", "--max-seconds", "60"],
        300,
        "Update time, torch's default threads (all cores; sensitive to other load)",
    ),
    ("overhead", "bench_overhead.py", [], 120, "Host overhead per update"),
    (
        "trainer",
        "bench_trainer.py",
        ["--threads", "1", "--max-seconds", "120"],
        240,
        "Trainer overhead (1 torch thread)",
    ),
    ("memory", "bench_memory.py", [], 200, "EMA memory per rank"),
    ("bema", "bench_bema.py", [], 300, "BEMA cost"),
    ("posthoc", "bench_posthoc.py", ["--max-seconds", "120"], 600, "Post-hoc EMA cost"),
]
CUDA_BENCH = ("cuda", "bench_cuda.py", [], 400, "GPU")


def quick_args(extra: list[str]) -> list[str]:
    """``--quick`` plus the flags of ``extra`` that choose *what* runs (``--threads N``), not sizes or rounds."""
    i = extra.index("--threads") if "--threads" in extra else None
    return ["--quick", *(extra[i : i + 2] if i is not None else [])]


def run_one(script: str, extra: list[str], limit: int, json_path: Path) -> tuple[dict, float]:
    """Run one benchmark script in its own process; return its JSON result and wall time.

    The result gets ``"failed": "<why>"`` when the script exited non-zero or timed out; its markdown then
    ends with the tail of the script's error output (and is only that when it wrote no JSON).
    """
    cmd = [sys.executable, str(HERE / script), "--json", str(json_path), *extra]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        why = f"timed out after {limit} s"
        return {"name": script, "failed": why, "markdown": f"**{script}**: {why}"}, time.perf_counter() - t0
    dt = time.perf_counter() - t0
    res = json.loads(json_path.read_text()) if json_path.exists() else {"name": script, "markdown": ""}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-1500:]
        res["failed"] = f"exit status {proc.returncode}"
        res["markdown"] += f"\n\n**{script} failed** (exit status {proc.returncode}):\n\n```\n{tail}\n```"
    return res, dt


def plot(updates: list[tuple[str, dict]], overhead: dict | None, path: Path) -> bool:
    """Bar charts: ms per update for each candidate (each update run's workloads, and host overhead)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [
        (f"{w['label']}, {tag}", w["stats"], "ms / update")
        for tag, u in updates
        for w in u.get("workloads", [])
    ]
    if overhead and "stats" in overhead:
        panels.append(
            (f"host overhead, {overhead['n_tensors']} tiny tensors", overhead["stats"], "ms / update")
        )
    if not panels:
        return False
    cols = min(3, len(panels))
    rows_ = (len(panels) + cols - 1) // cols
    fig, axes_ = plt.subplots(rows_, cols, figsize=(5.4 * cols, 3.8 * rows_), squeeze=False)
    axes = list(axes_.flat)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    axes = axes[: len(panels)]
    for ax, (title, stats, unit) in zip(axes, panels, strict=True):
        names = list(stats)
        vals = [stats[n]["median"] * 1e3 for n in names]
        colors = [
            "tab:green" if n.startswith("hf_ema") else "tab:gray" if "floor" in n else "tab:blue"
            for n in names
        ]
        short = [n.replace(" (floor)", "\n(floor)").replace("+get_ema_multi_avg_fn", "") for n in names]
        ax.barh(short, vals, color=colors)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"{unit} (median, lower is better)")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, few rounds")
    p.add_argument("--out", type=Path, default=None, help="folder for RESULTS.md and update_time.png")
    args = p.parse_args()
    out = args.out or (Path(tempfile.mkdtemp(prefix="hf_ema_bench_")) if args.quick else HERE)
    out.mkdir(parents=True, exist_ok=True)
    benches = list(BENCHES) + ([CUDA_BENCH] if torch.cuda.is_available() or args.quick else [])
    t_start = time.perf_counter()
    results: dict[str, dict] = {}
    commands: dict[str, str] = {}
    timings: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for key, script, extra, limit, _ in benches:
            if args.quick:
                extra = quick_args(extra)
            print(f"running {script} {' '.join(extra)} ...", flush=True)
            res, dt = run_one(script, extra, limit, Path(tmp) / f"{key}.json")
            results[key] = res
            commands[key] = " ".join(["python", f"benchmarks/{script}", *extra])
            timings.append([f"{script} {' '.join(extra)}".strip(), f"{dt:.0f} s", res.get("failed", "ok")])
            print(res["markdown"], "\n", flush=True)
    total = time.perf_counter() - t_start
    updates = [("1 thread", results.get("update_1t", {})), ("default threads", results.get("update", {}))]
    has_plot = plot(updates, results.get("overhead"), out / "update_time.png")

    info = machine_info()
    v = info["versions"]
    targets = []
    for key, *_ in benches:
        tag = " (1 thread)" if key.endswith("_1t") else " (default threads)" if key == "update" else ""
        targets += [[a + tag, b, c] for a, b, c in results[key].get("targets", [])]
    lines = [
        "# hf_ema benchmark results",
        "",
        "Generated by `python benchmarks/run_all.py`"
        + (" --quick (smoke run: sizes too small to mean anything)" if args.quick else "")
        + f" in {total:.0f} s. Every table comes from one process: candidates run in interleaved rounds and the "
        "median is reported, and the ratios (x copy, x timm V3) are medians of per-round ratios, so they stay comparable "
        "on a noisy machine; absolute times vary with load. The 1-thread tables are stable when other processes share "
        "the cores; the default-thread tables can swing then (a thread that the OS moves to another core loses the "
        "cache locality the bf16 path relies on).",
        "",
        f"- Machine: {info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}, "
        f"load average at the end {tuple(round(x, 2) for x in info['load_avg']) if info['load_avg'] else '?'}; "
        f"GPU: {info['cuda'] or 'none'}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
        "## Targets",
        "",
        "| target | measured | status |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in targets],
        "",
    ]
    if has_plot:
        lines += ["![update time](update_time.png)", ""]
    for key, _, _, _, title in benches:
        lines += [f"## {title}", "", f"`{commands[key]}`", "", results[key]["markdown"], ""]
    if "cuda" not in results:
        lines += [
            "## GPU",
            "",
            "Not run: `torch.cuda.is_available()` is False on this machine (a GPU run: `RESULTS_GPU.md`).",
            "",
        ]
    lines += [
        "## Wall time per script",
        "",
        "| script | wall | result |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in timings],
        "",
    ]
    tmp_md = out / "RESULTS.md.tmp"
    tmp_md.write_text("\n".join(lines))
    os.replace(tmp_md, out / "RESULTS.md")
    print(f"wrote {out / 'RESULTS.md'} ({total:.0f} s)")
    failed = [f"{commands[k]}: {r['failed']}" for k, r in results.items() if "failed" in r]
    if failed:
        print("FAILED:", *failed, sep="\n  ", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
