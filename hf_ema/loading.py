"""Load a model from a checkpoint, preferring its EMA weights (the counterpart of SuperGradients' ``models.get``)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    CONFIG_NAME,
    EMA_DIRNAME,
    WEIGHTS_NAME,
    EMAFileError,
    ema_dirname,
    find_ema_dir,
    load_ema_meta,
    load_ema_net,
    open_ema_net,
    summarize_names,
)

__all__ = ["has_ema", "load_model"]

logger = logging.getLogger(__name__)

# What an ema_net's config must share with its checkpoint's config to be the EMA of the same model.
_SAME_MODEL_KEYS = ("model_type", "architectures")
_SAME_ADAPTER_KEYS = ("peft_type", "task_type")
# PeftModel's prefix over the base model's names (LoRA and the other non-prompt-learning tuners).
_PEFT_PREFIX = "base_model.model."


def has_ema(path: str | os.PathLike, name: str | None = None) -> bool:
    """Whether ``path`` (a checkpoint folder) holds a complete ``ema_net`` folder written by hf_ema (or the
    previous one left by an interrupted save, see :func:`hf_ema.io.find_ema_dir`); with ``name``, the named EMA's
    ``ema_net-<name>`` folder."""
    return find_ema_dir(Path(path) / ema_dirname(name)) is not None


def load_model(
    model_class: Any,
    path: str | os.PathLike,
    prefer_ema: bool = True,
    *,
    base_model: str | os.PathLike | nn.Module | None = None,
    ema: str | None = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load a model from ``path``, with the EMA weights of ``path/ema_net`` when present and ``prefer_ema``.

    * ``ema_net`` holding a complete model with its ``config.json``: ``model_class.from_pretrained(path/ema_net)``.
    * ``ema_net`` holding only some tensors (e.g. ``trainable_only=True``): the regular model is loaded from
      ``path`` and the EMA tensors are put on top of it by name.
    * A PEFT checkpoint (``adapter_config.json`` in ``ema_net`` or in ``path``): the base model is loaded with
      ``model_class.from_pretrained(base)``, ``base`` being ``base_model`` or the adapter config's
      ``base_model_name_or_path``, and the result is ``peft.PeftModel.from_pretrained(base, path/ema_net)``: the EMA
      adapter (``path`` itself with ``prefer_ema=False`` or without ``ema_net``; an ``ema_net`` written before
      hf_ema wrote adapter files has its tensors put on top of the checkpoint's adapter by name).
    * no ``ema_net`` (or ``prefer_ema=False``): ``model_class.from_pretrained(path)``.

    Before loading an ``ema_net`` it is checked against the checkpoint it sits in: the configs' ``model_type`` and
    ``architectures`` (adapters: ``peft_type`` and ``task_type``) and the shapes of the tensors both weight files
    hold (read from the safetensors headers), so that an ``ema_net`` of another model or size is an error, not a
    quietly wrong model. ``model_class`` may also be an ``nn.Module`` instance (e.g. a plain PyTorch model): its
    weights are then loaded in place from ``ema_net`` or, without one, from ``path/model.safetensors``. Which
    weights were loaded is logged at INFO level.

    Args:
        model_class: A class with ``from_pretrained`` (e.g. ``AutoModelForSequenceClassification``; for a PEFT
            checkpoint, the base model's class) or a module.
        path: A local checkpoint folder (e.g. ``output/checkpoint-500`` or the output of ``trainer.save_model``).
        prefer_ema: Load the EMA weights when the checkpoint has them.
        base_model: PEFT checkpoints only: the base model's path or Hub id (default: the adapter config's
            ``base_model_name_or_path``), or the base model itself (it is then modified in place).
        ema: Name of the EMA to load when the checkpoint holds several (``EMATrainerCallback(name=...)``): its
            ``ema_net-<name>`` folder, which must then exist. ``None``: the unnamed ``ema_net``.
        **from_pretrained_kwargs: Passed to ``from_pretrained`` (of the base model, for a PEFT checkpoint).

    Returns:
        The loaded model (a ``peft.PeftModel`` for a PEFT checkpoint).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The ``ema_net`` is not the EMA of the checkpoint's model (other architecture or sizes), or
            its tensors do not fit the loaded model; the message names the folders and the first few tensors.
        EMAFileError: The ``ema_net`` folder is incomplete or corrupt.

    Example:
        >>> from transformers import AutoModelForSequenceClassification  # doctest: +SKIP
        >>> model = load_model(AutoModelForSequenceClassification, "out/checkpoint-500")  # doctest: +SKIP
    """
    path = Path(path)
    dirname = ema_dirname(ema)
    if ema is not None and not prefer_ema:
        raise ValueError(
            f"`ema={ema!r}` asks for an EMA's weights but `prefer_ema=False` asks for the regular ones"
        )
    if not path.exists():
        raise FileNotFoundError(
            f"load_model: {str(path)!r} does not exist (it reads a local checkpoint folder; for a model on the "
            "Hub, download it first, e.g. with huggingface_hub.snapshot_download)"
        )
    # Which ema_net to read, if any. An ema_net folder that exists but is incomplete is an error (raised by
    # load_ema_net, naming the path), never a quiet fallback to the training weights. So is a named EMA
    # (`ema="..."`) that is not there.
    found = find_ema_dir(path / dirname) if prefer_ema else None
    use_ema = prefer_ema and (found is not None or (path / dirname).is_dir() or ema is not None)
    ema_dir = (found or path / dirname) if use_ema else None

    if isinstance(model_class, nn.Module):
        return _load_into_module(model_class, path, ema_dir)
    if not hasattr(model_class, "from_pretrained"):
        raise TypeError(
            f"`model_class` must have a `from_pretrained` method or be an nn.Module instance, got {model_class!r}"
        )
    if _is_peft_checkpoint(path, ema_dir):
        return _load_peft(model_class, path, ema_dir, base_model, from_pretrained_kwargs)
    if base_model is not None:
        raise ValueError(
            f"`base_model` is for PEFT checkpoints, but {str(path)!r} has no {ADAPTER_CONFIG_NAME} (nor its ema_net)"
        )
    if ema_dir is not None:
        # Check the JSON and the weights' header before from_pretrained reads the folder (weights read once).
        with open_ema_net(ema_dir) as reader:
            _check_same_model(ema_dir, path, CONFIG_NAME, _SAME_MODEL_KEYS, reader.shapes)
            complete = (ema_dir / CONFIG_NAME).is_file() and not reader.meta.get("trainable_only", False)
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


