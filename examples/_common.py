"""Data and model shared by the examples: scikit-learn digits and a tiny ViT built from a config (no downloads).

``digits_datasets()`` returns a train and an eval ``torch.utils.data.Dataset`` of
``{"pixel_values": float[1, 8, 8] in [0, 1], "labels": int}`` (1797 images, a fixed 80/20 split), which both
``transformers.Trainer`` and a plain ``DataLoader`` take as they are. ``tiny_vit()`` is a
``ViTForImageClassification`` (8x8 images, 2x2 patches, hidden size 32, 2 layers; about 18k parameters).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

__all__ = ["DigitsDataset", "digits_datasets", "tiny_vit"]


class DigitsDataset(Dataset):
    """8x8 grey digit images as ``{"pixel_values", "labels"}`` items."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def digits_datasets(eval_fraction: float = 0.2, seed: int = 0) -> tuple[DigitsDataset, DigitsDataset]:
    """scikit-learn's digits (bundled with the package, nothing is downloaded), split into train and eval."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_eval = int(len(labels) * eval_fraction)
    ev, tr = order[:n_eval], order[n_eval:]
    return DigitsDataset(images[tr], labels[tr]), DigitsDataset(images[ev], labels[ev])


def tiny_vit(seed: int = 0):
    """A ``ViTForImageClassification`` for 8x8 single-channel digits, randomly initialised from a config."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    return ViTForImageClassification(config)
