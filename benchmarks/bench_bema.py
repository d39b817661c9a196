"""Cost of BEMA (``decay_type="bema"``) against a plain EMA: ``update()``, the read (evaluation swap) and memory.

BEMA's ``update()`` is the plain EMA's averaging with the schedule's decay ``1 - beta_t``; the bias correction
``EMA + alpha_t (theta_t - theta_0)`` is formed only when the EMA is read. So ``update()`` should cost what a plain
EMA costs plus the schedule's own arithmetic (a power per step), and the read (swap in for an evaluation and back)
should cost one pass more than a plain EMA's exchange plus a backup of the weights.

Workloads: ~``--elems`` fp32 elements in 200 tensors (memory bound) and 200 tensors of 64 elements (host overhead),
1 torch thread, interleaved rounds in one process, median; ratios are medians of per-round ratios. Before timing,
each candidate is checked to really average: one update must shrink the EMA-to-model distance by exactly the decay
the schedule gives for that step.

Run: ``python benchmarks/bench_bema.py`` (``--quick`` for a smoke run, ``--json out.json`` to keep results).
"""

from __future__ import annotations

import torch
from _common import (
    ManyTensors,
    arg_parser,
    distance,
    emit,
    interleaved_median,
    machine_info,
    md_table,
    paired_ratio,
)
from _common import perturb_ as move_

from hf_ema import EMAState

CANDIDATES = {
    "plain EMA (constant)": {"decay": 0.999, "decay_type": "constant"},
    "plain EMA (threshold)": {"decay": 0.999, "decay_type": "threshold"},
    "BEMA (paper, update_every=1)": {"decay_type": "bema"},
    "BEMA (before update_after)": {"decay_type": "bema", "update_after": 10**9},
}
BASE = "plain EMA (constant)"


def _check(model: torch.nn.Module, ema: EMAState) -> float:
    """One update after the model moved: the distance must shrink by exactly the schedule's decay."""
    with torch.no_grad():
        move_(model, 0.1, seed=7)
    params = list(model.parameters())
    before = distance(list(ema.state_dict()["ema"].values()), params)
    d = ema.update()
    after = distance(list(ema.state_dict()["ema"].values()), params)
    if abs(after - d * before) > 1e-4 * before + 1e-9:
        raise AssertionError(f"{ema.decay_type}: distance ratio {after / before} != decay {d}")
    return d


def run(total: int, n_tensors: int, rounds: int, inner: int, swap_rounds: int) -> dict:
    model = ManyTensors(total, n_tensors, dtype=torch.float32)
    emas = {name: EMAState(model, **kw) for name, kw in CANDIDATES.items()}
    checks = {name: _check(model, ema) for name, ema in emas.items()}
    stats = interleaved_median({n: e.update for n, e in emas.items()}, rounds, inner=inner)

    def swap(e: EMAState):
        def f() -> None:
            with e.average_parameters():
                pass

        return f

    swaps = interleaved_median(
        {"plain EMA (constant)": swap(emas[BASE]), "BEMA": swap(emas["BEMA (paper, update_every=1)"])},
        swap_rounds,
        inner=1,
    )
    rows = []
    for name, ema in emas.items():
        m = stats[name]["median"]
        rows.append(
            [
                name,
                f"{m * 1e3:.3f}",
                f"{paired_ratio(stats, name, BASE):.3f}",
                f"{ema.num_bytes() / emas[BASE].num_bytes():.2f}",
                f"{checks[name]:.6f}",
            ]
        )
    swap_rows = [
        [n, f"{s['median'] * 1e3:.2f}", f"{paired_ratio(swaps, n, 'plain EMA (constant)'):.2f}"]
        for n, s in swaps.items()
    ]
    numel = model.numel()
    md = (
        f"**BEMA update cost**: {numel / 1e6:.2f}M fp32 elements in {n_tensors} tensors, 1 torch thread, "
        f"mean of {inner} updates per sample, median of {rounds} interleaved rounds\n\n"
        + md_table(
            ["candidate", "ms / update", f"x {BASE}", "EMA memory x plain", "decay checked (distance ratio)"],
            rows,
        )
        + f"\n\nEvaluation swap (`average_parameters()` in and out), median of {swap_rounds} rounds:\n\n"
        + md_table(["candidate", "ms / swap in+out", "x plain"], swap_rows)
    )
    return {
        "numel": numel,
        "stats": stats,
        "swaps": swaps,
        "rows": rows,
        "swap_rows": swap_rows,
        "markdown": md,
    }


def main() -> None:
    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument(
        "--elems", type=int, default=20_000_000, help="total elements of the memory-bound workload"
    )
    p.add_argument("--rounds", type=int, default=25)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        big = run(200_000, 200, 3, 1, 3)
        small = run(200 * 64, 200, 3, 5, 3)
    else:
        big = run(args.elems, 200, args.rounds, 1, 9)
        small = run(200 * 64, 200, args.rounds, 50, 15)
    md = "\n\n".join(
        [big["markdown"], small["markdown"].replace("**BEMA update cost**", "**BEMA host overhead**")]
    )
    emit(
        {"name": "bema", "machine": machine_info(), "big": big, "small": small, "markdown": md},
        args.json,
    )


if __name__ == "__main__":
    main()
