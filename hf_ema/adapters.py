"""The EMA of a PEFT model as a PEFT adapter folder, so that ``PeftModel.from_pretrained(base, ".../ema_net")`` works.

``ema_net/model.safetensors`` holds the EMA under the tracked model's own names (for a ``peft.PeftModel``:
``base_model.model.…lora_A.default.weight``), which is what resuming needs. PEFT users load adapters instead:
``adapter_model.safetensors`` under PEFT's saved names (adapter name removed, ``modules_to_save`` copies under
their module's name) beside ``adapter_config.json``. For a ``PeftModel`` :func:`peft_adapter_files` builds those two
files from the EMA tensors with PEFT's own public API (``get_peft_model_state_dict`` and the adapter's config), and
:func:`hf_ema.io.save_ema_net` writes them into the same atomically renamed folder; like ``PeftModel.save_pretrained``
the ``"default"`` adapter goes to the folder itself and any other adapter ``name`` to ``ema_net/<name>/``.

peft is never imported here: a model can only be a ``PeftModel`` once peft has been imported by whoever built it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import distributed as dist_utils
from .io import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "is_peft_model", "peft_adapter_files"]

logger = logging.getLogger(__name__)


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (without importing peft when nothing has imported it yet).

    Example:
        >>> is_peft_model(nn.Linear(2, 2))
        False
    """
    peft = sys.modules.get("peft")
    peft_model_cls = getattr(peft, "PeftModel", None) if peft is not None else None
    return peft_model_cls is not None and isinstance(model, peft_model_cls)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):  # e.g. target_modules given as a set
        return sorted(obj, key=str)
    raise TypeError(f"adapter config value {obj!r} of type {type(obj).__name__} is not JSON-serialisable")


def _config_json(model: nn.Module, config: Any) -> str:
    """``adapter_config.json`` as ``PeftModel.save_pretrained`` writes it: the adapter's config with
    ``inference_mode=True``, the base model's name filled in when missing, and the base class for task-less
    adapters (read by ``AutoPeftModel``)."""
    out = config.to_dict()
    base = model.get_base_model()
    if out.get("base_model_name_or_path") is None:
        out["base_model_name_or_path"] = getattr(base, "name_or_path", None) or None
    out["inference_mode"] = True
    if out.get("task_type") is None:
        out["auto_mapping"] = {
            "base_model_class": type(base).__name__,
            "parent_library": type(base).__module__,
        }
    return json.dumps(out, indent=2, sort_keys=True, default=_json_default)


def peft_adapter_files(
    model: nn.Module, ema_tensors: Mapping[str, torch.Tensor]
) -> dict[str, Mapping[str, torch.Tensor] | str]:
    """The adapter files of a ``PeftModel``'s EMA, by path relative to ``ema_net``; ``{}`` for any other model.

    For each adapter ``name`` of ``model.peft_config``: ``<dir>/adapter_model.safetensors`` (tensors) and
    ``<dir>/adapter_config.json`` (JSON text), ``<dir>`` being ``""`` for ``"default"`` and ``name`` otherwise.
    Adapter tensors come from ``ema_tensors`` (the EMA under the model's state-dict names). An adapter tensor the
    EMA does not track is frozen (``trainable_only=True``), so it has not changed since the EMA started and its
    average is its current value: it is taken from the model. When such a tensor is sharded (reading it would be
    a collective on the main process alone), no adapter files are made and a warning says so;
    ``model.safetensors`` still holds the EMA.

    Args:
        model: The tracked model (unwrapped).
        ema_tensors: The EMA tensors under the model's state-dict names (full tensors, on the CPU).

    Returns:
        ``{relative path: tensors or text}``, for :func:`hf_ema.io.save_ema_net`'s ``files``.

    Example:
        >>> peft_adapter_files(nn.Linear(2, 2), {})
        {}
    """
    if not is_peft_model(model):
        return {}
    from peft import get_peft_model_state_dict

    # The EMA over the model's own tensors (references, no copies): PEFT picks the adapter's entries from it.
    merged: dict[str, torch.Tensor] = dict(model.state_dict(keep_vars=True))
    merged.update(ema_tensors)
    from_ema = {id(t) for t in ema_tensors.values()}
    files: dict[str, Mapping[str, torch.Tensor] | str] = {}
    for name, config in model.peft_config.items():
        adapter = get_peft_model_state_dict(model, state_dict=merged, adapter_name=name)
        sharded = [k for k, v in adapter.items() if id(v) not in from_ema and dist_utils.is_sharded(v)]
        if sharded:
            logger.warning(
                "EMA of a PEFT model: the frozen adapter tensor(s) %s are sharded, so ema_net gets no %s / %s "
                "(its model.safetensors still holds the EMA under the model's own names).",
                sharded[:5],
                ADAPTER_WEIGHTS_NAME,
                ADAPTER_CONFIG_NAME,
            )
            return {}
        prefix = "" if name == "default" else f"{name}/"
        files[prefix + ADAPTER_WEIGHTS_NAME] = {k: v.detach() for k, v in adapter.items()}
        files[prefix + ADAPTER_CONFIG_NAME] = _config_json(model, config)
    return files
