"""Training-time augmentation of ``bnff train``: the standard CIFAR recipe (random crop of the
image padded by an eighth of its size on each side, then a horizontal flip with probability 1/2;
He et al. 2016, §4.2), from kornia (torchvision's transforms cannot be installed here: its wheels
need CUDA libraries). It works on whole mini-batches (N, 3, S, S), each image drawing its own crop
and flip from the global torch RNG, which ``bnff.train`` seeds per step."""

from __future__ import annotations

from torch import nn

from bnff.names import AUGMENTATIONS, UsageError


def resolve(kind: str, data_name: str) -> str:
    """The augmentation ``kind`` stands for on the data set named ``data_name``.

    Raises:
        UsageError: ``kind`` is not one of :data:`AUGMENTATIONS`.
    """
    if kind not in AUGMENTATIONS:
        raise UsageError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {kind!r}")
    if kind == "auto":
        return "crop" if data_name == "digits" else "crop-flip"
    return kind


def augmentation(kind: str, image_size: int) -> nn.Module | None:
    """The mini-batch transform for a resolved ``kind`` on square images of ``image_size`` pixels:
    a module mapping (N, 3, S, S) to (N, 3, S, S) in the input's dtype, or None for ``none``."""
    import kornia.augmentation as K  # imported here: 1-2 s, and only training needs it

    if kind == "none":
        return None
    steps = [K.RandomCrop((image_size, image_size), padding=max(1, image_size // 8), cropping_mode="slice")]
    if kind == "crop-flip":
        steps.append(K.RandomHorizontalFlip(p=0.5))
    return nn.Sequential(*steps)
