"""Command line: ``bnff train`` (side-by-side training), ``bnff bench`` (speed), ``bnff plan`` (the fusion
plan), ``bnff traffic`` (the traffic model), ``bnff simulate`` (seed 002's accelerator), ``bnff tile``
(seed 003's pointwise tiling and DRAM energy) and ``bnff decompose`` (CP decomposition of trained weights)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from bnff.atomic import write_csv, write_json
from bnff.names import AUGMENTATIONS, BACKEND_NAMES, BENCH_VARIANTS, DEFAULT_BENCH_VARIANTS, MODEL_NAMES, SCHEMES, UsageError

# torch, the models and the kernels are imported inside the commands: ``bnff --help`` needs none.


def _at_least(minimum: int):
    """argparse type: a whole number >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


_positive = _at_least(1)
_count = _at_least(0)


def _train(args: argparse.Namespace) -> int:
    from bnff import processes

    if args.nproc_per_node > 1 and not processes.launched():
        # the same command in N processes under torchrun's launcher; they all write one run folder
        argv = list(args.argv)
        if args.out is None:
            argv += ["--out", str(_run_folder(args))]
        return processes.launch(args.nproc_per_node, argv)
    with processes.joined("nccl" if args.device.startswith("cuda") else "gloo") as procs:
        return _train_here(args, procs)


def _run_folder(args: argparse.Namespace) -> Path:
    """--out, else the folder of --resume's checkpoint, else runs/MODEL-TIMESTAMP."""
    if args.out:
        return Path(args.out)
    if args.resume:
        return Path(args.resume).parent
    return Path("runs") / time.strftime(f"{args.model}-%Y%m%d-%H%M%S")


