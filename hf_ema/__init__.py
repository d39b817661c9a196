"""hf_ema: an Exponential Moving Average of model weights for Hugging Face Trainer and Accelerate loops.

Example:
    >>> import torch
    >>> from hf_ema import EMAState
    >>> model = torch.nn.Linear(4, 2)
    >>> ema = EMAState(model, decay=0.999, decay_type="threshold")
    >>> _ = ema.update()  # after every optimizer step
    >>> with ema.average_parameters():
    ...     pass  # evaluate with the EMA weights
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from .bema import BEMADecay  # registers decay_type="bema"
from .io import EMAFileError, load_ema_net, save_ema_net
from .loading import load_model
from .power import PowerDecay  # registers decay_type="power"
from .schedules import (
    EMA_DECAY_FUNCTIONS,
    ConstantDecay,
    ExpDecay,
    IDecayFunction,
    ThresholdDecay,
    WarmupDecay,
)
from .state import EMAState

if TYPE_CHECKING:
    from .args import EMAArguments
    from .callback import EMATrainerCallback
    from .posthoc import PostHocEMA, synthesize
    from .posthoc_callback import PostHocEMACallback

# The Trainer integration imports transformers (seconds): load it only when asked for, so that Accelerate-only
# and plain PyTorch users do not pay for it.
_LAZY = {
    "EMAArguments": ".args",
    "EMATrainerCallback": ".callback",
    "PostHocEMA": ".posthoc",
    "PostHocEMACallback": ".posthoc_callback",
    "synthesize": ".posthoc",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EMA_DECAY_FUNCTIONS",
    "BEMADecay",
    "ConstantDecay",
    "EMAArguments",
    "EMAFileError",
    "EMAState",
    "EMATrainerCallback",
    "ExpDecay",
    "IDecayFunction",
    "PostHocEMA",
    "PostHocEMACallback",
    "PowerDecay",
    "ThresholdDecay",
    "WarmupDecay",
    "__version__",
    "load_ema_net",
    "load_model",
    "save_ema_net",
    "synthesize",
]
