"""CIFAR-10 in its "python version" layout: data_batch_1..5 and test_batch (pickled dicts)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bnff.data import DataError, Dataset, normalize

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"CIFAR-10 batch file not found: {path} (expected data_batch_1..5 and test_batch)")
    try:
        with path.open("rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as exc:  # pickle/KeyError/reshape errors all mean the same thing here
        raise DataError(f"corrupt CIFAR-10 batch file {path}: {type(exc).__name__}: {exc}") from exc
    if len(labels) != len(data):
        raise DataError(f"corrupt CIFAR-10 batch file {path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def load_cifar10(root: Path, image_size: int = 32) -> Dataset:
    """Read the five training batches and the test batch under ``root``."""
    train = [_read_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = _read_batch(root / "test_batch")
    train_x = torch.from_numpy(np.concatenate([b[0] for b in train])).float() / 255.0
    test = torch.from_numpy(test_x).float() / 255.0
    if image_size != 32:
        train_x = F.interpolate(train_x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        test = F.interpolate(test, size=(image_size, image_size), mode="bilinear", align_corners=False)
    train_x, test = normalize(train_x, test)
    train_y = torch.from_numpy(np.concatenate([b[1] for b in train]))
    return Dataset.in_memory("cifar10", train_x, train_y, test, torch.from_numpy(test_y), CLASSES)