def _train_here(args: argparse.Namespace, procs) -> int:
    import torch

    from bnff import data as data_mod
    from bnff.train import TrainConfig, train

    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        ds = data_mod.load(args.data, image_size=args.image_size, seed=args.seed, normalization=args.normalize)
    except ValueError as exc:  # an unknown --data form, a folder without images, ...
        raise UsageError(str(exc)) from None
    if procs.main:
        on = f", {procs.world} processes" if procs.world > 1 else ""
        how = (f", decoded by {args.workers or 'the main process'}{' workers' if args.workers else ''}, normalized by "
               f"{args.normalize} mean/std" if ds.streamed else "")
        print(f"data {ds.name}: {len(ds.train)} train / {len(ds.test)} test images, "
              f"{ds.image_size}x{ds.image_size}, {len(ds.classes)} classes{on}{how}")
    cfg = TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      dtype=args.dtype, backend=args.backend, seed=args.seed, limit_batches=args.limit_batches,
                      compare=args.compare, workers=args.workers, augment=args.augment, sync_bn=args.sync_bn,
                      device=args.device)
    if args.resume and not Path(args.resume).is_file():
        raise UsageError(f"--resume {args.resume}: no such checkpoint")
    try:
        metrics = train(cfg, ds, _run_folder(args), resume=Path(args.resume) if args.resume else None)
    except ValueError as exc:
        if "--resume" in str(exc):
            raise UsageError(str(exc)) from None
        raise
    if args.json and procs.main:
        write_json(args.json, metrics)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from bnff.bench import BenchConfig, run
    from bnff.machine import describe

    try:  # a CPU-only variant on a GPU, a GPU that is not there: the message says what to run
        cfg = BenchConfig(model=args.model, batch=args.batch, image_size=args.image_size, dtype=args.dtype,
                          steps=args.steps, warmup=args.warmup, variants=tuple(args.variants), backend=args.backend,
                          tuned_malloc=args.tuned_malloc, prefer=args.prefer, profile=args.profile, device=args.device)
        res = run(cfg)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    t = Table(title=f"{cfg.model}, batch {cfg.batch}, {cfg.image_size}x{cfg.image_size}, {cfg.dtype}, "
                    f"median of {cfg.steps} interleaved rounds")
    for col in ("variant", "step (s)", "images/s", "step / conv floor", "saved activations (MiB)"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for v, r in res["results"].items():
        saved = res["saved_bytes"].get(v)
        t.add_row(v, f"{r['step_s']:.3f}", f"{r['images_per_s']:.1f}",
                  "" if r["step_over_floor"] is None else f"{r['step_over_floor']:.2f}",
                  "" if saved is None else f"{saved / 2 ** 20:,.1f}")
    Console().print(t)
    print(describe(res["cpu"]) if res.get("gpu") is None else f"GPU: {res['gpu']}")
    for k, v in res["ratios"].items():
        print(f"{k.replace('_', ' ')}: {v:.2f}x images/s")
    if res["overhead_removed"] is not None:
        print(f"overhead removed, (eager - bnff) / (eager - conv floor): {res['overhead_removed']:+.0%}")
    if res["unfused_groups"]:
        print(f"prefer='speed' left {len(res['unfused_groups'])} of {res['fusable_groups']} groups unfused "
              f"(slower fused on this CPU)")
    if res["pointwise"]:
        print(f"fused pointwise convolutions: {res['pointwise']}")
    if res["floor_on_libxsmm"]:
        n = res["floor_on_libxsmm"]
        print(f"conv floor: the faster of ATen and libxsmm per convolution; libxsmm runs {n['forward']} forwards and "
              f"{n['backward']} backwards of {n['convolutions']} convolutions")
    for v, s in res["compile_s"].items():
        print(f"{v} warm-up (compile time, excluded): {s:.1f} s")
    if res["profiles"]:
        _print_profiles(res["profiles"], cfg.profile)
    if args.json:
        write_json(args.json, res)
    return 0


def _print_profiles(profiles: dict, steps: int, top: int = 8) -> None:
    """``bnff bench --profile``'s tables: ms per step by category, then each variant's top operators."""
    from rich.console import Console
    from rich.table import Table

    variants = list(profiles)
    t = Table(title=f"where a step's time goes (torch.profiler, self CPU ms per step, {steps} steps)")
    t.add_column("category")
    for v in variants:
        t.add_column(v, justify="right")
    for cat in profiles[variants[0]]["categories"]:
        t.add_row(cat, *(f"{profiles[v]['categories'][cat]:.1f}" for v in variants))
    t.add_row("step (profiled)", *(f"{profiles[v]['step_ms']:.1f}" for v in variants))
    Console().print(t)
    for v in variants:
        ops = list(profiles[v]["ops"].items())[:top]
        print(f"{v}, top operators: " + ", ".join(f"{op} {ms:.1f}" for op, ms in ops))


def _traffic(args: argparse.Namespace) -> int:
    import torch

    from bnff import models
    from bnff.traffic import Assumptions, compare, patterns, published, report

    try:
        a = Assumptions(onchip_bytes=args.onchip_bytes, footprint=args.footprint,
                        count_layer_io=not args.memory_intensive_only)
    except ValueError as exc:  # e.g. "onchip_bytes must be >= 0, got -5": the option is --onchip-bytes
        raise UsageError(f"--{str(exc).split()[0].replace('_', '-')}: {exc}") from None
    if args.patterns:
        table = patterns.table()
        print(report.patterns_text(table), end="")
        if args.json:
            write_json(args.json, report.patterns_json(table))
        return 0
    if args.reproduce:
        batch = args.batch or published.REPRODUCE_BATCH
        rows = published.reproduce(batch, a)
        print(report.reproduce_text(rows, batch, a), end="")
        if args.json:
            write_json(args.json, {"batch": batch, "assumptions": dataclasses.asdict(a), "rows": rows})
        return 0
    if args.model is None:
        raise UsageError("bnff traffic needs --model M (or --patterns, or --reproduce)")
    size = args.image_size or (299 if args.model.startswith("inception") else 224)
    batch = args.batch or 32
    with torch.device("meta"):
        model = models.MODELS[args.model]()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    analyses = compare(model, (batch, 3, size, size), dtype=dtype, assumptions=a)
    print(report.model_text(args.model, analyses), end="")
    if args.json:
        write_json(args.json, report.model_json(args.model, analyses))
    if args.csv:
        report.write_csv(args.csv, analyses)
    if args.plot:
        report.write_plot(args.plot, args.model, analyses)
    return 0


def _plan(args: argparse.Namespace) -> int:
    import io

    import torch
    from rich.console import Console

    from bnff import models
    from bnff.graph.layers import build
    from bnff.plan import plan_graph
    from bnff.traffic import Assumptions
    from bnff.traffic.plan_report import plan_json, plan_table, steps_text_table

    size = args.image_size or (299 if args.model.startswith("inception") else 224)
    with torch.device("meta"):
        model = models.MODELS[args.model]()
    try:
        lg = build(model, (args.batch, 3, size, size))
    except ValueError as exc:  # the model cannot take that input (too small an image)
        raise UsageError(f"{exc} (try another --image-size)") from None
    plan, _, _ = plan_graph(lg.gm)
    a = Assumptions().with_dtype({"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    console = Console(file=io.StringIO() if args.quiet else None, width=200)
    console.print(plan_table(lg, plan, args.scheme, a))
    if args.steps:
        console.print(steps_text_table(plan, args.scheme))
    for u in plan.unfused:
        console.print(f"not fused: {u.kind} {u.node}: {u.reason}")
    if args.json:
        write_json(args.json, plan_json(lg, plan, a))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import torch

    from bnff import accel, models
    from bnff.accel import report

    try:
        cfg = accel.load(args.config)
    except (accel.ConfigError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    size = args.image_size or (299 if args.model.startswith("inception") else 224)
    with torch.device("meta"):
        model = models.MODELS[args.model]()
    if args.gpu:
        from bnff.accel import roofline

        try:
            machine = accel.config.load_roofline(args.gpu)
        except (accel.ConfigError, FileNotFoundError) as exc:
            raise UsageError(str(exc)) from None
        times = roofline.layer_times(model, args.batch, machine, size)
        sim = accel.simulate(model, args.batch, cfg, size, name=args.model)
        print(report.gpu_text(args.model, machine.source, times, sim), end="")
        if args.json:
            write_json(args.json, {"model": args.model, "batch": args.batch, "machine": dataclasses.asdict(machine),
                                   "relative_to_conv": roofline.relative_to_conv(times),
                                   "fusion_gain": roofline.fusion_gain(times),
                                   "layers": [dataclasses.asdict(t) for t in times]})
        return 0
    if args.sweep:
        key, _, text_values = args.sweep.partition("=")
        try:
            values = [float(v) for v in text_values.split(",") if v.strip()]
            if not values:
                raise ValueError
            rows = accel.sweep(model, key.strip(), values, args.batch, cfg, size, name=args.model)
        except ValueError as exc:  # ConfigError is one
            raise UsageError(str(exc) if isinstance(exc, accel.ConfigError) else
                             f"--sweep wants KEY=V1,V2,... with numbers, got {args.sweep!r}") from None
        print(report.sweep_text(args.model, key.strip(), rows), end="")
        if args.json:
            write_json(args.json, {"model": args.model, "batch": args.batch, "key": key.strip(), "rows": rows})
        if args.csv:
            write_csv(args.csv, rows)
        return 0
    sim = accel.simulate(model, args.batch, cfg, size, name=args.model)
    print(report.text(sim), end="")
    if args.json:
        write_json(args.json, report.as_json(sim))
    if args.csv:
        report.write_csv(args.csv, sim)
    if args.plot:
        report.write_plot(args.plot, sim)
    return 0


def _tile_rank(text: str | None):
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--cp-rank wants a rank or a fraction of min(C_in, C_out), got {text!r}") from None
    if value <= 0:
        raise UsageError(f"--cp-rank must be positive, got {text!r}")
    return value if value < 1 else int(value)


def _tile(args: argparse.Namespace) -> int:
    import torch

    from bnff import models
    from bnff.tiling import dram, report
    from bnff.tiling.layers import ops
    from bnff.tiling.schedule import baseline, optimized

    def run(name: str, rank, order: str, fusion: bool):
        with torch.device("meta"):
            model = models.MODELS[name]()
        ol = ops(model, args.image_size, rank)
        return ol, baseline(ol, args.buffer_entries), optimized(ol, args.buffer_entries, order, fusion)

    def assumptions(rank) -> str:
        return (f"inference, batch 1, {args.image_size}x{args.image_size}, BN/ReLU on chip, "
                f"residual adds in a 1x1's epilogue (optimised), CP rank {'none' if rank is None else rank}")

    if args.reproduce:
        rows = []
        for name, rank in (("mobilenet_v2", None), ("resnet50", 0.5)):
            ol, base, both = run(name, rank, "scan", True)
            scan_only = optimized(ol, args.buffer_entries, "scan", False)
            fusion_only = optimized(ol, args.buffer_entries, "row", True)
            reduction = report.summary(base, both)["energy_reduction"]
            rows.append({"model": name, "published_reduction": report.PUBLISHED[name], "energy_reduction": reduction,
                         "scan_only_reduction": report.summary(base, scan_only)["energy_reduction"],
                         "fusion_only_reduction": report.summary(base, fusion_only)["energy_reduction"],
                         "assumptions": assumptions(rank)})
        print(report.reproduce_text(rows), end="")
        if args.json:
            write_json(args.json, {"buffer_entries": args.buffer_entries, "dram_device": dram.DDR3_1333_X8.name,
                                   "rows": rows})
        return 0
    if args.model is None:
        raise UsageError("bnff tile needs --model M (or --reproduce)")
    rank = _tile_rank(args.cp_rank)
    if args.sweep_buffer:
        try:
            sizes = [int(float(v[:-1]) * 1024) if v.upper().endswith("K") else int(v)
                     for v in args.sweep_buffer.split(",") if v.strip()]
        except ValueError:
            raise UsageError(f"--sweep-buffer wants sizes like 16K,32K,64K, got {args.sweep_buffer!r}") from None
        with torch.device("meta"):
            model = models.MODELS[args.model]()
        ol = ops(model, args.image_size, rank)
        rows = []
        for entries in sizes:
            try:
                base = baseline(ol, entries)
                opt = optimized(ol, entries, args.order, not args.no_fusion)
                scan = optimized(ol, entries, args.order, False)
            except ValueError as exc:  # a size too small for some layer
                raise UsageError(f"{exc}: --sweep-buffer sizes must hold every layer's smallest tile") from None
            rows.append({"buffer_entries": entries, **report.summary(base, opt),
                         "scan_only_reduction": report.summary(base, scan)["energy_reduction"]})
        print(report.sweep_text(args.model, rows), end="")
        if args.json:
            write_json(args.json, {"model": args.model, "cp_rank": rank, "rows": rows})
        if args.plot:
            report.write_sweep_plot(args.plot, args.model, rows)
        return 0
    try:
        ol, base, opt = run(args.model, rank, args.order, not args.no_fusion)
    except ValueError as exc:  # the model cannot take the image size, or the buffer holds no tiling of a layer
        hint = "try another --image-size" if "cannot run on" in str(exc) else "give --buffer-entries a larger buffer"
        raise UsageError(f"{exc} ({hint})") from None
    if not ol.ops:
        raise UsageError(f"{args.model} has no pointwise or depthwise layers to tile (try --cp-rank 0.5)")
    print(report.text(args.model, args.buffer_entries, dram.DDR3_1333_X8.name, base, opt, assumptions(rank),
                      ol.skipped), end="")
    if args.json:
        write_json(args.json, {"model": args.model, "buffer_entries": args.buffer_entries, "order": args.order,
                               "fusion": not args.no_fusion, "cp_rank": rank, "dram_device": dram.DDR3_1333_X8.name,
                               "summary": report.summary(base, opt),
                               "layers": [{"schedule": "baseline", **r.as_dict()} for r in base]
                               + [{"schedule": "optimized", **r.as_dict()} for r in opt]})
    if args.csv:
        report.write_csv(args.csv, base, opt)
    return 0


def _decompose(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from bnff.tiling.cp import decompose_checkpoint

    rank = _tile_rank(args.cp_rank)
    try:
        rows = decompose_checkpoint(args.checkpoint, rank)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    t = Table(title=f"CP decomposition of {args.checkpoint} at rank {rank} (tensorly parafac)")
    for col in ("convolution", "weight (C_out, C_in, Kh, Kw)", "rank", "relative error"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], str(tuple(r["shape"])), str(r["rank"]), f"{r['relative_error']:.3f}")
    Console().print(t)
    if args.json:
        write_json(args.json, {"checkpoint": str(args.checkpoint), "cp_rank": rank, "layers": rows})
    return 0


def _add_backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default=None, choices=sorted(BACKEND_NAMES),
                        help="bnff sweep backend (default: cpu when its kernels build, else reference)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnff", description="Batch-normalization fission and fusion for CNN training.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a CNN restructured by bnff (--compare: beside an eager copy)",
                       description="Train a CNN restructured by bnff, checkpointing every epoch (--resume continues an "
                                   "interrupted run); with --compare, also an eager copy from the same initial weights "
                                   "on the same batches, comparing loss, accuracy, images/s and saved activations.")
    t.add_argument("--data", default="digits", help="digits (default, shipped with scikit-learn), cifar10:PATH "
                                                   "(python-pickle batches) or folder:PATH (PATH/train/<class>/* and "
                                                   "PATH/val/<class>/*, or PATH/<class>/* split 80/20; images decoded "
                                                   "as they are read, in the --workers)")
    t.add_argument("--normalize", default="sampled", choices=["sampled", "imagenet"],
                   help="a folder's per-channel mean and std: sampled from 64 of its training images (default) or "
                        "ImageNet's fixed values; saved in the checkpoint")
    t.add_argument("--model", default="resnet18", choices=sorted(MODEL_NAMES),
                   help="architecture (small-input variant for images of 64 pixels or less)")
    t.add_argument("--epochs", type=_positive, default=3)
    t.add_argument("--batch-size", type=_positive, default=64)
    t.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the one-cycle SGD schedule")
    t.add_argument("--image-size", type=_positive, default=32, help="images are resized to this square size")
    t.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="bf16 and fp16 run under autocast, fp16 with a gradient scaler")
    t.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cuda with --nproc-per-node: a GPU per "
                                                   "process, NCCL)")
    _add_backend(t)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit-batches", type=_positive, default=None, help="quick runs: at most this many training batches per epoch, and "
                                                                    "this many batches' worth of test images")
    t.add_argument("--compare", action="store_true", help="also train an eager copy side by side and compare")
    t.add_argument("--augment", default="auto", choices=AUGMENTATIONS,
                   help="random crop (padding of 1/8 of the size; for a folder, an ImageNet-style random-resized "
                        "crop) and horizontal flip, from kornia; auto: crop for digits (a mirrored digit is another "
                        "glyph), crop-flip otherwise")
    t.add_argument("--workers", type=_count, default=0, help="DataLoader worker processes (default 0: load in the "
                                                          "training process)")
    t.add_argument("--nproc-per-node", type=_positive, default=1, metavar="N",
                   help="train in N processes on this machine with DistributedDataParallel (torchrun's launcher, "
                        "gloo, or NCCL with --device cuda); --batch-size is per process. Several machines: run torchrun -m bnff train on each")
    t.add_argument("--sync-bn", action="store_true",
                   help="BN statistics over all processes' mini-batches (nn.SyncBatchNorm, fused by bnff)")
    t.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue an interrupted run from its checkpoint.pt (same settings; its folder by default)")
    t.add_argument("--out", default=None, help="run folder (default runs/MODEL-TIMESTAMP)")
    t.add_argument("--json", default=None, help="also write the metrics JSON here")
    t.set_defaults(func=_train)

    b = sub.add_parser("bench", help="time training steps: eager, torch.compile, bnff, bnff+compile, the conv floor",
                       description="Time full training steps (forward, backward, SGD) of eager PyTorch, torch.compile, "
                                   "bnff and bnff under torch.compile (bnff+compile) side by side in one process, "
                                   "interleaved after warm-up, plus the conv floor (the same step's convolutions "
                                   "alone); median step time, images/s, step / floor and saved-activation bytes.")
    b.add_argument("--model", default="resnet50", choices=sorted(MODEL_NAMES))
    b.add_argument("--batch", type=_positive, default=16)
    b.add_argument("--image-size", type=_positive, default=224)
    b.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="bf16 runs under autocast")
    b.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (on a GPU: eager, compile, bnff, "
                                                   "bnff+compile; steps synchronised)")
    b.add_argument("--steps", type=_positive, default=10, help="timed rounds (one step of every variant each)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    b.add_argument("--variants", nargs="+", default=list(DEFAULT_BENCH_VARIANTS), choices=BENCH_VARIANTS,
                   help="default: all but bnff_libxsmm (bnff with its 1x1 convolutions on libxsmm, unfused: what "
                        "fusion gains beyond libxsmm's GEMM)")
    _add_backend(b)
    b.add_argument("--tuned-malloc", action="store_true",
                   help="keep freed memory in the process (glibc mallopt) so that no variant faults in fresh pages; "
                        "eager then gets what bnff's workspace gives bnff")
    b.add_argument("--prefer", choices=["memory", "speed"], default="memory",
                   help="bnff.restructure's prefer: 'speed' times each group fused and eager first and leaves the "
                        "slower-fused ones unfused (default: memory, fuse all)")
    b.add_argument("--profile", type=_count, default=0, metavar="N",
                   help="then profile N more steps of each uncompiled variant (torch.profiler) and print the ms "
                        "per step by category and the top operators (default 0: no profile)")
    b.add_argument("--json", default=None, help="write the results as JSON here")
    b.set_defaults(func=_bench)

    p = sub.add_parser("plan", help="print a model's fusion plan: each group's steps, bytes and footprint",
                       description="The fusion plan bnff executes and the traffic model prices: per fused group, its "
                                   "pattern, where its result goes, the steps of the chosen execution scheme and their "
                                   "off-chip bytes and kept bytes at the given input (shapes from meta tensors).")
    p.add_argument("--model", required=True, choices=sorted(MODEL_NAMES))
    p.add_argument("--batch", type=_positive, default=32)
    p.add_argument("--image-size", type=_positive, default=None, help="default 299 for inception_v3, else 224")
    p.add_argument("--scheme", choices=list(SCHEMES), default="bnff")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="activation element type")
    p.add_argument("--steps", action="store_true", help="also list every step with the tensors it reads and writes")
    p.add_argument("--quiet", action="store_true", help="print nothing (with --json)")
    p.add_argument("--json", default=None, help="write the plan, with every scheme's per-group costs, as JSON here")
    p.set_defaults(func=_plan)

    r = sub.add_parser("traffic", help="model off-chip traffic, footprint and FLOPs of training",
                       description="Analytical model of one training step, layer by layer, for the schemes unfused "
                                   "(every layer on its own), bnff (BN fission and fusion with library convolutions), "
                                   "bnff_pw (bnff with fused pointwise convolutions: 1x1 convolutions that apply BN in "
                                   "their GEMM prologue and take the next BN's statistics in their epilogue) and fused "
                                   "(seed 002: pre/post-processing inside the convolutions). Shapes come "
                                   "from meta tensors; nothing is computed.")
    what = r.add_mutually_exclusive_group()
    what.add_argument("--model", choices=sorted(MODEL_NAMES), help="analyse this network")
    what.add_argument("--patterns", action="store_true", help="seed 002 Tables 1-2 from the five connection patterns")
    what.add_argument("--reproduce", action="store_true", help="our figures next to the papers' (seeds 000, 001/004)")
    r.add_argument("--batch", type=_positive, default=None, help="mini-batch size (default 32)")
    r.add_argument("--image-size", type=_positive, default=None, help="input height and width (default 299 for "
                                                                 "inception_v3, else 224)")
    r.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="activation element type")
    r.add_argument("--onchip-bytes", type=int, default=0, help="on-chip capacity: a BN input up to this size is "
                                                               "read once instead of twice (default 0)")
    r.add_argument("--footprint", choices=["autograd", "all_outputs"], default="autograd",
                   help="autograd: what each backward reads (PyTorch; default); all_outputs: every ofmap (seed 002)")
    r.add_argument("--memory-intensive-only", action="store_true",
                   help="leave out convolutions', linear layers' and pools' own traffic")
    r.add_argument("--json", default=None, help="write the results as JSON here")
    r.add_argument("--csv", default=None, help="write one row per scheme and layer here")
    r.add_argument("--plot", default=None, help="write the per-block traffic chart here (.png, .svg, .pdf)")
    r.set_defaults(func=_traffic)

    m = sub.add_parser("simulate", help="seed 002's training accelerator: per-layer time, unfused vs fused",
                       description="Model one training step on seed 002's accelerator (16x32 PUs of 32 MACs, PreU, "
                                   "PostU; or the machine of --config), layer by layer, for the unfused and fused "
                                   "schemes of the fusion plan: per-block FP and BP times, the whole-step improvement "
                                   "and the fused layers' pre-processing, post-processing and memory stalls.")
    m.add_argument("--model", required=True, choices=sorted(MODEL_NAMES))
    m.add_argument("--batch", type=_positive, default=32)
    m.add_argument("--image-size", type=_positive, default=None, help="default 299 for inception_v3, else 224")
    m.add_argument("--config", default=None, help="hardware description TOML (default: the shipped seed002.toml)")
    m.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                   help="one row per value of a TOML key (e.g. dram.feature_bytes_per_s=102.5e9,205e9,410e9, "
                        "array.pu_rows=8,16,32) or batch=8,32,128")
    m.add_argument("--gpu", default=None, metavar="NAME|FILE",
                   help="instead, a GPU as a roofline: rtx2080ti, v100 or a TOML file with [roofline] "
                        "peak_flops_per_s, dram_bytes_per_s, element_bytes; printed next to seeds 002 and 000")
    m.add_argument("--json", default=None, help="write summary, blocks, stalls and every layer as JSON here")
    m.add_argument("--csv", default=None, help="write one row per layer, phase and scheme here")
    m.add_argument("--plot", default=None, help="write Figs. 8-10's charts here (.png, .svg, .pdf)")
    m.set_defaults(func=_simulate)

    tl = sub.add_parser("tile", help="seed 003: pointwise convolutions tiled on a buffer, DRAM energy per layer",
                        description="Inference (batch 1) of the model's 1x1 and depthwise convolutions and residual "
                                    "adds on an accelerator with an on-chip buffer: each 1x1 as a tiled GEMM (best "
                                    "tiles for the order, exact DRAM counts by replay), depthwise-separable chains "
                                    "fused band by band, and the DRAM's row-buffer hits, time and energy (DDR3 "
                                    "model, energydram); baseline = every op alone, row order.")
    what = tl.add_mutually_exclusive_group()
    what.add_argument("--model", choices=sorted(MODEL_NAMES))
    what.add_argument("--reproduce", action="store_true",
                      help="the thesis' two cases (MobileNetV2; ResNet-50 CP-decomposed at rank min(C_in, C_out)/2) "
                           "next to its published savings")
    tl.add_argument("--buffer-entries", type=_positive, default=65536, help="on-chip entries of 16 bits (default 64K)")
    tl.add_argument("--order", choices=["row", "column", "scan"], default="scan", help="tile-visiting order")
    tl.add_argument("--sweep-buffer", default=None, metavar="16K,32K,...",
                    help="one row per buffer size (K = 1024 entries): energy of baseline and optimised (thesis 5.3)")
    tl.add_argument("--plot", default=None, help="with --sweep-buffer: write the chart here (.png, .svg, .pdf)")
    tl.add_argument("--no-fusion", action="store_true", help="optimised schedule without fusing depthwise chains")
    tl.add_argument("--cp-rank", default=None, help="CP-decompose every other KxK convolution at this rank, or this "
                                                    "fraction of min(C_in, C_out) when below 1 (e.g. 0.5)")
    tl.add_argument("--image-size", type=_positive, default=224)
    tl.add_argument("--json", default=None, help="write the summary and every layer as JSON here")
    tl.add_argument("--csv", default=None, help="write one row per op (or fused chain) and schedule here")
    tl.set_defaults(func=_tile)

    d = sub.add_parser("decompose", help="CP-decompose the KxK convolutions of a bnff train checkpoint (tensorly)",
                       description="Each standard KxK convolution weight of a checkpoint written by bnff train, "
                                   "CP-decomposed with tensorly's parafac into the four factors of 1x1, Kx1, 1xK and "
                                   "1x1 layers (Lebedev et al. 2015), with its relative reconstruction error.")
    d.add_argument("--checkpoint", required=True, help="checkpoint.pt from a bnff train run folder")
    d.add_argument("--cp-rank", default="0.5", help="a rank, or a fraction of min(C_in, C_out) below 1 (default 0.5)")
    d.add_argument("--json", default=None, help="write every layer's rank and error as JSON here")
    d.set_defaults(func=_decompose)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bnff`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # bnff train --nproc-per-node re-runs the same command line in each process
    try:
        return args.func(args)
    except UsageError as exc:  # input the user can fix; anything else is a bug and keeps its traceback
        print(f"bnff: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
