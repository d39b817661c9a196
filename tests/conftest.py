"""Test settings shared by the whole suite: offline Hugging Face Hub, repo root importable, small thread count."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a small shared CPU the thread pool's spinning made
# one forward/backward of a 100-parameter net take ~70 ms instead of ~0.5 ms.
torch.set_num_threads(1)
