"""Datasets for ``bnff train``: scikit-learn's digits (embedded default) and CIFAR-10 python batches, held
in memory as normalized float32 tensors, and image folders, decoded as they are read
(``bnff.data.folder``). Each loader returns a ``Dataset`` with a train and a test split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset, TensorDataset

from bnff.names import UsageError


class DataError(UsageError):
    """A data file is missing or unreadable; the message names the file."""


@dataclass
class Dataset:
    """A training split and a test split, each a map-style ``torch.utils.data.Dataset``.

    In memory (digits, CIFAR-10; ``in_memory``): items ``(image, label)``, images (3, S, S) float32
    normalized, labels int64; augmentation runs on whole mini-batches in the training loop. Streamed
    (image folders, ``bnff.data.folder``): items ``(image, label, path)`` decoded, augmented and
    normalized one by one in the loader's workers, keyed by ``(index, epoch)``; batched by
    ``folder.collate``.

    Attributes:
        name: the data set's name.
        classes: class names, in label order.
        train, test: the splits.
        image_size: S.
        streamed: the folder form (above).
        normalization: (mean, std) per channel, for a streamed set (saved in checkpoints).
    """

    name: str
    classes: list[str]
    train: TorchDataset
    test: TorchDataset
    image_size: int
    streamed: bool = False
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @classmethod
    def in_memory(cls, name: str, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                  classes: list[str]) -> "Dataset":
        """Tensors (N, 3, S, S) float32 and (N,) int64 per split."""
        return cls(name, classes, TensorDataset(train_x, train_y), TensorDataset(test_x, test_y), train_x.shape[-1])


def normalize(train_x: Tensor, test_x: Tensor) -> tuple[Tensor, Tensor]:
    """Standardize both splits with the train split's per-channel mean and std."""
    mean = train_x.mean((0, 2, 3), keepdim=True)
    std = train_x.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train_x - mean) / std, (test_x - mean) / std


def load(spec: str, image_size: int = 32, seed: int = 0, normalization: str = "sampled") -> Dataset:
    """Load ``spec``: "digits", "cifar10:PATH" or "folder:PATH" (``normalization``: a folder's, "sampled"
    or "imagenet"; ``bnff.data.folder``).

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
        return load_folder(Path(path), image_size, seed, normalization)
    raise ValueError(f"unknown --data {spec!r}; use 'digits', 'cifar10:PATH' or 'folder:PATH'")
