"""Shard-aware helpers: unwrap wrapped models, find each parameter's local shard, tell the main process.

These helpers depend on torch alone, so the EMA engine (:mod:`hf_ema.state`) can use them without knowing about
Trainer or Accelerate. A parameter's *local tensor* is the piece of it that this process owns and the optimizer
updates in place:

* plain tensors and DDP: the tensor itself (every rank holds a full replica);
* FSDP2 (``fully_shard``): the ``DTensor``'s local shard;
* DeepSpeed ZeRO-3: the ``ds_tensor`` partition.

Averaging local tensors needs no communication; only saving a full ``ema_net`` gathers.

Frameworks also keep *full* copies of some parameters between forwards, and a forward reads those instead of the
local tensor: FSDP2 keeps a module's parameters unsharded after its forward when ``reshard_after_forward=False`` (the
root module by default, and the group Accelerate puts embeddings, final norm and head in); ZeRO-3 keeps parameters
gathered (``ds_status == AVAILABLE``): small ones (``ds_persist``) for good, others until they are released. So every
write of local tensors (the EMA swap, its restore, ``copy_to``) is bracketed by :func:`before_local_write` and
:func:`after_local_write`, which make the next forward read what was written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "after_local_write",
    "barrier",
    "before_local_write",
    "full_shape",
    "full_tensor",
    "is_dtensor",
    "is_main_process",
    "is_sharded",
    "is_zero3_param",
    "local_tensor",
    "read_local",
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
    _refuse_fsdp1(model)
    return model


def _refuse_fsdp1(model: nn.Module) -> None:
    """Raise if ``model`` holds FSDP1 (``FullyShardedDataParallel``) wrappers: their flat parameters hide names."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return
    for name, mod in model.named_modules():
        if isinstance(mod, FullyShardedDataParallel):
            raise ValueError(
                "`model` is wrapped by FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel"
                + (f" at {name!r}" if name else "")
                + "), which hf_ema does not support: its flattened parameters do not map to the model's own "
                "names. Use FSDP2 instead: torch.distributed.fsdp.fully_shard, or Accelerate with "
                "FullyShardedDataParallelPlugin(fsdp_version=2) / `fsdp_version: 2` in the accelerate config."
            )


def _dtensor_api() -> tuple[Any, Any] | None:
    """``(DTensor, compute_local_shape_and_global_offset)``; public since torch 2.5, ``_tensor`` before."""
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # pragma: no cover - torch < 2.5, or built without distributed
        try:
            from torch.distributed._tensor import DTensor
            from torch.distributed._tensor._utils import compute_local_shape_and_global_offset
        except ImportError:
            return None
    return DTensor, compute_local_shape_and_global_offset


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 parameter)."""
    api = _dtensor_api()
    return api is not None and isinstance(t, api[0])


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


def _zero3_layout(source: torch.Tensor) -> tuple[Any, int, int, int]:
    """``(group, world size, rank, partition numel)`` of a ZeRO-3 parameter.

    DeepSpeed cuts the flattened parameter into ``world`` equal partitions of ``partition numel`` elements
    (the last one zero-padded); rank ``r`` of the parameter's process group holds elements
    ``[r * n, (r + 1) * n)``.
    """
    group = getattr(source, "ds_process_group", None)
    world = torch.distributed.get_world_size(group=group)
    rank = torch.distributed.get_rank(group=group)
    return group, world, rank, source.ds_tensor.numel()


def full_shape(source: torch.Tensor) -> torch.Size:
    """The shape of the whole tensor, also for a ZeRO-3 parameter (whose ``.shape`` is empty once partitioned).

    Example:
        >>> full_shape(torch.zeros(2, 3))
        torch.Size([2, 3])
    """
    if is_zero3_param(source):
        return torch.Size(source.ds_shape)
    return source.shape


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is split across processes (FSDP2 ``DTensor`` or ZeRO-3 partition): gathering it is a
    collective."""
    return is_dtensor(t) or is_zero3_param(t)