# ---------------------------------------------------------------------------------------------------- PEFT
def _is_peft_checkpoint(path: Path, ema_dir: Path | None) -> bool:
    """A PEFT adapter in the ``ema_net`` to load, or in the checkpoint itself."""
    return (ema_dir is not None and (ema_dir / ADAPTER_CONFIG_NAME).is_file()) or (
        path / ADAPTER_CONFIG_NAME
    ).is_file()


def _load_peft(
    model_class: Any,
    path: Path,
    ema_dir: Path | None,
    base_model: str | os.PathLike | nn.Module | None,
    kwargs: dict[str, Any],
) -> nn.Module:
    """A PEFT checkpoint: the base model, then ``PeftModel.from_pretrained`` of the EMA adapter (or the regular
    one)."""
    try:
        from peft import PeftModel
    except ImportError as e:
        raise ImportError(
            f"{str(path)!r} holds a PEFT adapter ({ADAPTER_CONFIG_NAME}); loading it needs `peft` (pip install peft)"
        ) from e
    overlay: dict[str, torch.Tensor] = {}
    if ema_dir is not None and (ema_dir / ADAPTER_CONFIG_NAME).is_file():
        adapter_dir = ema_dir
        load_ema_meta(ema_dir)  # complete, as any ema_net must be
        ema_shapes = _header_shapes(ema_dir, ADAPTER_WEIGHTS_NAME)
        _check_same_model(ema_dir, path, ADAPTER_CONFIG_NAME, _SAME_ADAPTER_KEYS, ema_shapes)
        what = f"EMA adapter from {ema_dir}"
    elif ema_dir is not None:
        # An ema_net without adapter files (written before hf_ema wrote them): the checkpoint's own adapter, then
        # the EMA tensors on top of it by the PeftModel's names.
        adapter_dir = path
        overlay, _ = load_ema_net(ema_dir)
        what = f"regular adapter from {path}, then the {len(overlay)} EMA tensor(s) of {ema_dir}"
    else:
        adapter_dir = path
        what = f"regular adapter from {path}"
    base = _load_base(model_class, adapter_dir, base_model, kwargs)
    logger.info("Loading the %s", what)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    if overlay:
        _overlay(model, _to_peft_names(model, overlay), ema_dir)
    return model


def _load_base(
    model_class: Any,
    adapter_dir: Path,
    base_model: str | os.PathLike | nn.Module | None,
    kwargs: dict[str, Any],
) -> nn.Module:
    if isinstance(base_model, nn.Module):
        if kwargs:
            raise ValueError(
                f"from_pretrained arguments {sorted(kwargs)} are not used when `base_model` is a module instance"
            )
        return base_model
    name = base_model
    if name is None:
        name = _read_json(adapter_dir / ADAPTER_CONFIG_NAME).get("base_model_name_or_path")
        if not name:
            raise ValueError(
                f"{str(adapter_dir / ADAPTER_CONFIG_NAME)!r} names no base model (its base_model_name_or_path is "
                "empty, e.g. the base was built from a config): pass base_model=<path or Hub id of the base model> "
                "or base_model=<the base model>"
            )
    logger.info("Loading the base model from %s", name)
    return model_class.from_pretrained(str(name), **kwargs)


