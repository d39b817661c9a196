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

from .args import EMAArguments
from .callback import EMATrainerCallback
from .io import EMAFileError, load_ema_net, save_ema_net
from .loading import load_model
from .schedules import EMA_DECAY_FUNCTIONS, ConstantDecay, ExpDecay, IDecayFunction, ThresholdDecay
from .state import EMAState

__all__ = [
    "EMA_DECAY_FUNCTIONS",
    "ConstantDecay",
    "EMAArguments",
    "EMAFileError",
    "EMAState",
    "EMATrainerCallback",
    "ExpDecay",
    "IDecayFunction",
    "ThresholdDecay",
    "__version__",
    "load_ema_net",
    "load_model",
    "save_ema_net",
]
