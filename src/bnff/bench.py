"""Side-by-side speed of training steps: eager, ``torch.compile``, bnff, bnff under ``torch.compile``, and
the conv floor (docs/design.md section 5).

In one process, on one synthetic mini-batch and the same initial weights, ``run`` times full
training steps (forward, backward, SGD step) of each variant, interleaved round by round after
warm-up, and reports the median step time and images/s. The *conv floor* is the same step's
convolutions alone (forward, dgrad, wgrad) on tensors of the same shapes, dtypes and memory
format: what a perfect fusion of everything else would approach; ``step / floor`` is the overhead.
Each convolution's forward and backward in the floor run on the faster of ATen's and libxsmm's
implementation (libxsmm where it takes the call: a 1x1 convolution without padding, bias or groups,
channels_last; its backward at stride 1), timed once when the floor is set up, so that a gain of
libxsmm's GEMM is not counted as fusion's (issue 31). ``bnff_libxsmm`` is bnff with the pointwise
groups' 1x1 convolutions on libxsmm but not fused (``BNFF_POINTWISE=libxsmm``): bnff against it is
what fusion gains beyond the GEMM.
``torch.compile``'s compile time (the warm-up steps of ``compile`` and ``bnff+compile``, the
restructured model wrapped in ``torch.compile``) is reported separately and excluded.
"""

from __future__ import annotations

import contextlib
import functools
import copy
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import bnff
from bnff import models
from bnff.machine import cpu_info
from bnff.memory import saved_activation_bytes
from bnff.graph.consumers import takes_gemm_prologue
from bnff.names import BENCH_VARIANTS, DEFAULT_BENCH_VARIANTS
from bnff.ops import backends, pointwise
from bnff.ops.backends import cpu
from bnff.ops.fused import _ApplyConsume
from bnff.processes import Processes
from bnff.train import training_device, training_loss

VARIANTS = BENCH_VARIANTS


@dataclass
class BenchConfig:
    """What ``run`` measures.

    Attributes:
        model: a name of ``bnff.models.MODELS``.
        batch: mini-batch size.
        image_size: input height and width (pixels).
        dtype: "fp32", or "bf16" (CPU autocast to bfloat16).
        steps: timed rounds; each round times one step of every variant.
        warmup: untimed steps per variant before the rounds (compile's are its compile time).
        variants: which of ``VARIANTS`` to run.
        backend: bnff sweep backend (None: ``bnff.ops.backends.default()``).
        channels_last: model and input in channels_last (the layout oneDNN convolutions prefer).
        seed: seed of the weights and the synthetic batch.
        tuned_malloc: before anything runs, tell glibc's malloc never to return memory to the system
            nor to map large blocks anew (``tune_malloc``), so that no variant faults in fresh pages
            for its intermediates: eager then gets what bnff's workspace gives bnff. Process-wide
            and irreversible.
        prefer: ``bnff.restructure``'s ``prefer``, "memory" or "speed" (then groups slower fused
            on this CPU are left unfused, timed on this config's mini-batch).
        profile: after the timed rounds, run this many more steps of every uncompiled variant under
            ``torch.profiler`` and report where each step's time goes (``profile_step``); 0: none.
        device: "cpu", "cuda" or "cuda:N". On a GPU every timed step ends with a synchronisation, and the
            CPU-only variants (``conv_floor``, ``bnff_libxsmm``) and ``tuned_malloc`` are refused.
    """

    model: str = "resnet50"
    batch: int = 16
    image_size: int = 224
    dtype: str = "bf16"
    steps: int = 10
    warmup: int = 2
    variants: tuple[str, ...] = DEFAULT_BENCH_VARIANTS
    backend: str | None = None
    channels_last: bool = True
    seed: int = 0
    tuned_malloc: bool = False
    prefer: str = "memory"
    profile: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.model not in models.MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(sorted(models.MODELS))}")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be 'fp32' or 'bf16', got {self.dtype!r}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"variants must be a non-empty subset of {VARIANTS}, got {self.variants}")
        if self.prefer not in ("memory", "speed"):
            raise ValueError(f"prefer must be 'memory' or 'speed', got {self.prefer!r}")
        if self.steps < 1 or self.warmup < 0 or self.batch < 1 or self.profile < 0:
            raise ValueError("steps and batch must be >= 1, warmup and profile >= 0")
        cpu_only = [v for v in self.variants if v in ("conv_floor", "bnff_libxsmm")] + (
            ["tuned_malloc"] if self.tuned_malloc else [])
        if self.device != "cpu" and cpu_only:
            raise ValueError(f"{', '.join(cpu_only)} time CPU kernels (ATen's, libxsmm's, glibc's allocator); on "
                             f"{self.device} run the variants eager, compile, bnff, bnff+compile")


