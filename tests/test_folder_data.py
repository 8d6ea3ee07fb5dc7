"""Image folders stream (issue 30 item 4): decoded as they are read in DataLoader workers, the dataset
object pickled into each worker small whatever the folder's size, unreadable images skipped and
reported, the augmentation's draws a function of (seed, epoch, image) so runs repeat, and
``bnff train --data folder:DIR`` training a ResNet-18 with workers and with two processes."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from bnff import cli
from bnff.data import DataError, load
from bnff.data.folder import IMAGENET_NORMALIZATION, EpochSampler, collate, evaluation_transform


def _folder(root, classes=3, per_class=10, size=20, layout="flat", rng=None, fmt="jpg"):
    """``per_class`` random images per class (each class its own mean colour, so they can be learnt)."""
    rng = rng or np.random.default_rng(0)
    splits = {"flat": [root], "imagenet": [root / "train", root / "val"]}[layout]
    for split in splits:
        for c in range(classes):
            d = split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                base = np.full((size, size + 4, 3), 60 + 60 * c, dtype=np.int16)
                pixels = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i:05d}.{fmt}")
    return root


def test_splits_shapes_and_normalization(tmp_path):
    ds = load(f"folder:{_folder(tmp_path / 'flat')}", image_size=16)
    assert ds.streamed and ds.classes == ["class0", "class1", "class2"]
    assert (len(ds.train), len(ds.test)) == (24, 6)  # 80/20 per class
    x, label, path, seconds = ds.train[(0, 0)]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and path is None and seconds > 0
    # sampled normalization: the evaluation transform of the sampled images, standardized, has mean 0 and std 1
    xs = torch.stack([ds.test[i][0] for i in range(len(ds.test))] + [ds.train.__class__(ds.train.index, 16, "eval", 0,
                      *ds.normalization)[i][0] for i in range(len(ds.train))])
    assert xs.mean((0, 2, 3)).abs().max() < 0.05 and (xs.std((0, 2, 3)) - 1).abs().max() < 0.05
    ds2 = load(f"folder:{_folder(tmp_path / 'inet', layout='imagenet')}", image_size=16, normalization="imagenet")
    assert (len(ds2.train), len(ds2.test)) == (30, 30) and ds2.normalization == IMAGENET_NORMALIZATION


def test_evaluation_transform_is_resize_then_centre_crop():
    """Against a hand computation: a (1, 3, 40, 80) image, black left half, white right half. The shorter
    side goes to round(16 / 0.875) = 18, so the image becomes 18 x 36 with the edge at column 18; the
    centre 16 x 16 crop takes columns 10..25, where the edge is column 8 (blurred by a pixel or so by
    the antialiasing filter)."""
    x = torch.zeros(1, 3, 40, 80)
    x[..., 40:] = 1
    y = evaluation_transform(x, 16)
    assert y.shape == (1, 3, 16, 16)
    assert y[..., :6].abs().max() < 1e-3 and (y[..., 10:] - 1).abs().max() < 1e-3
    assert 0.2 < y[..., 7:9].mean() < 0.8


def test_the_pickled_dataset_is_small_whatever_the_folder_size(tmp_path):
    small = load(f"folder:{_folder(tmp_path / 'small', classes=2, per_class=5, size=8)}", image_size=8)
    big = load(f"folder:{_folder(tmp_path / 'big', classes=3, per_class=1000, size=8, fmt='png')}", image_size=8)
    assert len(big.train) == 2400
    sizes = [len(pickle.dumps(d.train)) for d in (small, big)]
    assert max(sizes) < 2 ** 20 and abs(sizes[1] - sizes[0]) < 200, sizes
    clone = pickle.loads(pickle.dumps(big.train))  # what a worker gets: the same images
    assert torch.equal(clone[(123, 4)][0], big.train[(123, 4)][0])


def test_draws_depend_on_seed_epoch_and_image_only(tmp_path):
    ds = load(f"folder:{_folder(tmp_path)}", image_size=16)
    a, b = ds.train[(5, 1)][0], ds.train[(5, 1)][0]
    assert torch.equal(a, b)
    assert not torch.equal(a, ds.train[(5, 2)][0])  # another epoch, other crops
    sampler = EpochSampler(torch.utils.data.DistributedSampler(ds.train, num_replicas=1, rank=0, seed=0))
    sampler.set_epoch(3)
    assert all(epoch == 3 for _, epoch in sampler) and len(list(sampler)) == len(ds.train)


def test_unreadable_images_are_skipped_and_reported(tmp_path):
    root = _folder(tmp_path / "data", classes=2, per_class=12)
    (root / "class1" / "00003.jpg").write_bytes(b"not a jpeg")
    ds = load(f"folder:{root}", image_size=16)
    items = [ds.train[(i, 0)] for i in range(len(ds.train))] + [ds.test[i] for i in range(len(ds.test))]
    bad = [p for x, _, p, _ in items if x is None]
    assert len(bad) == 1 and bad[0].endswith("00003.jpg")
    x, y, skipped, seconds = collate(items[:8] + [next(it for it in items if it[0] is None)])
    assert x.shape[0] == y.shape[0] == 8 and len(skipped) == 1 and seconds > 0
    out = tmp_path / "run"
    assert cli.main(["train", "--data", f"folder:{root}", "--epochs", "1", "--batch-size", "4", "--image-size", "16",
                     "--out", str(out)]) == 0
    loading = json.loads((out / "metrics.json").read_text())["loading"]
    assert loading["skipped_images"] == [1] and loading["skipped_files"][0].endswith("00003.jpg")


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load(f"folder:{tmp_path / 'missing'}")
    one = _folder(tmp_path / "one", classes=1)
    with pytest.raises(DataError, match="one sub-folder per class"):
        load(f"folder:{one}")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """3,000 small JPEGs in 3 classes, made once for this module's runs."""
    return _folder(tmp_path_factory.mktemp("jpegs") / "data", classes=3, per_class=1000, size=20)


@pytest.mark.parametrize("procs", [1, 2])
def test_train_resnet18_on_a_folder_of_3000_jpegs(procs, jpegs, tmp_path):
    """Two workers per process; one process, and two (torchrun's launcher, each reading its share)."""
    out = tmp_path / "run"
    args = ["train", "--data", f"folder:{jpegs}", "--model", "resnet18", "--workers", "2", "--epochs", "1",
            "--batch-size", "16", "--image-size", "16", "--limit-batches", "3", "--out", str(out),
            "--nproc-per-node", str(procs)]
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_images"] == 2400 and metrics["processes"] == procs
    assert metrics["loading"]["images_per_s"][0] > 0 and metrics["loading"]["skipped_images"] == [0]
    assert np.isfinite(metrics["runs"]["bnff"]["loss"][0])
    assert metrics["normalization"] is not None
