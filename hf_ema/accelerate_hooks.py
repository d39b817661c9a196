"""Accelerate integration: ``accelerator.save_state(dir)`` writes ``dir/ema_net``; ``load_state(dir)`` reads it.

Several EMAs on one accelerator each save and load their own folder (``ema_net`` for the unnamed one,
``ema_net-<name>`` for ``EMAState(..., name=name)``); a second EMA with a name already taken on that accelerator
is refused when it is built, since both would write, and read back, the same folder. A ``PostHocEMA`` built with
``accelerator=`` saves and loads ``posthoc_ema`` (its profiles and state) the same way, one per accelerator.

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

from .io import ema_dirname, find_ema_dir

if TYPE_CHECKING:
    from .posthoc import PostHocEMA
    from .state import EMAState

__all__ = ["register_posthoc_with_accelerator", "register_with_accelerator"]

logger = logging.getLogger(__name__)

# accelerator -> {EMA folder name: the live EMAState saving there; "posthoc_ema": the PostHocEMA}. Weak on both
# sides: a dropped EMA frees its name, and the registry never keeps an Accelerator alive.
_EMAS_BY_ACCELERATOR: weakref.WeakKeyDictionary[Any, weakref.WeakValueDictionary[str, Any]] = (
    weakref.WeakKeyDictionary()
)


def _claim_folder(ema: EMAState, accelerator: Any) -> None:
    """Refuse a second live EMA with the same name (same folder) on ``accelerator``; else record ``ema``."""
    dirname = ema_dirname(ema.name)
    try:
        taken = _EMAS_BY_ACCELERATOR.setdefault(accelerator, weakref.WeakValueDictionary())
    except TypeError:  # an accelerator stand-in that cannot be weakly referenced: nothing to check against
        return
    other = taken.get(dirname)
    if other is not None and other is not ema:
        label = "without a name" if ema.name is None else f"named {ema.name!r}"
        raise ValueError(
            f"This accelerator already has an EMAState {label} ({other!r}); a second one would save to and load "
            f"from the same `{dirname}` folder. Give each EMA its own `name=` (e.g. name='slow'), or drop the "
            "first one (del it) before building another."
        )
    taken[dirname] = ema


def register_with_accelerator(ema: EMAState, accelerator: Any) -> tuple[Any, Any]:
    """Make ``accelerator.save_state`` / ``load_state`` save and restore ``ema`` as ``<dir>/ema_net`` (a named EMA:
    ``<dir>/ema_net-<name>``).

    Called by ``EMAState(model, accelerator=accelerator)``; the hooks hold the EMA weakly.

    Args:
        ema: The EMA to save and load.
        accelerator: An ``accelerate.Accelerator``.

    Returns:
        The two removable hook handles (save, load).

    Raises:
        ValueError: If another live EMA with the same name is registered with ``accelerator``.

    Example:
        >>> from accelerate import Accelerator  # doctest: +SKIP
        >>> ema = EMAState(model, accelerator=accelerator)  # registers itself  # doctest: +SKIP
        >>> accelerator.save_state("ckpt")  # writes ckpt/ema_net/  # doctest: +SKIP
    """
    _claim_folder(ema, accelerator)
    ref = weakref.ref(ema)

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        obj = ref()
        if obj is not None:
            # Accelerate runs this hook on every process that calls save_state: the sharded gather inside save()
            # needs them all, and only the main process writes; then wait for that write so that no rank reads a
            # half-made checkpoint. An unsharded EMA needs no other process: scripts that call save_state on the
            # main process only (diffusers' do, under DDP) must not wait in a barrier the others never reach.
            sharded = obj.is_sharded
            obj.save(output_dir)
            if sharded and hasattr(accelerator, "wait_for_everyone"):
                accelerator.wait_for_everyone()

    def load_hook(models: list, input_dir: str) -> None:
        obj = ref()
        if obj is None:
            return
        dirname = ema_dirname(obj.name)
        ema_dir = os.path.join(input_dir, dirname)
        # An incomplete ema_net is loaded so that its error is raised; a save that a crash interrupted after its
        # data was complete is finished on disk by find_ema_dir.
        if os.path.isdir(ema_dir) or find_ema_dir(ema_dir) is not None:
            obj.load(input_dir)
        else:
            logger.warning(
                "%s has no %s folder: the EMA keeps its current weights (a copy of the model at its creation).",
                input_dir,
                dirname,
            )

    return accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(
        load_hook
    )


def register_posthoc_with_accelerator(posthoc: PostHocEMA, accelerator: Any) -> tuple[Any, Any]:
    """Make ``accelerator.save_state(dir)`` write ``dir/posthoc_ema/`` (every profile and the post-hoc state, after
    the pending snapshots are on disk) and ``load_state(dir)`` restore it (and cut the run folder's manifest back
    to that step: :meth:`hf_ema.PostHocEMA.load`).

    Called by ``PostHocEMA(model, run_dir, accelerator=accelerator)``; the hooks hold it weakly. ``load_state`` of
    a folder without ``posthoc_ema/`` raises :class:`hf_ema.posthoc.PostHocError`: the profiles average the whole
    run and cannot be rebuilt from the model's weights alone.

    Args:
        posthoc: The post-hoc EMA to save and load.
        accelerator: An ``accelerate.Accelerator``.

    Returns:
        The two removable hook handles (save, load).

    Raises:
        ValueError: If another live PostHocEMA is registered with ``accelerator`` (both would use
            ``posthoc_ema/``).

    Example:
        >>> ph = PostHocEMA(model, "runs/exp1/phema", accelerator=accelerator)  # doctest: +SKIP
        >>> accelerator.save_state("ckpt")  # ckpt/posthoc_ema/  # doctest: +SKIP
    """
    from .posthoc import STATE_DIRNAME, PostHocError

    try:
        taken = _EMAS_BY_ACCELERATOR.setdefault(accelerator, weakref.WeakValueDictionary())
    except TypeError:  # an accelerator stand-in that cannot be weakly referenced
        taken = None
    if taken is not None:
        other = taken.get(STATE_DIRNAME)
        if other is not None and other is not posthoc:
            raise ValueError(
                f"This accelerator already has a PostHocEMA ({other!r}); a second one would save to and load from "
                f"the same `{STATE_DIRNAME}` folder. One PostHocEMA tracks any number of profiles "
                "(sigma_rels=(...)); or drop the first one (del it) before building another."
            )
        taken[STATE_DIRNAME] = posthoc
    ref = weakref.ref(posthoc)

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        obj = ref()
        if obj is not None:
            obj.save(output_dir)  # every rank: sharded profiles are gathered; the main process writes
            if hasattr(accelerator, "wait_for_everyone"):
                accelerator.wait_for_everyone()

    def load_hook(models: list, input_dir: str) -> None:
        obj = ref()
        if obj is None:
            return
        if not os.path.isdir(os.path.join(input_dir, STATE_DIRNAME)):
            raise PostHocError(
                f"accelerator.load_state({input_dir!r}): no `{STATE_DIRNAME}` folder, but a PostHocEMA is "
                "registered with this accelerator. Its profiles average the whole run and cannot be rebuilt from "
                "the model's weights: load a state saved while the PostHocEMA existed, or build the PostHocEMA "
                "(with a new run_dir) after load_state."
            )
        obj.load(input_dir)

    return accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(
        load_hook
    )
