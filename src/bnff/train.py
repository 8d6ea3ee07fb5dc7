"""The main job: train a restructured CNN (with ``compare``: an eager copy beside it, from the same
initial weights on the same mini-batches, to report whether they converge together, their speed
in images/s and the activation bytes each keeps for backward), checkpointing every epoch so an
interrupted run resumes where it stopped. In several processes (``bnff train --nproc-per-node``
or torchrun) it trains with DistributedDataParallel, BN statistics synchronized with ``sync_bn``."""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

import bnff
from bnff import models
from bnff.atomic import atomic_open, save_figure, write_json
from bnff.data import Dataset, augment, folder
from bnff.graph.layers import check_input_size
from bnff.memory import SavedActivations
from bnff.modules import SyncBatchNorm
from bnff.names import UsageError
from bnff.ops import backends
from bnff.processes import Processes


@dataclass
class TrainConfig:
    """Settings of ``bnff train`` (see ``bnff train --help``)."""

    model: str = "resnet18"
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.05
    dtype: str = "fp32"
    backend: str | None = None
    seed: int = 0
    limit_batches: int | None = None
    compare: bool = False
    workers: int = 0
    augment: str = "auto"
    sync_bn: bool = False
    device: str = "cpu"


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""The autocast dtype of each ``--dtype`` that runs under autocast (fp16 with a gradient scaler)."""


def training_device(name: str, procs: Processes) -> torch.device:
    """The device a training process (``bnff train``, ``bnff bench``) runs on: ``name`` ("cpu", "cuda" or
    "cuda:N"); "cuda" in one of several processes is the process's own GPU (``LOCAL_RANK``), made the
    current device.

    Raises:
        UsageError: an unknown device, or CUDA asked for where there is none (the message says what to run).
    """
    import os

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: bnff trains on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device here (torch.cuda.is_available() is False); "
                             f"run with --device cpu, or on a machine with an NVIDIA GPU and a CUDA build of torch")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if procs.world > 1 else 0)
        torch.cuda.set_device(device)
    return device


@dataclass
class LoaderHistory:
    """Per-epoch figures of a streamed folder's loading (``bnff.data.folder``): what the workers can
    deliver (images per second of their time, times their number), the unreadable images skipped,
    and the first of their paths."""

    images_per_s: list[float] = field(default_factory=list)
    skipped_images: list[int] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)


@dataclass
class RunHistory:
    """Per-epoch figures of one of the two runs."""

    loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    images_per_s: list[float] = field(default_factory=list)
    saved_activation_bytes: int = 0


def build_model(name: str, num_classes: int, image_size: int) -> nn.Module:
    """A model from ``bnff.models`` with the small-input stem for images of 64 pixels or less."""
    if name not in models.MODELS:
        raise ValueError(f"unknown --model {name!r}; available: {sorted(models.MODELS)}")
    return models.MODELS[name](num_classes=num_classes, small_input=image_size <= 64)


def training_loss(output, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits; for Inception-v3's ``(logits, aux_logits)`` in training, plus
    0.4 x the auxiliary classifier's (torchvision's reference recipe)."""
    if isinstance(output, tuple):
        logits, aux = output
        loss = F.cross_entropy(logits.float(), target)
        return loss if aux is None else loss + 0.4 * F.cross_entropy(aux.float(), target)
    return F.cross_entropy(output.float(), target)


WARMUP_SHARE = 0.25  # of the steps, rising to the peak learning rate (one-cycle, Smith & Topin 2017)


