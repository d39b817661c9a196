"""Independent reference for the EMA contract (plain Python + NumPy, float64).

Nothing here imports ``hf_ema``: the formulas are written from the specification in issue 2 so that tests
compare the implementation against an independent computation, never against itself.

Conventions (steps are 1-based, as SuperGradients' trainer counts them: ``step`` = optimizer steps done,
including the one that just finished; issue 8):

* ``history[0]`` holds the model's weights when the EMA was created; ``history[k]`` (``k >= 1``) holds the
  weights right after optimizer step ``k``, i.e. the values the ``k``-th ``update()`` sees.
* ``decays[k - 1]`` is the schedule's value ``d`` for optimizer step ``k`` (``decays_for`` returns steps
  ``1 .. num_steps``).
* With ``update_every = N`` the average happens at steps ``k`` with ``k % N == 0`` only, using ``d**N``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "constant_decay",
    "decays_for",
    "drive",
    "exp_decay",
    "float_params",
    "perturb_",
    "record",
    "reference_ema",
    "threshold_decay",
    "tiny_bert",
    "tiny_bert_config",
    "tiny_bn_net",
    "tiny_mlp",
    "to_numpy",
]


def constant_decay(decay: float, step: int, total_steps: int | None = None) -> float:
    """``constant``: the decay itself."""
    return float(decay)


def threshold_decay(decay: float, step: int, total_steps: int | None = None) -> float:
    """``threshold``: ``min(decay, (1 + step) / (10 + step))``."""
    return min(float(decay), (1.0 + step) / (10.0 + step))


def exp_decay(decay: float, step: int, total_steps: int, beta: float = 15.0) -> float:
    """``exp``: ``decay * (1 - exp(-beta * step / total_steps))``."""
    return float(decay) * (1.0 - math.exp(-beta * step / total_steps))


_SCHEDULES = {"constant": constant_decay, "threshold": threshold_decay, "exp": exp_decay}


def decays_for(
    decay_type: str, decay: float, num_steps: int, total_steps: int | None = None, **kwargs: float
) -> list[float]:
    """The reference decay for optimizer steps ``1 .. num_steps`` (1-based; element ``k - 1`` is step ``k``)."""
    fn = _SCHEDULES[decay_type]
    return [fn(decay, step, total_steps, **kwargs) for step in range(1, num_steps + 1)]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A float64 NumPy copy of a tensor (any float dtype, bf16 included) or an int64 copy of an int tensor."""
    t = t.detach().cpu()
    if t.is_floating_point():
        return t.to(torch.float64).numpy().copy()
    return t.to(torch.int64).numpy().copy()


def record(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Snapshot ``(name, tensor)`` pairs (e.g. ``model.state_dict().items()``) as NumPy arrays."""
    return {name: to_numpy(t) for name, t in named}


def reference_ema(
    history: Sequence[Mapping[str, np.ndarray]],
    decays_per_step: Sequence[float],
    update_every: int = 1,
    names: Iterable[str] | None = None,
    copy_names: Iterable[str] = (),
) -> dict[str, np.ndarray]:
    """EMA over a recorded parameter history, computed in float64 with plain NumPy.

    Args:
        history: ``len(decays_per_step) + 1`` snapshots; ``history[0]`` is the state at EMA creation.
        decays_per_step: ``d`` for each optimizer step, in order (element ``k - 1`` for step ``k``).
        update_every: average on every ``update_every``-th call only, with ``d ** update_every``.
        names: names to average (default: all names of ``history[0]``).
        copy_names: names that are copied from the live values on each averaging call instead of averaged.

    Returns:
        ``{name: float64 array}``: the expected EMA after the last step.
    """
    if len(history) != len(decays_per_step) + 1:
        raise ValueError(f"need {len(decays_per_step) + 1} snapshots, got {len(history)}")
    names = list(history[0]) if names is None else list(names)
    copy_names = set(copy_names)
    ema = {n: np.array(history[0][n], dtype=np.float64, copy=True) for n in names}
    n_every = int(update_every)
    for k, d in enumerate(decays_per_step, start=1):  # k: the 1-based optimizer step
        if k % n_every != 0:
            continue
        live = history[k]
        dn = float(d) ** n_every
        for n in names:
            if n in copy_names:
                ema[n] = np.array(live[n], dtype=np.float64, copy=True)
            else:
                ema[n] = ema[n] * dn + np.asarray(live[n], dtype=np.float64) * (1.0 - dn)
    return ema


# ----------------------------------------------------------------------------------------------------------
# Small helpers shared by the test files: tiny models and a deterministic "training" driver.
# ----------------------------------------------------------------------------------------------------------


def tiny_mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A 2-layer MLP (4 -> 16 -> 3), parameters only, in ``dtype``."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def tiny_bn_net(seed: int = 0) -> torch.nn.Module:
    """Linear -> BatchNorm1d -> ReLU -> Linear: float buffers plus the int64 ``num_batches_tracked``."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
    )


def tiny_bert_config(**overrides):
    """A BertConfig with hidden size 16, one layer: builds in milliseconds, nothing downloaded."""
    from transformers import BertConfig

    kwargs = dict(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        type_vocab_size=2,
        num_labels=2,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def tiny_bert(seed: int = 0, **overrides):
    """A tiny ``BertForSequenceClassification`` built from a config (random weights)."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(**overrides)).eval()


def float_params(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Snapshot of the model's named parameters as float64 NumPy arrays."""
    return record(model.named_parameters())


@torch.no_grad()
def perturb_(model: torch.nn.Module, gen: torch.Generator, scale: float = 0.1) -> None:
    """Move every trainable parameter in place, like an optimizer step would (storage is never replaced)."""
    for p in model.parameters():
        if p.requires_grad:
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale
            p.add_(noise.to(p.dtype))


def drive(ema, model: torch.nn.Module, num_steps: int, seed: int = 0, scale: float = 0.1):
    """Run ``num_steps`` fake optimizer steps, calling ``ema.update()`` after each one.

    Returns ``(history, returned)``: ``history`` as :func:`reference_ema` expects it (parameters only, the first
    snapshot taken now, so call this right after creating the EMA or pass its own first snapshot), and the
    values ``update()`` returned.
    """
    gen = torch.Generator().manual_seed(seed)
    history = [float_params(model)]
    returned = []
    for _ in range(num_steps):
        perturb_(model, gen, scale)
        returned.append(ema.update())
        history.append(float_params(model))
    return history, returned
