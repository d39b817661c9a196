"""Shard-aware helpers: unwrap wrapped models, find each parameter's local shard, tell the main process.

These helpers depend on torch alone, so the EMA engine (:mod:`hf_ema.state`) can use them without knowing about
Trainer or Accelerate. A parameter's *local tensor* is the piece of it that this process owns and the optimizer
updates in place:

* plain tensors and DDP: the tensor itself (every rank holds a full replica);
* FSDP2 (``fully_shard``): the ``DTensor``'s local shard;
* DeepSpeed ZeRO-3: the ``ds_tensor`` partition.

Averaging local tensors needs no communication; only saving a full ``ema_net`` gathers.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

__all__ = [
    "full_tensor",
    "is_dtensor",
    "is_main_process",
    "is_zero3_param",
    "local_tensor",
    "shard_like",
    "unwrap_model",
]


def unwrap_model(model: nn.Module, accelerator: Any = None) -> nn.Module:
    """Return the user's module from under DDP / DataParallel / ``torch.compile`` / Accelerate wrappers.

    FSDP2 and ZeRO-3 modules are returned as they are: their parameters are already the sharded ones.

    Args:
        model: A module, possibly wrapped.
        accelerator: An ``accelerate.Accelerator``; when given, its ``unwrap_model`` is tried first.

    Example:
        >>> unwrap_model(nn.DataParallel(nn.Linear(2, 2))).__class__.__name__
        'Linear'
    """
    if accelerator is not None and hasattr(accelerator, "unwrap_model"):
        try:
            model = accelerator.unwrap_model(model, keep_torch_compile=False)
        except TypeError:  # older accelerate without keep_torch_compile
            model = accelerator.unwrap_model(model)
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif type(model).__name__ == "DeepSpeedEngine" and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
    return model


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def is_zero3_param(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DeepSpeed ZeRO-3 partitioned parameter (it carries a ``ds_tensor`` partition)."""
    return hasattr(t, "ds_tensor") and hasattr(t, "ds_id")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """Return the plain tensor holding this process's part of ``t``, sharing its storage (no copy).

    Args:
        t: A parameter or buffer: plain, FSDP2 ``DTensor`` or DeepSpeed ZeRO-3 partitioned.

    Returns:
        A detached plain tensor that the optimizer's in-place updates of ``t`` are visible through, and that
        in-place writes go back into ``t`` through.

    Example:
        >>> p = nn.Parameter(torch.ones(3))
        >>> local_tensor(p).data_ptr() == p.data_ptr()
        True
    """
    if is_dtensor(t):
        return t._local_tensor.detach() if hasattr(t, "_local_tensor") else t.to_local().detach()
    if is_zero3_param(t):
        return t.ds_tensor.detach()
    return t.detach()


def is_main_process() -> bool:
    """Whether this process should write files: rank 0 of the default group, or the only process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def full_tensor(source: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Assemble the full tensor whose local part (laid out like ``source``'s) is ``local``; returned on the CPU.

    For plain tensors this is ``local`` itself (moved to the CPU). For an FSDP2 ``DTensor`` the shards of all
    ranks are gathered: a collective, so every rank must call it.

    Args:
        source: The parameter or buffer as the model holds it (gives the sharding layout).
        local: A tensor shaped like ``local_tensor(source)`` (e.g. the EMA of that shard).
    """
    if is_dtensor(source):
        from torch.distributed.tensor import DTensor

        dt = DTensor.from_local(
            local.to(source.device) if local.device != source.device else local,
            source.device_mesh,
            source.placements,
            run_check=False,
            shape=source.shape,
            stride=source.stride(),
        )
        return dt.full_tensor().cpu()
    if is_zero3_param(source):
        raise NotImplementedError("Gathering a DeepSpeed ZeRO-3 partition is not supported yet")
    return local.detach().cpu()


def shard_like(source: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Cut this process's part out of ``full``, laid out like ``local_tensor(source)`` (no communication).

    Args:
        source: The parameter or buffer as the model holds it (gives the sharding layout).
        full: The full tensor (same shape as ``source``).
    """
    if is_dtensor(source):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(
            source.shape, source.device_mesh, source.placements
        )
        index = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
        return full[index]
    if is_zero3_param(source):
        raise NotImplementedError("Scattering into a DeepSpeed ZeRO-3 partition is not supported yet")
    return full
