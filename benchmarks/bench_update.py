"""Update time of hf_ema's EMAState vs the copy floor and the EMA implementations a user would pick instead.

Workloads (one process, interleaved rounds, median):
  * fp32 parameters, fp32 EMA: ~50M elements in 200 tensors;
  * bf16 parameters, fp32 EMA: the same shapes.
Candidates: ``torch._foreach_copy_`` of the same tensors (the memory-traffic floor), ``hf_ema.EMAState.update``,
timm ``ModelEmaV3`` (foreach), ``torch.optim.swa_utils.AveragedModel`` + ``get_ema_multi_avg_fn``, diffusers
``EMAModel`` (foreach=True), ema-pytorch ``EMA`` (use_foreach=True), torch_ema ``ExponentialMovingAverage``.
Every peer's warm-up is disabled so all use the same constant decay, and every candidate is checked to really
average before it is timed: after the model moves, one update must shrink the EMA-to-model distance by exactly
the decay factor (``||ema' - p|| = d * ||ema - p||``).

Run: ``python benchmarks/bench_update.py`` (``--quick`` for a smoke run, ``--json out.json`` to keep results).
"""

from __future__ import annotations

import copy
import gc
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    perturb_,
    timm_model_ema,
)
from torch import nn

FLOOR = "torch._foreach_copy_ (floor)"
OURS = "hf_ema EMAState"
TIMM = "timm ModelEmaV3"


@dataclass
class Candidate:
    """One EMA implementation bound to a model: ``update()`` does one step, ``emas()`` returns its EMA tensors
    in ``model.parameters()`` order (for the correctness check)."""

    name: str
    update: Callable[[], Any]
    emas: Callable[[], list[torch.Tensor]]
    check: bool = True
    notes: list[str] = field(default_factory=list)


def _ours(model: nn.Module, decay: float, ema_dtype: torch.dtype) -> Candidate:
    from hf_ema import EMAState

    ema = EMAState(model, decay=decay, decay_type="constant", dtype=ema_dtype)
    names = [n for n, _ in model.named_parameters()]

    def emas() -> list[torch.Tensor]:
        sd = ema.state_dict()["ema"]
        return [sd[n] for n in names]

    return Candidate(OURS, ema.update, emas)


def _floor(model: nn.Module, decay: float, ema_dtype: torch.dtype) -> Candidate:
    params = [p.detach() for p in model.parameters()]
    shadow = [p.to(ema_dtype, copy=True) for p in params]
    return Candidate(FLOOR, lambda: torch._foreach_copy_(shadow, params), lambda: shadow, check=False)


def _timm(model: nn.Module, decay: float, ema_dtype: torch.dtype) -> Candidate:
    ModelEmaV3 = timm_model_ema().ModelEmaV3  # without importing timm/__init__ (see _common)
    mixed = ema_dtype != next(model.parameters()).dtype
    # use_warmup=False and step=None -> the plain constant decay on every call. `dtype=` only where the EMA's
    # precision differs from the model's: timm 1.0.29 and older have no such argument (a TypeError, reported).
    extra = {"dtype": ema_dtype} if mixed else {}
    m = ModelEmaV3(model, decay=decay, use_warmup=False, foreach=True, **extra)
    return Candidate(TIMM, lambda: m.update(model), lambda: list(m.module.parameters()))


def _averaged_model(model: nn.Module, decay: float, ema_dtype: torch.dtype) -> Candidate:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    am = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    am.module.to(ema_dtype)
    am.update_parameters(model)  # first call copies (n_averaged == 0); later calls average with `decay`
    return Candidate(
        "torch AveragedModel+get_ema_multi_avg_fn",
        lambda: am.update_parameters(model),
        lambda: list(am.module.parameters()),
    )


def _diffusers(model: nn.Module, decay: float, ema_dtype: torch.dtype) -> Candidate:
    from diffusers.training_utils import EMAModel

    params = list(model.parameters())
    # min_decay=decay turns off the (1+t)/(10+t) ramp; the very first step uses decay 0 (a copy), done here.
    em = EMAModel(params, decay=decay, min_decay=decay, use_ema_warmup=False, foreach=True)
    em.shadow_params = [s.to(ema_dtype) for s in em.shadow_params]
    em.step(params)
    return Candidate("diffusers EMAModel(foreach)", lambda: em.step(params), lambda: em.shadow_params)


