"""Image folders, decoded as they are read: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (the
ImageNet layout), or ``DIR/<class>/*`` split 80/20 per class. Any format Pillow reads.

Nothing is decoded up front. The file list of each split goes to an index on disk (the paths as one
UTF-8 blob with offsets, and the labels, as ``.npy`` files read memory-mapped), so the dataset object
that ``DataLoader`` pickles into each worker holds a few names and numbers whatever the folder's size.
Each worker opens an image with Pillow, augments it with kornia, normalizes it and hands it on.

* Training images: ImageNet-style random-resized crop (area 8%-100%, aspect 3/4-4/3; Szegedy et al.
  2015, torchvision's default) to the training size and a horizontal flip with probability 1/2
  (``--augment``: ``crop`` leaves out the flip, ``none`` uses the evaluation transform).
* Evaluation images: the shorter side resized to size / 0.875, then the centre size x size crop.
* Normalization: per-channel mean and std, either sampled from up to 64 training images spread
  evenly over the index (evaluation transform; no pass over the folder) or ImageNet's fixed values.
  ``bnff.train`` saves them in the checkpoint and a resumed run uses the saved ones.
* Random draws come from a generator seeded by (run seed, epoch, image index): every image is
  augmented the same way whichever worker loads it, so a resumed run repeats bit for bit.
* An image Pillow cannot read is skipped: ``collate`` leaves it out of its mini-batch and returns its
  path; the training loop counts and reports them.
* Each item carries the seconds its worker spent producing it, so the training loop can show the
  loader's own images/s next to the training step's and a user sees when loading is the bottleneck.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split
from torch import Tensor

from bnff.data import DataError, Dataset

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
"""ImageNet's per-channel mean and std of RGB values in [0, 1] (torchvision's reference recipe)."""
EVAL_CROP = 0.875  # the centre crop keeps 224 of 256 pixels (Krizhevsky et al. 2012's ratio)
_SAMPLE = 64
_UNREADABLE = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


class _Index:
    """One split's files on disk: ``root / path[i]`` has label ``label[i]``. Pickles as its directory name;
    the arrays are opened (memory-mapped) on first use in each process."""

    def __init__(self, directory: Path, root: Path, paths: list[str], labels: list[int]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        blob = np.frombuffer("".join(paths).encode(), dtype=np.uint8)
        offsets = np.zeros(len(paths) + 1, dtype=np.int64)
        np.cumsum([len(p.encode()) for p in paths], out=offsets[1:])
        for name, array in (("paths", blob), ("offsets", offsets), ("labels", np.asarray(labels, dtype=np.int64))):
            np.save(directory / f"{name}.npy", array)
        self.directory, self.root, self.n = str(directory), str(root), len(paths)
        self._arrays: tuple | None = None

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "root": self.root, "n": self.n, "_arrays": None}

    def _open(self) -> tuple:
        if self._arrays is None:
            self._arrays = tuple(np.load(os.path.join(self.directory, f"{name}.npy"), mmap_mode="r")
                                 for name in ("paths", "offsets", "labels"))
        return self._arrays

    def __len__(self) -> int:
        return self.n

    def entry(self, i: int) -> tuple[str, int]:
        """(absolute path, label) of file ``i``."""
        blob, offsets, labels = self._open()
        rel = bytes(blob[offsets[i]:offsets[i + 1]]).decode()
        return os.path.join(self.root, rel), int(labels[i])


class ImageFiles(torch.utils.data.Dataset):
    """One split of an image folder as a map-style dataset.

    Items are ``(image, label, path, seconds)``: image (3, S, S) float32 normalized, label an int, path
    None, and the seconds spent reading and transforming it; image None and the file's path for a file
    Pillow cannot read. The key is an index or ``(index, epoch)``
    (``EpochSampler``); the epoch and ``seed`` decide the augmentation's random draws.

    Attributes:
        augment: "crop-flip", "crop" or "none" (training); evaluation splits use "eval".
        mean, std: the normalization, per channel (RGB, values in [0, 1]).
    """

    def __init__(self, index: _Index, image_size: int, augment: str, seed: int = 0,
                 mean: tuple[float, ...] = (0.0, 0.0, 0.0), std: tuple[float, ...] = (1.0, 1.0, 1.0)) -> None:
        self.index, self.image_size, self.augment, self.seed = index, image_size, augment, seed
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key) -> tuple[Tensor | None, int, str | None, float]:
        start = time.perf_counter()
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label = self.index.entry(i)
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except _UNREADABLE:
            return None, label, path, time.perf_counter() - start
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        gen_seed = (self.seed * 1_000_003 + epoch) * 1_000_000_007 + i
        with torch.random.fork_rng():
            torch.manual_seed(gen_seed % (2 ** 63))
            x = self._transform(x)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std).squeeze(0).contiguous(), label, None, time.perf_counter() - start

    def _transform(self, x: Tensor) -> Tensor:
        """(1, 3, H, W) in [0, 1] -> (1, 3, S, S) (module docstring)."""
        import kornia.augmentation as K  # 1-2 s to import: in the workers that use it

        s = self.image_size
        if self.augment in ("crop-flip", "crop"):
            x = K.RandomResizedCrop((s, s), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), cropping_mode="resample")(x)
            return K.RandomHorizontalFlip(p=0.5)(x) if self.augment == "crop-flip" else x
        return evaluation_transform(x, s)


def evaluation_transform(x: Tensor, size: int) -> Tensor:
    """The shorter side resized to ``size / EVAL_CROP`` (bilinear, antialiased), then the centre
    ``size`` x ``size`` crop: (1, 3, H, W) -> (1, 3, size, size)."""
    import kornia.geometry.transform as T

    x = T.resize(x, int(round(size / EVAL_CROP)), side="short", antialias=True)
    return T.center_crop(x, (size, size))


def collate(items: list[tuple]) -> tuple[Tensor, Tensor, list[str], float]:
    """A mini-batch from ``ImageFiles`` items: (images (B, 3, S, S), labels (B,), the paths of the
    images left out because they could not be read, the seconds the worker spent on the items). B may
    be smaller than the batch size, or 0."""
    good = [(x, y) for x, y, _, _ in items if x is not None]
    skipped = [p for x, _, p, _ in items if x is None]
    seconds = sum(t for *_, t in items)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), skipped, seconds
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good], dtype=torch.int64), skipped, seconds


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, epoch)`` for each index of ``sampler`` (a ``DistributedSampler``, whose
    ``set_epoch`` it forwards), so that the dataset knows the epoch inside persistent workers."""

    def __init__(self, sampler: torch.utils.data.DistributedSampler) -> None:
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((i, self.epoch) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def _scan(root: Path) -> tuple[list[str], list[str], list[int]]:
    """(classes, file paths relative to ``root``, labels) of ``root/<class>/*``, sorted."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    paths, labels = [], []
    for label, cls in enumerate(classes):
        names = sorted(e.name for e in os.scandir(root / cls)
                       if e.is_file() and os.path.splitext(e.name)[1].lower() in EXTENSIONS)
        paths += [f"{cls}/{n}" for n in names]
        labels += [label] * len(names)
    return classes, paths, labels


def _index_directory() -> Path:
    """A fresh directory for this process's indexes, removed when it exits."""
    d = Path(tempfile.mkdtemp(prefix="bnff-index-"))
    atexit.register(shutil.rmtree, d, True)
    return d


def sampled_normalization(files: ImageFiles) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of up to 64 images spread evenly over ``files`` (evaluation transform,
    before normalization); unreadable ones are passed over.

    Raises:
        DataError: none of them could be read.
    """
    probe = ImageFiles(files.index, files.image_size, "eval")
    picks = np.linspace(0, len(probe) - 1, min(_SAMPLE, len(probe))).round().astype(int)
    xs = [item[0] for item in (probe[int(i)] for i in sorted(set(picks))) if item[0] is not None]
    if not xs:
        raise DataError(f"none of the {len(picks)} images sampled from {files.index.root} could be read")
    x = torch.stack(xs)
    return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).clamp_min(1e-6).tolist())


def load_folder(root: Path, image_size: int = 32, seed: int = 0, normalization: str = "sampled") -> Dataset:
    """The image folder ``root`` as a streamed ``Dataset`` (module docstring): ``root/train`` and
    ``root/val`` when both hold class folders, else ``root/<class>`` split 80/20 per class (``seed``).

    Args:
        root: the folder.
        image_size: S, the side of the square images handed to the model.
        seed: the split's and the augmentation's seed.
        normalization: "sampled" or "imagenet" (``IMAGENET_NORMALIZATION``).
    Raises:
        DataError: no such folder, fewer than two classes, too few images, or no readable sample.
    """
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    where = _index_directory()
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, train_paths, train_labels = _scan(root / "train")
        val_classes, test_paths, test_labels = _scan(root / "val")
        if val_classes != classes:
            raise DataError(f"{root}/val has classes {val_classes[:5]}... but {root}/train has {classes[:5]}...; "
                            f"both need the same class folders")
        train_index = _Index(where / "train", root / "train", train_paths, train_labels)
        test_index = _Index(where / "val", root / "val", test_paths, test_labels)
    else:
        classes, paths, labels = _scan(root)
        if len(classes) < 2:
            raise DataError(f"image folder {root} needs one sub-folder per class, or train/ and val/ folders "
                            f"holding them (found {len(classes)} class folders)")
        if len(paths) < 2 * len(classes) or min(np.bincount(labels, minlength=len(classes))) < 2:
            raise DataError(f"image folder {root} has too few images ({len(paths)}) for a train/test split: "
                            f"every class needs at least 2")
        tr, te = train_test_split(range(len(paths)), test_size=0.2, random_state=seed, stratify=labels)
        tr, te = sorted(tr), sorted(te)
        train_index = _Index(where / "train", root, [paths[i] for i in tr], [labels[i] for i in tr])
        test_index = _Index(where / "test", root, [paths[i] for i in te], [labels[i] for i in te])
    if len(classes) < 2 or len(train_index) == 0 or len(test_index) == 0:
        raise DataError(f"image folder {root} needs at least two classes with images in both splits")
    import kornia.augmentation  # noqa: F401  (here, once: forked DataLoader workers inherit the import)

    train = ImageFiles(train_index, image_size, "crop-flip", seed)
    if normalization == "imagenet":
        mean, std = IMAGENET_NORMALIZATION
    elif normalization == "sampled":
        mean, std = sampled_normalization(train)
    else:
        raise DataError(f"unknown normalization {normalization!r}; use 'sampled' or 'imagenet'")
    train.mean, train.std = mean, std
    test = ImageFiles(test_index, image_size, "eval", seed, mean, std)
    return Dataset(root.name, classes, train, test, image_size, streamed=True, normalization=(mean, std))
