"""An image folder: one sub-folder per class, any format Pillow reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split

from bnff.data import DataError, Dataset, normalize

_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def load_folder(root: Path, image_size: int = 32, seed: int = 0) -> Dataset:
    """Load ``root/<class>/<image>``, resized to ``image_size`` squared RGB; stratified 80/20 split."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"image folder {root} needs one sub-folder per class (found {len(classes)})")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).iterdir()):
            if path.suffix.lower() not in _EXTENSIONS:
                continue
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                    images.append(np.asarray(im, dtype=np.uint8))
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"cannot read image {path}: {exc}") from exc
            labels.append(label)
    if len(images) < 2 * len(classes):
        raise DataError(f"image folder {root} has too few images ({len(images)}) for a train/test split")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    y = torch.tensor(labels, dtype=torch.int64)
    tr, te = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=labels)
    train_x, test_x = normalize(x[tr], x[te])
    return Dataset(root.name, train_x, y[tr], test_x, y[te], classes)