def _to_peft_names(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EMA tensor names as the PeftModel has them: names of a model with adapters added in place (transformers'
    ``add_adapter``) lack its ``base_model.model.`` prefix."""
    own = model.state_dict().keys()
    return {
        _PEFT_PREFIX + name if name not in own and _PEFT_PREFIX + name in own else name: t
        for name, t in tensors.items()
    }


# ---------------------------------------------------------------------------------------------------- checks
def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EMAFileError(f"Cannot read {str(file)!r} as JSON ({e})") from e
    if not isinstance(data, dict):
        raise EMAFileError(f"{str(file)!r} does not hold a JSON object")
    return data


def _header_shapes(folder: Path, weights_name: str) -> dict[str, tuple[int, ...]] | None:
    """Shape of every tensor in ``folder``'s safetensors weights (one file, or the shards of its
    ``.index.json``), from the headers only; ``None`` when there is no such file (e.g. only ``.bin`` weights)."""
    from safetensors import SafetensorError, safe_open

    single = folder / weights_name
    index = folder / f"{weights_name}.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map") or {}
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise EMAFileError(f"Cannot read the safetensors header of {str(file)!r} ({e})") from e
    return shapes


def _check_same_model(
    ema_dir: Path,
    path: Path,
    config_name: str,
    keys: Iterable[str],
    ema_shapes: Mapping[str, tuple[int, ...]] | None,
) -> None:
    """Raise unless ``ema_dir`` may be the EMA of the model saved in ``path``: the same ``keys`` in both configs,
    and the same shape for every tensor name both weight files hold. What one of them lacks is not compared."""
    problems = []
    ema_cfg, ckpt_cfg = ema_dir / config_name, path / config_name
    if ema_cfg.is_file() and ckpt_cfg.is_file():
        ema_json, ckpt_json = _read_json(ema_cfg), _read_json(ckpt_cfg)
        for key in keys:  # a config built in code has no `architectures` until save_pretrained: not compared
            if None not in (ema_json.get(key), ckpt_json.get(key)) and ema_json.get(key) != ckpt_json.get(
                key
            ):
                problems.append(
                    f"{key} {ema_json.get(key)!r} in ema_net vs {ckpt_json.get(key)!r} in the checkpoint"
                )
    weights_name = ADAPTER_WEIGHTS_NAME if config_name == ADAPTER_CONFIG_NAME else WEIGHTS_NAME
    ckpt_shapes = _header_shapes(path, weights_name)
    if ema_shapes and ckpt_shapes:
        common = sorted(set(ema_shapes) & set(ckpt_shapes))
        if not common:
            problems.append(
                f"no tensor name in common (ema_net: {summarize_names(sorted(ema_shapes), 3)}; the checkpoint: "
                f"{summarize_names(sorted(ckpt_shapes), 3)})"
            )
        wrong = [n for n in common if tuple(ema_shapes[n]) != tuple(ckpt_shapes[n])]
        if wrong:
            shown = "; ".join(f"{n}: {tuple(ema_shapes[n])} vs {tuple(ckpt_shapes[n])}" for n in wrong[:3])
            more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
            problems.append(
                f"{len(wrong)} tensor(s) of other shapes in ema_net than in the checkpoint: {shown}{more}"
            )
    if problems:
        raise ValueError(
            f"{str(ema_dir)!r} is not the EMA of the model in {str(path)!r} (another architecture or size?): "
            + "; ".join(problems)
            + ". Load the regular weights with prefer_ema=False, or put the right ema_net there."
        )


def _overlay(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: Path) -> None:
    own = model.state_dict()
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ValueError(f"EMA tensors in {str(where)!r} are not in the model: {summarize_names(unknown)}")
    bad = [n for n, v in tensors.items() if v.shape != own[n].shape]
    if bad:
        shown = "; ".join(f"{n}: {tuple(tensors[n].shape)} vs {tuple(own[n].shape)}" for n in bad[:3])
        more = f" and {len(bad) - 3} more ({len(bad)} in all)" if len(bad) > 3 else ""
        raise ValueError(f"EMA tensors in {str(where)!r} have other shapes than the model's: {shown}{more}")
    model.load_state_dict(dict(tensors), strict=False)


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
