"""GPU benchmarks (only when ``torch.cuda.is_available()``): the update benchmark on the GPU, and how much of
the update a side CUDA stream hides behind the next step's compute.

Side-stream measurement: a "training step" is a compute-bound matmul chain (standing in for forward/backward)
followed by ``optimizer.step()``. Three loops run interleaved: no EMA, ``EMAState.update()`` inline, and
``EMAState(side_stream=True).update()`` (enqueued on a side stream after the optimizer step, joined by the
optimizer's step pre-hook before the next step). Hidden fraction = ``1 - (t_side - t_none) / (t_inline - t_none)``.

Without CUDA the script prints "no CUDA: skipped ..." and exits 0, except with ``--quick`` or ``--allow-cpu``:
those run the same code on the CPU, to smoke-test the script (the side stream then falls back to inline and the
numbers mean nothing; the output says so).

Run: ``python benchmarks/bench_cuda.py`` (``--quick`` for a smoke run, ``--json out.json`` to keep results).
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
from _common import ManyTensors, arg_parser, emit, machine_info, md_table, paired_ratio, sync
from bench_update import FLOOR, HEADERS, OURS, TIMM, run_workload


def side_stream_overlap(total: int, n_tensors: int, steps: int, rounds: int, device: str, mm: int) -> dict:
    """Time the three loops (no EMA / inline / side stream); return medians and the hidden fraction."""
    from hf_ema import EMAState

    model = ManyTensors(total, n_tensors).to(device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    opt = torch.optim.SGD(params, lr=1e-3)
    a = torch.randn(mm, mm, device=device)
    b = torch.randn(mm, mm, device=device)

    def compute() -> None:
        x = a
        for _ in range(4):
            x = x @ b
            x = x / x.norm()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inline = EMAState(model, decay=0.999)
        side = EMAState(model, decay=0.999, side_stream=True)
    loops = {
        "no EMA": lambda: None,
        "EMA inline": inline.update,
        "EMA side_stream=True": side.update,
    }

    def run_loop(update) -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            compute()
            opt.step()
            update()
        side.wait()
        sync(device)
        return (time.perf_counter() - t0) / steps

    names = list(loops)
    for n in names:  # warm-up
        run_loop(loops[n])
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            samples[n].append(run_loop(loops[n]))
    med = {n: statistics.median(v) for n, v in samples.items()}
    cost_inline = med["EMA inline"] - med["no EMA"]
    cost_side = med["EMA side_stream=True"] - med["no EMA"]
    hidden = 1.0 - cost_side / cost_inline if cost_inline > 0 else float("nan")
    side_active = side._stream is not None
    return {
        "median_s_per_step": med,
        "cost_inline_s": cost_inline,
        "cost_side_s": cost_side,
        "hidden_fraction": hidden,
        "side_stream_active": side_active,
    }


def main() -> None:
    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=50_000_000)
    p.add_argument("--tensors", type=int, default=200)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument(
        "--allow-cpu", action="store_true", help="run on the CPU anyway (smoke test of the script)"
    )
    args = p.parse_args()
    if torch.cuda.is_available():
        device = "cuda"
    elif args.allow_cpu or args.quick:
        device = "cpu"
        print(
            "no CUDA: running the GPU benchmark's code on the CPU as a smoke test (not a GPU result)",
            flush=True,
        )
    else:
        msg = "no CUDA: skipped (torch.cuda.is_available() is False; `--quick` smoke-tests this script on the CPU)"
        emit({"name": "cuda", "skipped": msg, "markdown": msg}, args.json)
        return
    total, n_t, rounds, steps, mm = args.params, args.tensors, args.rounds, 20, 2048
    if args.quick:  # both workloads and the side-stream loops, tiny: a smoke test, not a measurement
        total, n_t, rounds, steps, mm = 200_000, 20, 2, 3, 64
    md = [
        f"**GPU**: {torch.cuda.get_device_name(0) if device == 'cuda' else 'CPU (smoke run, not a GPU result)'}"
    ]
    workloads = []
    for label, dt in (("fp32 params, fp32 EMA", torch.float32), ("bf16 params, fp32 EMA", torch.bfloat16)):
        r = run_workload(label, total, n_t, dt, rounds, device=device)
        workloads.append(r)
        md.append(
            f"**{label} on {device}**: {r['numel'] / 1e6:.1f}M elements in {n_t} tensors, median of "
            f"{rounds} interleaved rounds\n\n" + md_table(HEADERS, r["rows"])
        )
    ov = side_stream_overlap(total, n_t, steps, max(3, rounds // 3), device, mm)
    rows = [[n, f"{s * 1e3:.3f}"] for n, s in ov["median_s_per_step"].items()]
    md.append(
        f"**Side stream** ({steps} steps per loop, matmul chain {mm}x{mm} as the step's compute)\n\n"
        + md_table(["loop", "ms / step"], rows)
        + f"\n\nEMA cost per step: inline {ov['cost_inline_s'] * 1e3:.3f} ms, side stream "
        f"{ov['cost_side_s'] * 1e3:.3f} ms; hidden fraction {ov['hidden_fraction']:.2f}"
        + ("" if ov["side_stream_active"] else " (side stream inactive: not on CUDA)")
    )
    targets = []
    s32 = workloads[0]["stats"]
    if OURS in s32:
        targets.append(["(GPU) fp32 update vs copy", f"{paired_ratio(s32, OURS, FLOOR):.2f}x", "-"])
    s16 = workloads[1]["stats"]
    if OURS in s16 and TIMM in s16:
        targets.append(["(GPU) bf16+fp32 EMA vs timm V3", f"{paired_ratio(s16, OURS, TIMM):.2f}x", "-"])
    md.append(md_table(["figure", "measured", "note"], targets))
    emit(
        {
            "name": "cuda",
            "machine": machine_info(),
            "device": device,
            "workloads": workloads,
            "side_stream": ov,
            "targets": targets,
            "markdown": "\n\n".join(md),
            "failures": [f for w in workloads for f in w["failures"]],
        },
        args.json,
    )


if __name__ == "__main__":
    main()
