"""Accelerate integration: ``accelerator.save_state(dir)`` writes ``dir/ema_net``; ``load_state(dir)`` reads it.

We use Accelerate's ``register_save_state_pre_hook`` / ``register_load_state_pre_hook`` rather than
``register_for_checkpointing``: the latter stores objects with ``torch.save`` and restores them with
``torch.load`` (pickle), while the hooks let the EMA use its own files (safetensors + JSON), which load without
unpickling and are the same ``ema_net`` folder that the Trainer callback writes and ``load_model`` reads.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import TYPE_CHECKING, Any

from .io import EMA_DIRNAME, find_ema_dir

if TYPE_CHECKING:
    from .state import EMAState

__all__ = ["register_with_accelerator"]

logger = logging.getLogger(__name__)


def register_with_accelerator(ema: EMAState, accelerator: Any) -> tuple[Any, Any]:
    """Make ``accelerator.save_state`` / ``load_state`` save and restore ``ema`` as ``<dir>/ema_net``.

    Called by ``EMAState(model, accelerator=accelerator)``; the hooks hold the EMA weakly.

    Args:
        ema: The EMA to save and load.
        accelerator: An ``accelerate.Accelerator``.

    Returns:
        The two removable hook handles (save, load).

    Example:
        >>> from accelerate import Accelerator  # doctest: +SKIP
        >>> ema = EMAState(model, accelerator=accelerator)  # registers itself  # doctest: +SKIP
        >>> accelerator.save_state("ckpt")  # writes ckpt/ema_net/  # doctest: +SKIP
    """
    ref = weakref.ref(ema)

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        obj = ref()
        if obj is not None:
            # Accelerate runs this hook on every process: the sharded gather inside save() needs them all, and
            # only the main process writes. Wait for that write so that no rank reads a half-made checkpoint.
            obj.save(output_dir)
            if hasattr(accelerator, "wait_for_everyone"):
                accelerator.wait_for_everyone()

    def load_hook(models: list, input_dir: str) -> None:
        obj = ref()
        if obj is None:
            return
        ema_dir = os.path.join(input_dir, EMA_DIRNAME)
        # An incomplete ema_net is loaded so that its error is raised; a save that a crash interrupted after its
        # data was complete is finished on disk by find_ema_dir.
        if os.path.isdir(ema_dir) or find_ema_dir(ema_dir) is not None:
            obj.load(input_dir)
        else:
            logger.warning(
                "%s has no %s folder: the EMA keeps its current weights (a copy of the model at its creation).",
                input_dir,
                EMA_DIRNAME,
            )

    return accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(
        load_hook
    )