def full_tensor(source: torch.Tensor, local: torch.Tensor, to_cpu: bool = True) -> torch.Tensor:
    """Assemble the full tensor whose local part (laid out like ``local_tensor(source)``) is ``local``; on the CPU.

    * plain tensors (single process, DDP): ``local`` itself, moved to the CPU;
    * FSDP2 ``DTensor``: the shards of all ranks are gathered (``DTensor.full_tensor``), on the parameter's device,
      then offloaded to the CPU, one tensor at a time;
    * ZeRO-3: the flat partitions of all ranks of the parameter's process group are gathered, the padding
      dropped, and the result reshaped to ``ds_shape``.

    The sharded cases are collectives: every rank of the group must call this, in the same order.

    Args:
        source: The parameter or buffer as the model holds it (gives the sharding layout).
        local: A tensor shaped like ``local_tensor(source)`` (e.g. the EMA of that shard); its dtype is kept.
        to_cpu: Move the result to the CPU (ranks that only take part in the gather pass False to skip the copy).

    Returns:
        The full tensor (shape ``full_shape(source)``, dtype of ``local``) on the CPU.

    Example:
        >>> full_tensor(torch.zeros(2), torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    if is_dtensor(source):
        DTensor = _dtensor_api()[0]
        dt = DTensor.from_local(
            local.to(source.device) if local.device != source.device else local,
            source.device_mesh,
            source.placements,
            run_check=False,
            shape=source.shape,
            stride=source.stride(),
        )
        full = dt.full_tensor()
        return full.cpu() if to_cpu else full
    if is_zero3_param(source):
        group, world, _, n = _zero3_layout(source)
        if local.numel() != n:
            raise ValueError(
                f"full_tensor: `local` has {local.numel()} elements, but this rank's ZeRO-3 partition has {n}"
            )
        # gather on the device the partitions live on (the process group's backend may need it there)
        device = source.ds_tensor.device
        part = local.detach().reshape(-1).to(device)
        parts = [torch.empty_like(part) for _ in range(world)]
        torch.distributed.all_gather(parts, part, group=group)
        full = torch.cat(parts)[: source.ds_numel].reshape(source.ds_shape)
        return full.cpu() if to_cpu else full
    return local.detach().cpu() if to_cpu else local.detach()


def read_local(
    source: torch.Tensor, shape: Sequence[int], read: Callable[[tuple[slice, ...]], torch.Tensor]
) -> torch.Tensor:
    """This process's part of a full tensor that is read by region, laid out like ``local_tensor(source)``.

    Only the part this process keeps is asked for: an FSDP2 shard reads its own block, a ZeRO-3 partition reads the
    rows that hold its flat range (at most two partial rows more), an unsharded tensor reads everything. So loading
    a full ``ema_net`` costs each rank about its shard in host memory, and a file written with any number of
    processes loads into any other number.

    Args:
        source: The parameter or buffer as the model holds it (gives the sharding layout).
        shape: The full tensor's shape (must be ``full_shape(source)``).
        read: Returns the region ``index`` of the full tensor (one slice per leading dimension; ``()``: all of it),
            e.g. :meth:`hf_ema.io.EMANetReader.read` or ``full.__getitem__``.

    Returns:
        A tensor shaped like ``local_tensor(source)``.

    Raises:
        ValueError: If ``shape`` is not the full shape of ``source``.

    Example:
        >>> full = torch.arange(4.0)
        >>> read_local(torch.zeros(4), full.shape, full.__getitem__).tolist()
        [0.0, 1.0, 2.0, 3.0]
    """
    if tuple(shape) != tuple(full_shape(source)):
        raise ValueError(
            f"read_local: the full tensor has shape {tuple(shape)}, expected {tuple(full_shape(source))}"
        )
    if is_dtensor(source):
        compute_local_shape_and_global_offset = _dtensor_api()[1]
        local_shape, offset = compute_local_shape_and_global_offset(
            source.shape, source.device_mesh, source.placements
        )
        return read(tuple(slice(o, o + n) for o, n in zip(offset, local_shape, strict=True)))
    if is_zero3_param(source):
        _, _, rank, n = _zero3_layout(source)
        numel = math.prod(shape)
        start = min(rank * n, numel)
        stop = min(start + n, numel)
        if start == stop:
            piece = torch.empty(0)
        elif len(shape) == 0:
            piece = read(()).reshape(-1)
        else:
            row = numel // shape[0]  # elements per leading-dimension row
            first, last = start // row, -(-stop // row)
            piece = read((slice(first, last),)).reshape(-1)[start - first * row : stop - first * row]
        if piece.numel() < n:  # the last partition is zero-padded
            piece = torch.cat([piece, piece.new_zeros(n - piece.numel())])
        return piece
    return read(())


def shard_like(source: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Cut this process's part out of ``full``, laid out like ``local_tensor(source)`` (no communication).

    Args:
        source: The parameter or buffer as the model holds it (gives the sharding layout).
        full: The full tensor (shape ``full_shape(source)``).

    Returns:
        A tensor shaped like ``local_tensor(source)`` (a view of ``full`` where possible).

    Example:
        >>> shard_like(torch.zeros(2), torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    return read_local(source, full.shape, full.__getitem__)


def barrier() -> None:
    """Wait for all processes of the default group (no-op on a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------- full copies a forward reads
def _fsdp_module_class() -> type | None:
    """``FSDPModule`` (public since torch 2.6; ``torch.distributed._composable.fsdp`` before)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6, or built without distributed
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return None
    return FSDPModule


def _zero3_status(param: torch.Tensor) -> str:
    """``"AVAILABLE"`` / ``"NOT_AVAILABLE"`` / ``"INFLIGHT"``: the name of a ZeRO-3 parameter's ``ds_status``."""
    status = getattr(param, "ds_status", None)
    return getattr(status, "name", str(status))


def before_local_write(model: nn.Module) -> None:
    """Prepare ``model`` for in-place writes into the local tensors of its parameters and buffers.

    * FSDP2: every ``FSDPModule`` of ``model`` is resharded (:meth:`FSDPModule.reshard`, local, no
      communication): its unsharded parameters, which the next forward would otherwise read again without
      all-gathering, are freed, and the module holds its sharded ``DTensor`` parameters again. The next forward
      all-gathers the shards, so it reads what was written. Call this *before* looking at the module's parameters:
      while unsharded, the module holds plain tensors, not the ``DTensor`` s the local tensors belong to.
    * ZeRO-3: refuses (``RuntimeError``) while an all-gather of a parameter is in flight (inside a forward): it
      would fill the gathered parameter with the partitions as they were before the write.
    * Plain tensors and DDP: nothing to do.

    Args:
        model: The module whose tensors are written (the tracked model, or a ``copy_to`` target).

    Raises:
        RuntimeError: If a ZeRO-3 all-gather of one of the model's parameters is in flight.

    Example:
        >>> before_local_write(nn.Linear(2, 2))  # unsharded: nothing to do
    """
    fsdp_module = _fsdp_module_class()
    if fsdp_module is not None:
        for module in model.modules():
            if isinstance(module, fsdp_module):
                module.reshard()
    inflight = [
        n for n, p in model.named_parameters() if is_zero3_param(p) and _zero3_status(p) == "INFLIGHT"
    ]
    if inflight:
        raise RuntimeError(
            f"Cannot write the EMA into the model while DeepSpeed ZeRO-3 is gathering {len(inflight)} of its "
            f"parameters ({inflight[:5]}): swap, restore or copy_to only between forward passes, not inside one"
        )


def after_local_write(sources: Sequence[torch.Tensor]) -> None:
    """Bring the full copies that a forward reads up to date with freshly written local tensors of ``sources``.

    * ZeRO-3: a parameter that is gathered (``ds_status == AVAILABLE``, e.g. a small ``ds_persist`` parameter,
      which DeepSpeed keeps gathered across steps) keeps its full tensor in ``param.data``, and the next forward
      reads that without gathering. Its full tensor is rebuilt from the written partitions of all ranks, in place
      (one ``all_gather`` per process group and dtype, over all gathered parameters at once): the state
      DeepSpeed itself leaves after an optimizer step. ZeRO++ secondary partitions (hpZ) of the written
      parameters are dropped, as DeepSpeed does after a step, so they are rebuilt from the new values. This is a
      collective: every rank of the group must call it with the same parameters (as every rank swaps).
    * FSDP2: nothing to do (:func:`before_local_write` resharded; the next forward all-gathers the shards).
    * Plain tensors and DDP: nothing to do.

    Args:
        sources: The parameters / buffers whose local tensors were written, in the same order on every rank.

    Example:
        >>> after_local_write([nn.Parameter(torch.ones(2))])  # unsharded: nothing to do
    """
    gathered: dict[tuple, list[torch.Tensor]] = {}
    for s in sources:
        if not is_zero3_param(s):
            continue
        if getattr(s, "ds_secondary_tensor", None) is not None:
            s.ds_secondary_tensor = None
        if _zero3_status(s) == "AVAILABLE":
            # gathered where the full tensor lives (the compute device, also when partitions are offloaded)
            key = (id(getattr(s, "ds_process_group", None)), s.ds_tensor.dtype, s.data.device)
            gathered.setdefault(key, []).append(s)
    for params in gathered.values():
        _regather_zero3(params)


def _regather_zero3(params: list[torch.Tensor]) -> None:
    """Rebuild ``param.data`` (the full tensor) of gathered ZeRO-3 parameters from their partitions, in place.

    All ``params`` share a process group, dtype and device. Each rank contributes the concatenation of its
    partitions (``n_i`` elements for parameter ``i``, the same on every rank); after one ``all_gather`` into a
    ``[world, sum n_i]`` buffer, parameter ``i`` is column block ``[offset_i, offset_i + n_i)`` read row by row
    (rank 0's partition first), cut to ``ds_numel`` (the last partition is zero-padded).
    """
    group, world, _, _ = _zero3_layout(params[0])
    device = params[0].data.device
    flat = torch.cat([p.ds_tensor.detach().reshape(-1).to(device) for p in params])
    per_rank = torch.empty((world, flat.numel()), dtype=flat.dtype, device=device)
    torch.distributed.all_gather(list(per_rank.unbind(0)), flat, group=group)
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.ds_tensor.numel()
            p.data.view(-1).copy_(per_rank[:, offset : offset + n].reshape(-1)[: p.ds_numel])
            offset += n