@dataclass(frozen=True)
class _ConvCall:
    """One convolution of the step: shapes and dtypes as it ran (under autocast, in its layout)."""

    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    dtype: torch.dtype
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    dgrad: bool
    gemm: bool = False  # a 1x1 convolution libxsmm's kernels take (``graph.consumers.takes_gemm_prologue``)


def _conv_calls(model: nn.Module, x: Tensor, amp: bool) -> list[_ConvCall]:
    """Every nn.Conv2d call of one forward of ``model`` on ``x``."""
    calls: list[_ConvCall] = []

    def hook(m: nn.Conv2d, args, out: Tensor) -> None:
        (inp,) = args
        if isinstance(m.padding, str):
            raise ValueError("string padding is not supported by the conv floor")
        calls.append(_ConvCall(tuple(inp.shape), tuple(m.weight.shape), out.dtype, m.stride, m.padding,
                               m.dilation, m.groups, m.bias is not None, inp.requires_grad, takes_gemm_prologue(m)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with _autocast(amp):  # with autograd on: an input that needs a gradient marks a dgrad
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def _autocast(amp: bool, device: torch.device | str = "cpu"):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def _floor_step(calls: list[_ConvCall], memory_format: torch.memory_format,
                gen: torch.Generator) -> tuple[Callable[[], None], dict]:
    """A step of only the convolutions: forward, then dgrad (where the real step needs it) and wgrad,
    each by the faster of ATen's and libxsmm's (timed here, ``pointwise.fastest``). Returns the step and
    how many convolutions' forward and backward libxsmm runs in it."""
    runs, on_libxsmm = [], {"convolutions": len(calls), "forward": 0, "backward": 0}
    for c in calls:
        x = torch.randn(c.x_shape, generator=gen).to(c.dtype).contiguous(memory_format=memory_format)
        w = torch.randn(c.w_shape, generator=gen).to(c.dtype).contiguous(memory_format=memory_format)
        b = torch.zeros(c.w_shape[0], dtype=c.dtype) if c.bias else None
        y = F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)
        gy = torch.randn(y.shape, generator=gen).to(c.dtype).contiguous(memory_format=memory_format)

        def fwd(c=c, x=x, w=w, b=b):
            F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)

        def bwd(c=c, x=x, w=w, gy=gy):
            torch.ops.aten.convolution_backward(gy, x, w, [c.w_shape[0]] if c.bias else None, list(c.stride),
                                                list(c.padding), list(c.dilation), False, [0, 0], c.groups,
                                                [c.dgrad, True, c.bias])
        if c.gemm and cpu.pointwise_covers([x], w):
            with torch.no_grad():
                fx = functools.partial(cpu.libxsmm_conv, x, w, c.stride[0])
                if pointwise.fastest(fx) < pointwise.fastest(fwd):
                    fwd, on_libxsmm["forward"] = fx, on_libxsmm["forward"] + 1
                if c.stride[0] == 1 and c.dgrad:
                    bx = functools.partial(cpu.libxsmm_conv_backward, x, gy, w)
                    if pointwise.fastest(bx) < pointwise.fastest(bwd):
                        bwd, on_libxsmm["backward"] = bx, on_libxsmm["backward"] + 1
        runs.append((fwd, bwd))

    def step() -> None:
        with torch.no_grad():
            for fwd, _ in runs:
                fwd()
            for _, bwd in reversed(runs):
                bwd()

    return step, on_libxsmm