def lr_schedule(opt: torch.optim.Optimizer, peak_lr: float, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle learning rate over ``total_steps`` (``OneCycleLR``): a quarter of the steps rising
    from ``peak_lr`` / 25 to ``peak_lr``, the rest annealing. ``OneCycleLR`` divides by zero when
    its warm-up ends on step 0 (share x steps = 1: 4 steps of a quarter, e.g. 32 images in batches
    of 8 for one epoch); such a run warms up over two steps instead."""
    share = WARMUP_SHARE if WARMUP_SHARE * total_steps != 1 else 2 / total_steps
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak_lr, total_steps=total_steps, pct_start=share)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` with ``torch.save`` atomically (``bnff.atomic.atomic_open``), so a crash
    mid-save never leaves a corrupt checkpoint at ``path``."""
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def _evaluate(model: nn.Module, loader: DataLoader, amp: torch.dtype | None,
              device: torch.device = torch.device("cpu")) -> tuple[int, int, list[str]]:
    """(images ``model`` classifies right, images evaluated, unreadable files passed over) over ``loader``'s
    mini-batches (``(images, labels[, skipped paths, seconds])``), in eval mode, on ``device`` under
    autocast to ``amp`` (None: off)."""
    model.eval()
    correct = seen = 0
    skipped: list[str] = []
    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        for x, y, *rest in loader:
            skipped += rest[0] if rest else []
            if len(y):
                x, y = x.to(device), y.to(device)
                correct += (model(x).argmax(1) == y).sum().item()
                seen += len(y)
    model.train()
    return correct, seen, skipped


def max_param_difference(a: nn.Module, b: nn.Module) -> float:
    """Largest absolute difference between corresponding parameters of ``a`` and ``b``."""
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


RESUMABLE = ("model", "epochs", "batch_size", "lr", "dtype", "seed", "limit_batches", "compare", "augment", "sync_bn")
"""Config fields a resumed run must share with the run that wrote its checkpoint."""


def _resume_state(path: Path, cfg: TrainConfig, data: Dataset, procs: Processes) -> dict:
    """The state a checkpoint holds, checked against this run's settings.

    Raises:
        ValueError: not a per-epoch checkpoint of ``bnff train``, or a setting that differs (named).
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "runs" not in state or "epoch" not in state:
        raise ValueError(f"--resume {path}: not a checkpoint bnff train wrote (no per-epoch training state)")
    for key in RESUMABLE:
        if state["config"].get(key) != getattr(cfg, key):
            raise ValueError(f"--resume {path}: it was trained with {key}={state['config'].get(key)!r}, this run has "
                             f"{key}={getattr(cfg, key)!r}; resume with the same settings")
    if state.get("processes", 1) != procs.world:
        raise ValueError(f"--resume {path}: it was trained by {state.get('processes', 1)} processes, this run has "
                         f"{procs.world}; each process's share of the data depends on it")
    if state["data"] != [data.name, len(data.train), len(data.test)]:
        raise ValueError(f"--resume {path}: it was trained on {state['data']}, not on this data")
    return state


def _loader(data: Dataset, cfg: TrainConfig, procs: Processes) -> tuple[DataLoader, DistributedSampler, int]:
    """Mini-batches of ``cfg.batch_size`` images for this process: a ``DistributedSampler`` share of
    the shuffled training set (the whole set when alone), loaded by ``cfg.workers`` workers (for a
    streamed folder, each image decoded and augmented there; ``bnff.data.folder``); its sampler (whose
    ``set_epoch`` starts an epoch); and the number of steps per epoch.

    Raises:
        UsageError: the training set has fewer images than one mini-batch per process.
    """
    sampler = DistributedSampler(data.train, num_replicas=procs.world, rank=procs.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    n_batches = len(sampler) // cfg.batch_size
    if n_batches == 0:
        per = f" x {procs.world} processes" if procs.world > 1 else ""
        raise UsageError(f"--batch-size {cfg.batch_size}{per} needs more than the {len(data.train)} training images "
                         f"of {data.name}; use a smaller --batch-size")
    if cfg.limit_batches:
        n_batches = min(n_batches, cfg.limit_batches)
    extra = {}
    if data.streamed:  # per image in the workers, its draws seeded by (seed, epoch, index)
        data.train.augment, data.train.seed = cfg.augment, cfg.seed
        sampler = folder.EpochSampler(sampler)
        extra = dict(collate_fn=folder.collate)
    loader = DataLoader(data.train, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        drop_last=True, persistent_workers=cfg.workers > 0, pin_memory=False, **extra)  # no GPU to pin for
    return loader, sampler, n_batches


def _test_loader(data: Dataset, cfg: TrainConfig, procs: Processes, n_test: int) -> DataLoader:
    """This process's share of the first ``n_test`` test images (every ``world``-th from its rank)."""
    share = Subset(data.test, range(procs.rank, n_test, procs.world))
    extra = dict(collate_fn=folder.collate, num_workers=cfg.workers, persistent_workers=cfg.workers > 0) \
        if data.streamed else {}
    return DataLoader(share, batch_size=max(cfg.batch_size, 64), pin_memory=False, **extra)


def train(cfg: TrainConfig, data: Dataset, out_dir: Path, log=print, resume: Path | None = None) -> dict:
    """Train the restructured ``cfg.model`` (with ``cfg.compare``: an eager copy beside it, from the
    same initial weights on the same mini-batches); write ``out_dir``'s run files and, after every
    epoch, ``out_dir/checkpoint.pt`` (atomically) with everything a resumed run needs.

    In a process group (torchrun, ``bnff.processes.joined``) every process runs this with the same
    ``cfg``: each model is wrapped in ``DistributedDataParallel``, each process trains on its
    ``DistributedSampler`` share in mini-batches of ``cfg.batch_size`` (per process), with
    ``cfg.sync_bn`` the BN statistics are those of all processes' mini-batches
    (``nn.SyncBatchNorm``, fused by bnff), and only rank 0 logs and writes ``out_dir``.

    ``resume``: a checkpoint of an interrupted run with the same settings; training continues after
    its last epoch and ends with the same weights as an uninterrupted run.

    Returns the metrics dict also written to ``out_dir/metrics.json``.

    Raises:
        ValueError: a bad ``cfg.dtype`` or a checkpoint that does not fit this run.
        UsageError: a mini-batch larger than the training set, an unknown ``cfg.augment``, images too
            small for the model (the message gives the smallest size that works), or a ``cfg.device`` that is
            not here (``training_device``).
    """
    if cfg.dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--dtype must be fp32, bf16 or fp16, got {cfg.dtype!r}")
    procs = Processes.current()
    device = training_device(cfg.device, procs)
    log = log if procs.main else (lambda *a, **k: None)
    cfg = replace(cfg, backend=backends.resolve(cfg.backend), augment=augment.resolve(cfg.augment, data.name))
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    image_size = data.image_size
    base = build_model(cfg.model, len(data.classes), image_size)
    try:  # before tracing: an image too small for the model's downsampling, with the size that works
        check_input_size(base, (cfg.batch_size, 3, image_size, image_size))
    except ValueError as exc:
        raise UsageError(f"--image-size {image_size}: {exc}") from None
    if cfg.sync_bn:
        base = nn.SyncBatchNorm.convert_sync_batchnorm(base)
    base = base.to(device)
    nets = {"bnff": bnff.restructure(copy.deepcopy(base), backend=cfg.backend)}
    if cfg.compare:
        eager = copy.deepcopy(base)
        SyncBatchNorm.adopt(eager)  # PyTorch's own refuses CPU modules under DDP; bnff's unfused one is the same BN
        nets = {"eager": eager, **nets}
    log(bnff.fusion_report(nets["bnff"]).summary())
    loader, sampler, n_batches = _loader(data, cfg, procs)
    total = cfg.epochs * n_batches
    hist = {k: RunHistory() for k in nets}
    gen = torch.Generator().manual_seed(cfg.seed)
    first = 0
    state = _resume_state(Path(resume), cfg, data, procs) if resume is not None else None
    if state is not None and data.streamed and state.get("normalization"):  # the run's own, not a new sample
        mean, std = (tuple(v) for v in state["normalization"])
        data.normalization = (mean, std)
        for split in (data.train, data.test):
            split.mean, split.std = mean, std
    if state is not None:
        for k, m in nets.items():
            m.load_state_dict(state["runs"][k]["model"])
    ids = [device.index] if device.type == "cuda" else None
    runs = {k: DistributedDataParallel(m, device_ids=ids) if procs.world > 1 else m for k, m in nets.items()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
            for k, m in nets.items()}
    scheds = {k: lr_schedule(o, cfg.lr, total) for k, o in opts.items()}
    # fp16: a loss scale per run, so small gradients survive float16 (PyTorch's GradScaler; off otherwise)
    scalers = {k: torch.amp.GradScaler(device.type, enabled=cfg.dtype == "fp16") for k in nets}
    if state is not None:
        for k in runs:
            opts[k].load_state_dict(state["runs"][k]["optimizer"])
            if "scaler" in state["runs"][k]:
                scalers[k].load_state_dict(state["runs"][k]["scaler"])
            scheds[k].load_state_dict(state["runs"][k]["scheduler"])
            hist[k] = RunHistory(**state["runs"][k]["history"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        first = state["epoch"]
        log(f"resumed from {resume} after epoch {first}")
    n_test = len(data.test) if not cfg.limit_batches else min(len(data.test), cfg.limit_batches * cfg.batch_size)
    test_loader = _test_loader(data, cfg, procs, n_test)
    # in-memory data is augmented here, a mini-batch at a time; a streamed folder's images in the workers
    transform = None if data.streamed else augment.augmentation(cfg.augment, image_size)
    loading = LoaderHistory(**state["loading"]) if state is not None and state.get("loading") else LoaderHistory()
    amp = AMP_DTYPES.get(cfg.dtype)
    names = " + ".join(runs)
    bar = tqdm(total=total, initial=first * n_batches, desc=f"training {names}", unit="step", dynamic_ncols=True,
               disable=not procs.main)
    for epoch in range(first, cfg.epochs):
        sampler.set_epoch(epoch)
        losses = {k: 0.0 for k in runs}
        seconds = {k: 0.0 for k in runs}
        batches = iter(loader)
        busy, delivered, skipped = 0.0, 0, []
        for b in range(n_batches):
            x, y, *rest = next(batches)
            if rest:  # a streamed folder's batch: unreadable files left out, the workers' seconds
                skipped += rest[0]
                busy += rest[1]
                delivered += len(y) + len(rest[0])
            if len(y) == 0:  # every image of the batch unreadable
                bar.update(1)
                continue
            # one seed per step and process: the same crops and dropout masks for both runs, other
            # ones in each process, and the same again in a resumed run
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen)) * procs.world + procs.rank
            if transform is not None:
                with torch.random.fork_rng():
                    torch.manual_seed(seed)
                    x = transform(x)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for k, m in runs.items():
                meter = SavedActivations(m) if (epoch == 0 and b == 0) else None
                t0 = time.perf_counter()
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                        torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                    torch.manual_seed(seed)
                    with meter or contextlib.nullcontext():
                        output = m(x)
                    loss = training_loss(output, y)
                opts[k].zero_grad(set_to_none=True)
                scalers[k].scale(loss).backward()
                scalers[k].step(opts[k])
                scalers[k].update()
                scheds[k].step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # the step's own time, not its launch
                seconds[k] += time.perf_counter() - t0
                losses[k] += loss.item()
                if meter is not None:
                    hist[k].saved_activation_bytes = meter.bytes
            bar.update(1)
            bar.set_postfix({f"loss_{k}": f"{losses[k] / (b + 1):.3f}" for k in runs})
        for k, m in nets.items():
            correct, seen, test_skipped = _evaluate(m, test_loader, amp, device)
            loss_sum, correct, seen = procs.sum([losses[k], correct, seen])
            hist[k].loss.append(loss_sum / (procs.world * n_batches))
            hist[k].test_accuracy.append(correct / max(seen, 1))
            hist[k].images_per_s.append(procs.world * n_batches * cfg.batch_size / max(procs.max([seconds[k]])[0], 1e-9))
        if data.streamed:
            n_skipped, busy_s, n_read = procs.sum([len(skipped) + len(test_skipped), busy, delivered])
            loading.skipped_images.append(int(n_skipped))
            loading.skipped_files = (loading.skipped_files + skipped + test_skipped)[:20]
            # what the workers can deliver: images per second of one worker's time, times the workers
            loading.images_per_s.append(n_read / max(busy_s, 1e-9) * max(cfg.workers, 1) * procs.world)
        line = " | ".join(f"{k}: loss {hist[k].loss[-1]:.4f} acc {hist[k].test_accuracy[-1]:.2%} "
                          f"{hist[k].images_per_s[-1]:.1f} img/s" for k in runs)
        if cfg.compare:
            line += f" | max |param diff| {max_param_difference(nets['eager'], nets['bnff']):.2e}"
        if data.streamed:  # the loader's own capacity beside the steps' rate: is loading the bottleneck?
            line += (f" | loader {loading.images_per_s[-1]:.0f} img/s ({max(cfg.workers, 1)} worker"
                     f"{'s' if cfg.workers > 1 else ''}{' per process' if procs.world > 1 else ''})")
            if loading.skipped_images[-1]:
                line += f", {loading.skipped_images[-1]} unreadable images skipped (first: {loading.skipped_files[0]})"
        if procs.main:
            bar.write(f"epoch {epoch + 1}/{cfg.epochs}  {line}")
            out_dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(out_dir / "checkpoint.pt", {
                "model": cfg.model, "config": asdict(cfg), "epoch": epoch + 1, "processes": procs.world,
                "state_dict": nets["bnff"].state_dict(), "data": [data.name, len(data.train), len(data.test)],
                "normalization": data.normalization, "loading": asdict(loading),
                "runs": {k: {"model": nets[k].state_dict(), "optimizer": opts[k].state_dict(),
                             "scheduler": scheds[k].state_dict(), "scaler": scalers[k].state_dict(),
                             "history": asdict(hist[k])} for k in runs},
                "generator": gen.get_state(), "torch_rng": torch.get_rng_state()})
        procs.barrier()  # a resumed run finds every epoch it was told of
    bar.close()
    b_bytes = hist["bnff"].saved_activation_bytes
    if cfg.compare:
        e_bytes = hist["eager"].saved_activation_bytes
        log(f"activations saved for backward (batch {cfg.batch_size}): eager {e_bytes / 2**20:.1f} MiB, "
            f"bnff {b_bytes / 2**20:.1f} MiB ({b_bytes / max(e_bytes, 1):.1%} of eager)")
    else:
        log(f"activations saved for backward (batch {cfg.batch_size}): {b_bytes / 2**20:.1f} MiB")
    metrics = {
        "config": asdict(cfg), "data": data.name, "image_size": image_size, "processes": procs.world,
        "global_batch_size": procs.world * cfg.batch_size,
        "train_images": len(data.train), "test_images": n_test,
        "loading": asdict(loading) if data.streamed else None, "normalization": data.normalization,
        "runs": {k: asdict(h) for k, h in hist.items()},
        "max_param_difference": max_param_difference(nets["eager"], nets["bnff"]) if cfg.compare else None,
        "fusion": bnff.fusion_report(nets["bnff"]).summary(),
    }
    if procs.main:
        _write_outputs(out_dir, metrics, hist)
    log(f"run folder: {out_dir}")
    return metrics


def _write_outputs(out_dir: Path, metrics: dict, hist: dict[str, RunHistory]) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's matplotlib backend is left alone

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", metrics)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    styles = {"eager": "-o", "bnff": "--x"}
    for k in hist:
        ax.plot(range(1, len(hist[k].loss) + 1), hist[k].loss, styles[k], label=k)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(f"{metrics['config']['model']} on {metrics['data']}: " + " vs ".join(hist))
    ax.legend()
    fig.tight_layout()
    save_figure(out_dir / "loss.png", fig, dpi=100)
