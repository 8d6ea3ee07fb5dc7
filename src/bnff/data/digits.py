"""scikit-learn's handwritten digits (1,797 8x8 images shipped inside scikit-learn; no download)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits as _sk_load_digits
from sklearn.model_selection import train_test_split

from bnff.data import Dataset, normalize


def load_digits(image_size: int = 32, seed: int = 0) -> Dataset:
    """Digits resized bilinearly to ``image_size`` and repeated to 3 channels; stratified 80/20 split."""
    digits = _sk_load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    tr, te = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=digits.target)
    train_x, test_x = normalize(x[tr], x[te])
    return Dataset.in_memory("digits", train_x, y[tr], test_x, y[te], [str(i) for i in range(10)])
