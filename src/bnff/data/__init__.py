"""Datasets for ``bnff train``: scikit-learn's digits (embedded default), CIFAR-10 python batches,
and image folders. Each loader returns float32 image tensors (N, 3, S, S) normalized per channel
and int64 labels, split into train and test."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bnff.names import UsageError


class DataError(UsageError):
    """A data file is missing or unreadable; the message names the file."""


@dataclass
class Dataset:
    """Train/test tensors. Images (N, 3, S, S) float32, labels (N,) int64."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]


def normalize(train_x: Tensor, test_x: Tensor) -> tuple[Tensor, Tensor]:
    """Standardize both splits with the train split's per-channel mean and std."""
    mean = train_x.mean((0, 2, 3), keepdim=True)
    std = train_x.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train_x - mean) / std, (test_x - mean) / std


def load(spec: str, image_size: int = 32, seed: int = 0) -> Dataset:
    """Load ``spec``: "digits", "cifar10:PATH" or "folder:PATH".

    Raises:
        ValueError: unknown spec.
        DataError: a file is missing or corrupt (named in the message).
    """
    kind, _, path = spec.partition(":")
    if kind == "digits":
        from bnff.data.digits import load_digits
        return load_digits(image_size, seed)
    if kind == "cifar10" and path:
        from bnff.data.cifar10 import load_cifar10
        return load_cifar10(Path(path), image_size)
    if kind == "folder" and path:
        from bnff.data.folder import load_folder
        return load_folder(Path(path), image_size, seed)
    raise ValueError(f"unknown --data {spec!r}; use 'digits', 'cifar10:PATH' or 'folder:PATH'")