def _pointwise_mode(mode: str, step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with ``bnff.ops.pointwise.MODE`` set to ``mode`` while it runs."""
    def run() -> None:
        old, pointwise.MODE = pointwise.MODE, mode
        try:
            step()
        finally:
            pointwise.MODE = old
    return run


def tune_malloc() -> None:
    """Set glibc malloc's options so freed memory stays with the process: no trimming of the heap,
    no ``mmap`` per large block, a 1 GiB top pad (``mallopt`` M_TRIM_THRESHOLD, M_MMAP_THRESHOLD,
    M_TOP_PAD; the same as the MALLOC_*_ environment variables). Process-wide, irreversible.

    Raises:
        RuntimeError: not glibc (no ``mallopt``), or glibc refused a value.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as exc:
        raise RuntimeError(f"tuned_malloc needs glibc's mallopt ({exc}); run without it") from None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    for opt, value in ((m_trim_threshold, 2 ** 31 - 1), (m_mmap_threshold, 2 ** 31 - 1), (m_top_pad, 2 ** 30)):
        if mallopt(opt, value) != 1:
            raise RuntimeError(f"glibc mallopt({opt}, {value}) failed; run without tuned_malloc")


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, amp: bool) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(amp, x.device):
            out = model(x)
        training_loss(out, y).backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)  # the step's time, not its launch's

    return step


def alternate_steps(model: str, setups: dict[str, Callable[[], None]], rounds: int, dtype: str = "bf16") -> dict:
    """Whole bnff training steps of ``model`` under two (or more) settings, alternating step by step in
    one process: a benchmark's A/B of something that can be switched between steps (other kernels,
    the group executor). Batch 16, 224x224, channels_last, ``dtype`` ("bf16": autocast to bfloat16, the
    default; "fp32"), cpu backend, glibc malloc
    tuned (``tune_malloc``), as ``bnff bench --tuned-malloc`` runs it; each round runs ``setups[v]()``
    then one step for every ``v`` in order, after 2 warm-up rounds; the last setting is left on.

    Returns:
        ``{"model", "step_s": {v: [s per round]}, "median_step_s": {v: s}, "first - last per round, s":
        {"median", "quartiles"}}``: the per-round difference of the first and the last setting (a
        round's steps share the machine's mode of the moment).
    """
    tune_malloc()
    torch.manual_seed(0)
    cl = torch.channels_last
    net = models.MODELS[model](num_classes=1000).train().to(memory_format=cl)
    x = torch.randn(16, 3, 224, 224).contiguous(memory_format=cl)
    y = torch.randint(0, 1000, (16,))
    amp = dtype == "bf16"
    with _autocast(amp):
        net = bnff.restructure(net, backend="cpu", example_input=x)
    step = _train_step(net, torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9), x, y, amp)
    times: dict[str, list[float]] = {v: [] for v in setups}
    for r in range(rounds + 2):
        for v, setup in setups.items():
            setup()
            t = _timed(step)
            if r >= 2:
                times[v].append(t)
    first, last = list(times.values())[0], list(times.values())[-1]
    diff = sorted(a - b for a, b in zip(first, last))
    return {"model": model, "step_s": times, "median_step_s": {v: statistics.median(t) for v, t in times.items()},
            "first - last per round, s": {"median": statistics.median(diff), "quartiles": statistics.quantiles(diff, n=4)}}


