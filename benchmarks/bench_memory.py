"""Memory held by the EMA, per rank: unsharded, FSDP2 with 2 ranks (gloo, CPU), and ``trainable_only`` on LoRA.

Each row reports ``EMAState.num_bytes()`` next to an independent expectation computed from the model itself
(tracked floating-point tensors x the EMA's element size; for FSDP2 the *local* shard sizes), so a regression
that keeps full copies on every rank, or tracks frozen weights, shows up as a mismatch.
The FSDP2 rows come from ``torchrun --standalone --nproc_per_node 2`` running this file with ``--fsdp-worker``.

Run: ``python benchmarks/bench_memory.py`` (``--quick`` for a smoke run, ``--json out.json`` to keep results).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from _common import ROOT, arg_parser, bert_config, emit, machine_info, md_table, timm_model_ema
from torch import nn

MB = 1 << 20


def make_bert(hidden: int, layers: int, vocab: int = 8000) -> nn.Module:
    from transformers import BertModel

    torch.manual_seed(0)
    return BertModel(bert_config(hidden, layers, vocab, heads=4))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def expected_bytes(model: nn.Module, ema_elem: int = 4, trainable_only: bool = False) -> int:
    """Independent expectation: floating params (+ persistent floating buffers unless trainable_only) x ema_elem,
    non-floating persistent buffers at their own size; local shards for DTensors."""
    total = 0
    for p in model.parameters():
        if p.is_floating_point() and (p.requires_grad or not trainable_only):
            total += _local(p).numel() * (8 if p.dtype == torch.float64 else ema_elem)
    if not trainable_only:
        seen = set()
        for mod in model.modules():
            for name, b in mod._buffers.items():
                if b is None or name in mod._non_persistent_buffers_set or id(b) in seen:
                    continue
                seen.add(id(b))
                total += b.numel() * (ema_elem if b.is_floating_point() else b.element_size())
    return total


def fsdp_worker(out: Path, hidden: int, layers: int) -> None:
    """Runs under torchrun: shard the BERT with FSDP2 and record this rank's EMA bytes."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from hf_ema import EMAState

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = make_bert(hidden, layers)
    full = expected_bytes(model)
    for layer in model.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    ema = EMAState(model, decay=0.999)
    info = {
        "rank": rank,
        "world": dist.get_world_size(),
        "ema_bytes": ema.num_bytes(),
        "expected": expected_bytes(model),
        "full": full,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    dist.barrier()


def run_fsdp(hidden: int, layers: int, timeout: int = 240) -> list[dict] | str:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(Path(__file__).resolve()),
            "--fsdp-worker",
            tmp,
            "--hidden",
            str(hidden),
            "--layers",
            str(layers),
        ]
        env = {
            **os.environ,
            "CUDA_VISIBLE_DEVICES": "",  # a CPU gloo group, also on a GPU machine (FSDP2 would pick the GPU)
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"FSDP2 run timed out after {timeout} s"
        files = sorted(Path(tmp).glob("rank*.json"))
        if proc.returncode != 0 or len(files) != 2:
            # the first worker traceback, not torchrun's summary that follows it
            err = proc.stderr
            start = err.find("Traceback")
            return f"FSDP2 run failed (rc {proc.returncode}): {err[start : start + 1500] if start >= 0 else err[-1500:]}"
        return [json.loads(f.read_text()) for f in files]


def run(hidden: int, layers: int) -> dict:
    from hf_ema import EMAState

    rows = []

    def row(label: str, got: int, exp: int, model_bytes: int) -> None:
        rows.append(
            [
                label,
                f"{got / MB:.2f}",
                f"{exp / MB:.2f}",
                "yes" if got == exp else "NO",
                f"{got / model_bytes:.2f}",
            ]
        )

    model = make_bert(hidden, layers)
    n_params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ema = EMAState(model, decay=0.999)
    row("unsharded, fp32 model, fp32 EMA", ema.num_bytes(), expected_bytes(model), model_bytes)
    del ema
    bf = make_bert(hidden, layers).to(torch.bfloat16)
    ema = EMAState(bf, decay=0.999)
    row("unsharded, bf16 model, fp32 EMA", ema.num_bytes(), expected_bytes(bf), model_bytes)
    ema = EMAState(bf, decay=0.999, dtype=None)
    row("unsharded, bf16 model, dtype=None (bf16 EMA)", ema.num_bytes(), expected_bytes(bf, 2), model_bytes)
    del ema, bf
    try:
        t = timm_model_ema().ModelEmaV3(model, decay=0.999)
        tb = sum(v.numel() * v.element_size() for v in t.module.state_dict().values())
        rows.append(
            ["(peer) timm ModelEmaV3: full deep copy", f"{tb / MB:.2f}", "-", "-", f"{tb / model_bytes:.2f}"]
        )
        del t
    except ModuleNotFoundError as e:
        rows.append(["(peer) timm ModelEmaV3", "-", "-", "-", f"skipped: not installed ({e.name})"])
    except ImportError as e:
        rows.append(["(peer) timm ModelEmaV3", "-", "-", "-", f"skipped: ImportError: {str(e)[:120]}"])

    fsdp = run_fsdp(hidden, layers)
    fsdp_note = ""
    if isinstance(fsdp, str):
        fsdp_note = fsdp
    else:
        for info in fsdp:
            row(f"FSDP2 2 ranks, rank {info['rank']}", info["ema_bytes"], info["expected"], model_bytes)
        total = sum(i["ema_bytes"] for i in fsdp)
        rows.append(
            [
                "FSDP2 2 ranks, sum over ranks",
                f"{total / MB:.2f}",
                f"{fsdp[0]['full'] / MB:.2f}",
                "-",
                f"{total / model_bytes:.2f}",
            ]
        )

    lora_note = ""
    try:
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(
                make_bert(hidden, layers), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
            )
        ema = EMAState(peft_model, decay=0.999, trainable_only=True)
        row(
            "LoRA r=8 (query, value), trainable_only=True",
            ema.num_bytes(),
            expected_bytes(peft_model, trainable_only=True),
            model_bytes,
        )
        ema = EMAState(peft_model, decay=0.999)
        row("LoRA r=8, trainable_only=False", ema.num_bytes(), expected_bytes(peft_model), model_bytes)
        del ema, peft_model
    except ImportError:
        lora_note = "peft not installed: LoRA rows skipped"

    md = (
        f"**EMA memory per rank**: BERT {layers} layers, hidden {hidden}, {n_params / 1e6:.2f}M params "
        f"({model_bytes / MB:.2f} MiB fp32 state dict)\n\n"
        + md_table(["setup", "EMA MiB (num_bytes)", "expected MiB", "match", "x fp32 model"], rows)
    )
    for note in (fsdp_note, lora_note):
        if note:
            md += f"\n\nNote: {note}"
    # Our rows must match their independent expectation, and the FSDP2 run must have run (a missing peft is
    # only a note: it is an optional dependency).
    failures = [f"{r[0]}: num_bytes {r[1]} MiB != expected {r[2]} MiB" for r in rows if r[3] == "NO"]
    if fsdp_note:
        failures.append(fsdp_note)
    return {
        "name": "memory",
        "machine": machine_info(),
        "rows": rows,
        "fsdp": fsdp,
        "markdown": md,
        "failures": failures,
    }


def main() -> None:
    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--fsdp-worker", type=Path, default=None, help=argparse_hidden())
    args = p.parse_args()
    if args.fsdp_worker is not None:
        fsdp_worker(args.fsdp_worker, args.hidden, args.layers)
        return
    hidden, layers = (64, 2) if args.quick else (args.hidden, args.layers)  # quick: every row, tiny BERT
    emit(run(hidden, layers), args.json)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
