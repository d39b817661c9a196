"""Load a model from a checkpoint, preferring its EMA weights (the counterpart of SuperGradients' ``models.get``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from .io import CONFIG_NAME, EMA_DIRNAME, WEIGHTS_NAME, find_ema_dir, load_ema_net, open_ema_net

__all__ = ["has_ema", "load_model"]

logger = logging.getLogger(__name__)


def has_ema(path: str | os.PathLike) -> bool:
    """Whether ``path`` (a checkpoint folder) holds a complete ``ema_net`` folder written by hf_ema (or the
    previous one left by an interrupted save, see :func:`hf_ema.io.find_ema_dir`)."""
    return find_ema_dir(Path(path) / EMA_DIRNAME) is not None


def load_model(
    model_class: Any,
    path: str | os.PathLike,
    prefer_ema: bool = True,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load a model from ``path``, with the EMA weights of ``path/ema_net`` when present and ``prefer_ema``.

    * ``ema_net`` holding a complete model with its ``config.json``: ``model_class.from_pretrained(path/ema_net)``.
    * ``ema_net`` holding only some tensors (e.g. ``trainable_only=True`` for LoRA adapters): the regular model
      is loaded from ``path`` and the EMA tensors are put on top of it by name.
    * no ``ema_net`` (or ``prefer_ema=False``): ``model_class.from_pretrained(path)``.

    ``model_class`` may also be an ``nn.Module`` instance (e.g. a plain PyTorch model): its weights are then
    loaded in place from ``ema_net`` or, without one, from ``path/model.safetensors``. Which weights were loaded
    is logged at INFO level.

    Args:
        model_class: A class with ``from_pretrained`` (e.g. ``AutoModelForSequenceClassification``) or a module.
        path: A checkpoint folder (e.g. ``output/checkpoint-500`` or the output of ``trainer.save_model``).
        prefer_ema: Load the EMA weights when the checkpoint has them.
        **from_pretrained_kwargs: Passed to ``from_pretrained``.

    Returns:
        The loaded model.

    Example:
        >>> from transformers import AutoModelForSequenceClassification  # doctest: +SKIP
        >>> model = load_model(AutoModelForSequenceClassification, "out/checkpoint-500")  # doctest: +SKIP
    """
    path = Path(path)
    # An ema_net folder that exists but is incomplete is an error (raised by load_ema_net, naming the path),
    # never a quiet fallback to the training weights.
    found = find_ema_dir(path / EMA_DIRNAME) if prefer_ema else None
    use_ema = prefer_ema and (found is not None or (path / EMA_DIRNAME).is_dir())
    ema_dir = found or path / EMA_DIRNAME
    if isinstance(model_class, nn.Module):
        return _load_into_module(model_class, path, ema_dir if use_ema else None)
    if not hasattr(model_class, "from_pretrained"):
        raise TypeError(
            f"`model_class` must have a `from_pretrained` method or be an nn.Module instance, got {model_class!r}"
        )
    if use_ema:
        # Check the JSON and the weights' header before from_pretrained reads the folder (weights read once).
        with open_ema_net(ema_dir) as reader:
            meta = reader.meta
            complete = (ema_dir / CONFIG_NAME).is_file() and not meta.get("trainable_only", False)
            tensors = {} if complete else {name: reader.read(name) for name in reader.shapes}
        if complete:
            logger.info("Loading EMA weights from %s", ema_dir)
            return model_class.from_pretrained(str(ema_dir), **from_pretrained_kwargs)
        logger.info(
            "Loading regular weights from %s, then the %d EMA tensor(s) of %s", path, len(tensors), ema_dir
        )
        model = model_class.from_pretrained(str(path), **from_pretrained_kwargs)
        _overlay(model, tensors, ema_dir)
        return model
    logger.info("Loading regular weights from %s%s", path, "" if prefer_ema else " (prefer_ema=False)")
    return model_class.from_pretrained(str(path), **from_pretrained_kwargs)


def _overlay(model: nn.Module, tensors: dict, where: Path) -> None:
    own = model.state_dict()
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ValueError(f"EMA tensors in {str(where)!r} are not in the model: {unknown[:20]}")
    bad = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in tensors.items()
        if v.shape != own[k].shape
    ]
    if bad:
        raise ValueError(f"EMA tensors in {str(where)!r} have other shapes than the model's: {bad[:20]}")
    model.load_state_dict(tensors, strict=False)


def _load_into_module(model: nn.Module, path: Path, ema_dir: Path | None) -> nn.Module:
    from safetensors.torch import load_file

    if ema_dir is not None:
        tensors, _ = load_ema_net(ema_dir)
        logger.info("Loading EMA weights from %s", ema_dir)
        _overlay(model, tensors, ema_dir)
        return model
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"No {WEIGHTS_NAME} (and no usable {EMA_DIRNAME}) in {str(path)!r}")
    logger.info("Loading regular weights from %s", weights)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model