def _ema_pytorch(model: nn.Module, decay: float, ema_dtype: torch.dtype) -> Candidate:
    from ema_pytorch import EMA

    mixed = ema_dtype != next(model.parameters()).dtype
    e = EMA(
        model,
        ema_model=copy.deepcopy(model).to(ema_dtype),
        beta=decay,
        min_value=decay,  # clamps the warm-up curve to the constant decay
        update_after_step=0,
        update_every=1,
        use_foreach=True,
        coerce_dtype=mixed,
        include_online_model=False,
    )
    e.update()  # first call initialises (copies)
    return Candidate("ema-pytorch EMA(foreach)", e.update, lambda: list(e.ema_model.parameters()))


def _torch_ema(model: nn.Module, decay: float, ema_dtype: torch.dtype) -> Candidate:
    from torch_ema import ExponentialMovingAverage

    t = ExponentialMovingAverage(model.parameters(), decay=decay, use_num_updates=False)
    t.shadow_params = [s.to(ema_dtype) for s in t.shadow_params]
    return Candidate("torch_ema ExponentialMovingAverage", t.update, lambda: t.shadow_params)


BUILDERS = [_floor, _ours, _timm, _averaged_model, _diffusers, _ema_pytorch, _torch_ema]


def build_candidates(
    model: nn.Module, decay: float, ema_dtype: torch.dtype
) -> tuple[dict[str, Candidate], dict[str, str]]:
    """Instantiate every available candidate on ``model``; return them and ``{name: why skipped}``."""
    cands: dict[str, Candidate] = {}
    skipped: dict[str, str] = {}
    for build in BUILDERS:
        label = build.__name__.strip("_")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c = build(model, decay, ema_dtype)
            cands[c.name] = c
        except ModuleNotFoundError as e:
            skipped[label] = f"not installed ({e.name}); `make bench` installs the peers"
        except ImportError as e:
            skipped[label] = f"ImportError: {str(e)[:160]}"
        except Exception as e:
            skipped[label] = f"{type(e).__name__}: {str(e)[:120]}"
    return cands, skipped


def own_failures(cands: dict[str, Candidate], skipped: dict[str, str]) -> list[str]:
    """What went wrong with hf_ema's own candidate or the copy floor (a peer's trouble is only a table note)."""
    out = [f"{n}: {'; '.join(cands[n].notes)}" for n in (FLOOR, OURS) if n in cands and cands[n].notes]
    out += [f"{label} was not built: {why}" for label, why in skipped.items() if label in ("floor", "ours")]
    return out


def check_updates(model: nn.Module, cands: dict[str, Candidate], decay: float) -> dict[str, float]:
    """Move the model, then check each candidate's update shrinks ``||ema - p||`` by ``decay``; drop failures.

    Returns ``{name: measured ratio}``. A candidate whose ``1 - ratio`` is more than 0.1% away from ``1 - decay``
    (the share of the step it takes; measured within ~1e-7 relative in fp32, ~1e-5 for ema-pytorch's fp32 beta),
    or that raises, gets a note and is not timed (it would not be computing the same EMA).
    """
    perturb_(model)
    params = [p.detach() for p in model.parameters()]
    ratios: dict[str, float] = {}
    for name in list(cands):
        c = cands[name]
        if not c.check:
            continue
        try:
            d0 = distance(c.emas(), params)
            c.update()
            d1 = distance(c.emas(), params)
            ratio = d1 / d0
        except Exception as e:
            c.notes.append(f"update failed: {type(e).__name__}: {str(e)[:100]}")
            ratios[name] = float("nan")
            continue
        ratios[name] = ratio
        if abs((1.0 - ratio) / (1.0 - decay) - 1.0) > 1e-3:
            c.notes.append(f"does NOT average with decay {decay}: distance ratio {ratio:.6f}")
    return ratios