# Where a step's time goes: ATen/bnff operators by name, in these categories (first match wins).
# bnff's autograd Function appears as its own record: its self time is the Python of its forward and
# backward (the plan's steps, the backend's checks), the operators it calls being counted apart.
PROFILE_CATEGORIES = (
    ("convolutions", ("conv", "mkldnn_convolution", "bnff::pointwise")),  # (libxsmm's, fused or not)
    ("bnff group executor (its C++ around the sweeps and convolutions)", ("bnff::group_",)),
    ("bnff sweeps", ("bnff::",)),
    ("bnff autograd Function (Python)", (_ApplyConsume.__name__,)),
    ("in-place add_, mul_ (residual adds, gradient sums, SGD)", ("aten::add_", "aten::mul_", "_foreach")),
    ("BN, ReLU, add, cat", ("batch_norm", "relu", "clamp_min", "threshold", "hardtanh", "aten::add", "aten::cat")),
    ("casts, copies", ("aten::copy_", "aten::to", "_to_copy", "aten::clone")),
    ("pooling, linear, loss", ("pool", "aten::mm", "aten::addmm", "linear", "log_softmax", "nll_loss")),
)


def profile_step(step: Callable[[], None], steps: int) -> dict:
    """Self CPU time per step of each operator of ``steps`` runs of ``step`` (``torch.profiler``).

    Returns:
        ``{"step_ms": wall ms per profiled step, "categories": {category: ms per step},
        "ops": {operator: ms per step}}``; categories are ``PROFILE_CATEGORIES`` plus "other
        operators" and "outside operators" (the step's wall time no operator accounts for: Python,
        autograd's engine, the profiler's own cost). The profiler lengthens short calls, so small
        operators and the Python share read high.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - t0
    ops = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages() if e.self_cpu_time_total > 0}
    cats = {name: 0.0 for name, _ in PROFILE_CATEGORIES}
    cats["other operators"] = 0.0
    for op, ms in ops.items():
        name = next((n for n, pats in PROFILE_CATEGORIES if any(p in op for p in pats)), "other operators")
        cats[name] += ms
    step_ms = wall * 1e3 / steps
    cats["outside operators"] = max(0.0, step_ms - sum(ops.values()))
    return {"step_ms": step_ms, "categories": cats, "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def _timed(step: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def run(cfg: BenchConfig, progress: bool = True) -> dict:
    """Measure ``cfg``; see the module docstring.

    Returns:
        ``{"config": {...}, "cpu": bnff.machine.cpu_info(), "gpu": the CUDA device's name or None, "results":
        {variant: {"step_s",
        "images_per_s", "step_over_floor"}}, "ratios": {"bnff_vs_eager", "bnff_vs_compile",
        "bnff_vs_bnff_libxsmm", "bnff+compile_vs_eager", ...} (step-time ratios, those whose variants ran),
        "overhead_removed": float | None, "compile_s": {compiled variant: warm-up s}, "saved_bytes":
        {variant: int | None}}``; ``step_s`` is the median over the rounds; ``overhead_removed`` is
        (eager - bnff) / (eager - conv floor), the share of eager's time beyond its convolutions
        that bnff removes (None without those three variants); saved
        bytes are ``bnff.memory``'s count (None for the compiled variants, whose saved tensors include
        weight casts the counter cannot separate); ``unfused_groups`` names the groups ``prefer="speed"`` left
        unfused, of ``fusable_groups``; ``profiles`` maps each profiled variant to ``profile_step``'s
        result (empty without ``profile``); ``pointwise`` the fusion report's line on the fused pointwise
        convolutions (``FusionReport.pointwise_where``: how many 1x1 consumers can take the apply step and
        whether libxsmm runs them here), None when bnff did not run or has none; ``floor_on_libxsmm``
        ``{"convolutions", "forward", "backward"}``: how many of the floor's convolutions there are and
        how many of their forwards and backwards libxsmm runs (None without the floor).
    Raises:
        ValueError: a bad configuration, or ``bnff_libxsmm`` without libxsmm.
        UsageError: a device that is not here (``bnff.train.training_device``).
    """
    cfg = replace(cfg, backend=backends.resolve(cfg.backend))
    device = training_device(cfg.device, Processes())
    if cfg.tuned_malloc:
        tune_malloc()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    amp = cfg.dtype == "bf16"
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    base = models.MODELS[cfg.model](num_classes=1000).train().to(device, memory_format=fmt)
    x = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, generator=gen).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (cfg.batch,), generator=gen).to(device)

    steps: dict[str, Callable[[], None]] = {}
    nets: dict[str, nn.Module] = {}
    unfused_groups: list[str] = []
    fusable = None
    pointwise_line = None
    on_libxsmm = None
    if "bnff_libxsmm" in cfg.variants and cpu.pointwise_why() is not None:
        raise ValueError(f"the bnff_libxsmm variant needs libxsmm: {cpu.pointwise_why()}")
    for v in cfg.variants:
        if v == "conv_floor":
            steps[v], on_libxsmm = _floor_step(_conv_calls(base, x, amp), fmt, gen)
            continue
        net = copy.deepcopy(base)
        if v.startswith("bnff"):
            with _autocast(amp, device):  # prefer="speed" times the groups as they will run
                net = bnff.restructure(net, backend=cfg.backend, prefer=cfg.prefer, example_input=x)
            report = bnff.fusion_report(net)
            pointwise_line = report.pointwise_where() if report.pointwise else None
            unfused_groups = [name for name, t in report.timings.items() if t.runs_eager]
            fusable = len(report.groups) + len(unfused_groups)
        if v.endswith("compile"):
            net = torch.compile(net)
        nets[v] = net
        opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
        steps[v] = _train_step(net, opt, x, y, amp)
        if v == "bnff_libxsmm":
            steps[v] = _pointwise_mode("libxsmm", steps[v])

    compile_s: dict[str, float] = {}
    for v, step in steps.items():
        t = sum(_timed(step) for _ in range(cfg.warmup))
        if v.endswith("compile"):
            compile_s[v] = t
    times: dict[str, list[float]] = {v: [] for v in steps}
    rounds = tqdm(range(cfg.steps), desc="rounds", disable=not progress, leave=False)
    for _ in rounds:
        for v, step in steps.items():
            rounds.set_postfix_str(v)
            times[v].append(_timed(step))

    profiles = {v: profile_step(step, cfg.profile) for v, step in steps.items()
                 if cfg.profile and not v.endswith("compile")}
    results = {}
    floor = statistics.median(times["conv_floor"]) if "conv_floor" in times else None
    for v, ts in times.items():
        med = statistics.median(ts)
        results[v] = {"step_s": med, "images_per_s": cfg.batch / med,
                      "step_over_floor": med / floor if floor else None}
    ratios = {}
    for mine in ("bnff", "bnff+compile"):
        for other in ("eager", "compile", "bnff_libxsmm"):
            if mine in results and other in results:
                ratios[f"{mine}_vs_{other}"] = results[other]["step_s"] / results[mine]["step_s"]
    saved: dict[str, int | None] = {}
    for v, net in nets.items():
        if v.endswith("compile"):  # AOTAutograd saves its graph's tensors, weight casts included, which
            saved[v] = None  # the hook-based counter cannot tell from activations
            continue
        with _autocast(amp, device):
            saved[v] = saved_activation_bytes(net, x)
    removed = None
    if {"eager", "bnff", "conv_floor"} <= set(results):
        eager, fused = results["eager"]["step_s"], results["bnff"]["step_s"]
        removed = (eager - fused) / (eager - floor) if eager != floor else None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"config": asdict(cfg), "cpu": cpu_info(), "gpu": gpu, "results": results, "ratios": ratios,
            "overhead_removed": removed, "compile_s": compile_s, "saved_bytes": saved,
            "unfused_groups": unfused_groups, "fusable_groups": fusable, "profiles": profiles,
            "pointwise": pointwise_line, "floor_on_libxsmm": on_libxsmm}


__all__ = ["BenchConfig", "PROFILE_CATEGORIES", "VARIANTS", "alternate_steps", "profile_step", "run", "tune_malloc"]
