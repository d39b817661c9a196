"""Host overhead per update: ~200 tiny tensors, where the Python/dispatch cost dominates (as on GPUs).

Same candidates and the same averaging check as ``bench_update.py``; each sample is the mean of ``--inner``
back-to-back updates, the table shows the median sample of interleaved rounds, in milliseconds per update.

Run: ``python benchmarks/bench_overhead.py`` (``--quick`` for a smoke run, ``--json out.json`` to keep results).
"""

from __future__ import annotations

import torch
from _common import ManyTensors, arg_parser, emit, interleaved_median, machine_info, md_table, paired_ratio
from bench_update import FLOOR, OURS, TIMM, build_candidates, check_updates, own_failures

TARGET_MS = 0.4


def run(n_tensors: int, elems: int, rounds: int, inner: int, decay: float = 0.999) -> dict:
    """Time all candidates on ``n_tensors`` fp32 tensors of about ``elems`` elements each."""
    model = ManyTensors(n_tensors * elems, n_tensors, dtype=torch.float32)
    cands, skipped = build_candidates(model, decay, torch.float32)
    ratios = check_updates(model, cands, decay)
    timed = {n: c.update for n, c in cands.items() if not c.notes}
    stats = interleaved_median(timed, rounds, inner=inner)
    rows = []
    for name, c in cands.items():
        if name not in stats:
            rows.append([name, "-", "-", "; ".join(c.notes)])
            continue
        m = stats[name]["median"]
        rows.append(
            [
                name,
                f"{m * 1e3:.3f}",
                f"{paired_ratio(stats, name, FLOOR):.1f}",
                "floor" if not c.check else f"{ratios[name]:.6f}",
            ]
        )
    for label, why in skipped.items():
        rows.append([label, "-", "-", f"skipped: {why}"])
    ours = stats.get(OURS, {}).get("median")
    targets = []
    if ours is not None:
        targets.append(
            [
                f"host overhead <= {TARGET_MS} ms / update ({n_tensors} tensors)",
                f"{ours * 1e3:.3f} ms",
                "met" if ours * 1e3 <= TARGET_MS else "MISSED",
            ]
        )
    timm = stats.get(TIMM, {}).get("median")
    if ours is not None and timm is not None:
        targets.append(["(info) ours vs timm V3", f"{paired_ratio(stats, OURS, TIMM):.2f}x", "-"])
    md = (
        f"**Host overhead**: {n_tensors} fp32 tensors of ~{elems} elements, mean of {inner} updates per sample, "
        f"median of {rounds} interleaved rounds\n\n"
        + md_table(["candidate", "ms / update", "x copy", "distance ratio (must be d)"], rows)
        + "\n\n"
        + md_table(["target", "measured", "status"], targets)
    )
    return {
        "name": "overhead",
        "machine": machine_info(),
        "n_tensors": n_tensors,
        "elems": elems,
        "stats": stats,
        "ratios": ratios,
        "skipped": skipped,
        "rows": rows,
        "targets": targets,
        "markdown": md,
        "failures": own_failures(cands, skipped),
    }


def main() -> None:
    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument("--tensors", type=int, default=200)
    p.add_argument("--elems", type=int, default=64, help="elements per tensor")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--inner", type=int, default=50)
    args = p.parse_args()
    # quick: a smoke test of the script, not a measurement
    rounds, inner = (2, 5) if args.quick else (args.rounds, args.inner)
    emit(run(args.tensors, args.elems, rounds, inner), args.json)


if __name__ == "__main__":
    main()