def run_workload(
    label: str,
    total: int,
    n_tensors: int,
    p_dtype: torch.dtype,
    rounds: int,
    decay: float = 0.999,
    device: str = "cpu",
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Build the workload and all candidates, check them, time them; return rows and raw numbers."""
    torch.manual_seed(0)
    model = ManyTensors(total, n_tensors, dtype=p_dtype).to(device)
    cands, skipped = build_candidates(model, decay, torch.float32)
    ratios = check_updates(model, cands, decay)
    timed = {n: c.update for n, c in cands.items() if not c.notes}
    stats = interleaved_median(timed, rounds, device=device, max_seconds=max_seconds)
    timm = stats.get(TIMM, {}).get("median")
    rows = []
    for name, c in cands.items():
        if name not in stats:
            rows.append([name, "-", "-", "-", "; ".join(c.notes)])
            continue
        m = stats[name]["median"]
        rows.append(
            [
                name,
                f"{m * 1e3:.2f}",
                f"{paired_ratio(stats, name, FLOOR):.2f}",
                f"{paired_ratio(stats, name, TIMM):.2f}" if timm else "-",
                "floor" if not c.check else f"ratio {ratios[name]:.6f} = d ok",
            ]
        )
    for label_, why in skipped.items():
        rows.append([label_, "-", "-", "-", f"skipped: {why}"])
    failures = [f"{label}: {f}" for f in own_failures(cands, skipped)]
    n = model.numel()
    del cands, model, timed
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "label": label,
        "numel": n,
        "n_tensors": n_tensors,
        "param_dtype": str(p_dtype).replace("torch.", ""),
        "decay": decay,
        "device": str(device),
        "rounds": stats[FLOOR]["n"],
        "stats": stats,
        "ratios": ratios,
        "skipped": skipped,
        "rows": rows,
        "failures": failures,
    }


HEADERS = ["candidate", "median ms / update", "x copy", "x timm V3", "averaging check"]


def main() -> None:
    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=50_000_000, help="total parameter elements")
    p.add_argument("--tensors", type=int, default=200, help="number of parameter tensors")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--only", choices=["fp32", "bf16"], default=None, help="run one workload only")
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    p.add_argument(
        "--max-seconds", type=float, default=None, help="stop timing rounds of a workload after this"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    total, n_t, rounds = args.params, args.tensors, args.rounds
    if args.quick:  # every candidate and both workloads, tiny: a smoke test of the script, not a measurement
        total, n_t, rounds = 200_000, 20, 2
    results = []
    md = []
    workloads = [("fp32 params, fp32 EMA", torch.float32), ("bf16 params, fp32 EMA", torch.bfloat16)]
    if args.only:
        workloads = [w for w in workloads if w[0].startswith(args.only)]
    for label, dt in workloads:
        r = run_workload(label, total, n_t, dt, rounds, max_seconds=args.max_seconds)
        results.append(r)
        md.append(
            f"**{label}**: {r['numel'] / 1e6:.1f}M elements in {n_t} tensors, decay {r['decay']}, "
            f"{torch.get_num_threads()} torch thread(s), median of {r['rounds']} interleaved rounds\n\n"
            + md_table(HEADERS, r["rows"])
        )
    by_dtype = {r["param_dtype"]: r["stats"] for r in results}
    s32, s16 = by_dtype.get("float32", {}), by_dtype.get("bfloat16", {})
    ours32 = s32.get(OURS, {}).get("median")
    ours16 = s16.get(OURS, {}).get("median")
    timm16 = s16.get(TIMM, {}).get("median")
    targets = []
    if ours32:
        v = paired_ratio(s32, OURS, FLOOR)
        targets.append(["fp32 update <= 1.10x copy", f"{v:.2f}x", "met" if v <= 1.10 else "MISSED"])
    if ours16 and timm16:
        v = paired_ratio(s16, OURS, TIMM)
        targets.append(["bf16+fp32-EMA update <= 0.6x timm V3", f"{v:.2f}x", "met" if v <= 0.6 else "MISSED"])
    md.append(md_table(["target", "measured", "status"], targets))
    emit(
        {
            "name": "update",
            "machine": machine_info(),
            "workloads": results,
            "targets": targets,
            "markdown": "\n\n".join(md),
            "failures": [f for r in results for f in r["failures"]],
        },
        args.json,
    )


if __name__ == "__main__":
    main()
