"""The ``cpu`` backend: the sweeps of ``reference`` as fused C++ kernels (``csrc/``: ``bnff_sweeps.h`` and its units).

Each function has the signature and the mathematics of its ``bnff.ops.backends.reference``
counterpart and makes one pass over its feature maps (channels_last or contiguous NCHW, float32 or
bfloat16, float32 accumulation), reading a concatenation's feature maps in place. The kernels are
built with ``torch.utils.cpp_extension`` on first use for ATen's instruction-set level (``isa()``),
one cache per level, torch version and compiler (``build_spec``), and registered as
``torch.ops.bnff.*`` through ``torch.library`` (with fake implementations, so ``torch.compile`` can
trace around a bnff model). A gradient in another layout than its feature maps is converted first.
float64 is not covered: it runs the reference sweeps, as does any call in mixed or non-contiguous
layouts; ``fallbacks()`` counts those by reason and ``kernel_calls()`` the kernels' own entries. A call
on CUDA tensors runs the ``triton`` backend's sweep (the routing by device, in ``_falls_back``). If
the build fails every call runs the reference and one warning says why. Large outputs come from a
workspace of reused blocks (``workspace_bytes``). The per-channel vectors between the sweeps (F1;
the backward's B, dgamma, dbeta; the running-statistics update) are one C++ call each (``scale``,
``backward_vectors``, ``running_update``), float32 only. A fused group's whole forward or backward
can also run as one C++ call (``group_forward``, ``group_backward``: the group executor of
``csrc/bnff_group.cpp``, which calls the same kernels; ``bnff.ops.fused`` decides when, with
``group_layout``; ``GROUP_EXECUTOR`` switches it off).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import struct
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from bnff import activations
from bnff.ops.backends import libxsmm, reference
from bnff.ops.backends.handover import handing_over

_CSRC = Path(__file__).parent / "csrc"
# Five translation units (the build compiles them side by side) and the header they share;
# torch rebuilds when a source changes, the header's text is part of build_spec's key
_SOURCES = [_CSRC / "bnff_group.cpp", _CSRC / "bnff_backward.cpp", _CSRC / "bnff_lone.cpp", _CSRC / "bnff_cpu.cpp",
            _CSRC / "bnff_pointwise.cpp"]
_HEADERS = [_CSRC / "bnff_sweeps.h"]
# Constants the kernels share with this module, defined here only and passed to the compiler as -D flags
# (so they are part of the build cache's key).
# The activations the kernels compute, by bnff.activations' entry name (the identity is no activation to
# them); ``act_arg`` turns a kind into the kernels' activation argument
ACT_CODES = {"identity": 0, "relu": 1, "relu6": 2, "leaky_relu": 3, "elu": 4, "celu": 5, "selu": 6, "silu": 7,
             "hardswish": 8, "hardsigmoid": 9, "sigmoid": 10, "tanh": 11, "gelu": 12, "gelu_tanh": 13, "mish": 14}
ACT_FROM_Z = 1 << 8  # the argument's bit for "the derivative is taken at the pre-activation z"
ACT_FAST_EXP = 1 << 9  # the bit the kernels set on SiLU over bfloat16 maps (csrc/bnff_sweeps.h, act_for)
LAYOUT_CODES = {"nchw": 0, "nhwc": 1}  # the layout argument of every sweep (``_layout`` decides it)
MAX_TERMS = 4  # BN terms or shortcuts of one call the kernels take; more run the reference
# The plan's step kinds the group executor (csrc/bnff_group.cpp) runs, as its program encodes them
STEP_CODES = {"apply": 0, "consume": 1, "recompute": 2, "grad_layout": 3, "consumer_backward": 4, "grad_add": 5,
              "grad_stats_x": 6, "grad_stats": 7, "input_grad": 8, "input_grad_x": 9}
SHARED_DEFINES = ([f"-DBNFF_ACT_NONE={ACT_CODES['identity']}", f"-DBNFF_ACT_FROM_Z={ACT_FROM_Z}",
                   f"-DBNFF_ACT_FAST_EXP={ACT_FAST_EXP}",
                   f"-DBNFF_SELU_ALPHA={activations.SELU_ALPHA!r}f", f"-DBNFF_SELU_SCALE={activations.SELU_SCALE!r}f"]
                  + [f"-DBNFF_ACT_{k.upper()}={v}" for k, v in ACT_CODES.items() if k != "identity"]
                  + [f"-DBNFF_LAYOUT_NHWC={LAYOUT_CODES['nhwc']}", f"-DBNFF_MAX_TERMS={MAX_TERMS}"]
                  + [f"-DBNFF_STEP_{k.upper()}={v}" for k, v in STEP_CODES.items()])
# Whether a group whose whole call the kernels cover runs as one C++ call per direction (group_forward,
# group_backward) rather than step by step in Python; BNFF_NO_GROUP_EXECUTOR=1 turns it off (A/B, debugging)
GROUP_EXECUTOR = not os.environ.get("BNFF_NO_GROUP_EXECUTOR")
_state: dict[str, object] = {}
COVERAGE = ("float32 and bfloat16 feature maps (NCHW or channels_last) with every activation of "
            "bnff.activations in the C++ kernels, a group with convolution consumers as one C++ call per "
            "direction (the group executor); float64, mixed or non-contiguous layouts in the reference sweeps "
            "(bnff.ops.backends.cpu.fallbacks() counts them by reason, kernel_calls() the kernels' own entries); "
            "CUDA tensors in the triton backend")

# ATen's vector headers (at::vec::Vectorized) choose their implementation, and the inline namespace
# that keeps it apart from libtorch's own copies, from these macros, as ATen's per-level builds do.
_ATEN_VEC = {level: [f"-DCPU_CAPABILITY={level}"] + ([f"-DCPU_CAPABILITY_{level}"] if level != "DEFAULT" else [])
             for level in ("AVX512", "AVX2", "DEFAULT")}
# Compiler flags per instruction-set level. The level is ATen's own (``isa()``), so the kernels never
# use instructions ATen itself was told not to (``ATEN_CPU_CAPABILITY``), and a cache built for one
# level is never loaded at another. ``-ffp-contract=off``: no fused multiply-add the source does not
# write, so the apply step's value (and its ReLU mask) is the same in every kernel that recomputes it.
ISA_FLAGS = {
    # AVX-512 and the bfloat16 conversion instruction (Zen 4, Sapphire Rapids): stores of bfloat16 maps
    # take one VCVTNEPS2BF16 per vector instead of an eight-instruction rounding sequence
    "avx512_bf16": ["-march=x86-64-v4", "-mavx512bf16", "-mprefer-vector-width=512", *_ATEN_VEC["AVX512"]],
    "avx512": ["-march=x86-64-v4", "-mprefer-vector-width=512", *_ATEN_VEC["AVX512"]],  # AVX-512 F/BW/CD/DQ/VL
    "avx2": ["-march=x86-64-v3", *_ATEN_VEC["AVX2"]],  # AVX2, FMA, BMI1/2
    "default": _ATEN_VEC["DEFAULT"],  # the compiler's baseline for the platform
}
_COMMON_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math"]


def isa() -> str:
    """The instruction-set level the kernels are built for: "avx512_bf16", "avx512", "avx2" or "default".

    It follows ATen's dispatch level (``torch.backends.cpu.get_cpu_capability()``, which honours
    ``ATEN_CPU_CAPABILITY``): on an x86-64 CPU with AVX-512 "avx512", or "avx512_bf16" when the CPU
    also lists the ``avx512_bf16`` flag (``bnff.machine.cpu_info``); with AVX2 "avx2"; on any other
    CPU, or when ATen is held to a lower level, the lower one.
    """
    from bnff.machine import cpu_info

    cap = torch.backends.cpu.get_cpu_capability().lower()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "default"
    if cap == "avx512" and "avx512_bf16" in cpu_info()["isa_flags"]:
        return "avx512_bf16"
    return cap if cap in ("avx512", "avx2") else "default"


def _compiler_id() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return cxx
    return f"{cxx}: {out.splitlines()[0] if out else ''}"


def build_spec(level: str | None = None) -> tuple[str, Path, list[str]]:
    """(extension name, build folder, compiler flags) of the kernels for ISA ``level`` (default ``isa()``).

    The name and folder carry the level and a hash of the flags, the torch version and the compiler,
    so each gets its own cache under torch's extension root (``TORCH_EXTENSIONS_DIR`` if set, else
    ``cpp_extension.get_default_build_root()``, ``~/.cache/torch_extensions``: torch's own rule for
    ``load``); torch rebuilds within a folder when the source changes.

    Raises:
        ValueError: ``level`` is not one of ``ISA_FLAGS``.
    """
    from torch.utils import cpp_extension

    level = isa() if level is None else level
    if level not in ISA_FLAGS:
        raise ValueError(f"unknown ISA level {level!r}; expected one of {sorted(ISA_FLAGS)}")
    flags = _COMMON_FLAGS + ISA_FLAGS[level] + SHARED_DEFINES + libxsmm.find().cflags
    headers = [h.read_bytes() for h in _HEADERS]
    key = hashlib.sha256(repr((flags, torch.__version__, _compiler_id(), sys.version_info[:2], headers)).encode()).hexdigest()
    name = f"bnff_cpu_{level}_{key[:10]}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return name, Path(root) / name, flags


def _ninja_on_path() -> None:
    """Put the ``ninja`` package's binary (a declared dependency) first on PATH: torch's builder runs
    ``ninja`` by name, and a virtual environment's bin folder is on PATH only while it is activated
    (``make test`` runs ``.venv/bin/python`` directly). Without the package, PATH is left as it is."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path


def load_extension(name: str, sources: list[str], directory: Path, flags: list[str], verbose: bool = False,
                   ldflags: tuple[str, ...] = ()) -> None:
    """Build (if needed) and load a C++ extension into ``directory``, safe against killed builds.

    torch's builder guards a folder with a ``lock`` file that a build killed midway (Ctrl-C, a
    timeout) leaves behind; every later load would then wait on it forever. Here builders first
    take an exclusive ``flock`` on a file beside the folder (the kernel drops it when its owner
    dies), so whoever holds it knows any ``lock`` file inside is stale and removes it.

    Raises:
        whatever ``torch.utils.cpp_extension.load`` raises (compiler missing, compile errors).
    """
    from torch.utils import cpp_extension

    _ninja_on_path()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.flock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            (directory / "lock").unlink(missing_ok=True)
            cpp_extension.load(name=name, sources=sources, extra_cflags=flags, extra_ldflags=["-fopenmp", *ldflags],
                               build_directory=str(directory), is_python_module=False, verbose=verbose)
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def _build() -> None:
    """Build and load the kernels; if that fails with libxsmm, warn once and build them without it (libxsmm is
    optional: a static library that does not link here must not cost the whole backend)."""
    def load() -> None:
        name, directory, flags = build_spec()
        load_extension(name, [str(p) for p in _SOURCES], directory, flags,
                       verbose=bool(os.environ.get("BNFF_VERBOSE_BUILD")), ldflags=tuple(libxsmm.find().ldflags))
        _state["library"] = directory

    try:
        load()
    except Exception as exc:
        if libxsmm.find().version is None:
            raise
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        libxsmm.disable(f"the kernels did not build with libxsmm ({why})")
        warnings.warn(f"bnff: building the cpu kernels with libxsmm failed ({why}); building them without it (no fused "
                      f"pointwise convolutions). Set BNFF_VERBOSE_BUILD=1 to see the compiler output.",
                      RuntimeWarning, stacklevel=3)
        load()
    _register_fakes()


def _register_fakes() -> None:
    """Shape-only implementations for torch.compile / meta tensors."""

    def fmt(t: Tensor) -> torch.memory_format:
        return torch.channels_last if t.dim() == 4 and _nhwc(t) else torch.contiguous_format

    @torch.library.register_fake("bnff::channel_stats")
    def _(x, layout):
        return x.new_empty(x.shape[1], dtype=torch.float32), x.new_empty(x.shape[1], dtype=torch.float32)

    @torch.library.register_fake("bnff::apply")
    def _(sources, n_sources, means, f1s, betas, residuals, act, out_dtype, layout):
        like = residuals[0] if residuals else sources[0]
        c = sum(s.shape[1] for s in sources[:n_sources[0]]) if n_sources else like.shape[1]
        return torch.empty((like.shape[0], c, like.shape[2], like.shape[3]), dtype=out_dtype, device=like.device,
                           memory_format=fmt(like))

    @torch.library.register_fake("bnff::grad_stats")
    def _(grad, a, act, sources, n_sources, means, f1s, betas, residuals, layout):
        c = grad.shape[1]
        vecs = [grad.new_empty(c, dtype=torch.float32) for _ in n_sources]
        return torch.empty_like(grad), vecs, [grad.new_empty(c, dtype=torch.float32) for _ in n_sources]

    @torch.library.register_fake("bnff::grad_stats_x")
    def _(grad, sources, mean, f1, beta, act, out_dtype, layout):
        c = grad.shape[1]
        return grad.new_empty(c, dtype=torch.float32), grad.new_empty(c, dtype=torch.float32)

    @torch.library.register_fake("bnff::input_grad_x")
    def _(grad, sources, mean, f1, beta, act, out_dtype, b, s1, layout):
        return [torch.empty_like(s) for s in sources]

    @torch.library.register_fake("bnff::scale")
    def _(var, gamma, eps):
        return torch.empty_like(var)

    @torch.library.register_fake("bnff::backward_vectors")
    def _(var, f1, s1, s2c, s2c_dx, m, eps, batch):
        return (torch.empty_like(var) if batch else None), torch.empty_like(var), torch.empty_like(var)

    @torch.library.register_fake("bnff::running_update")
    def _(rm, rv, mean, var, factor, m):
        return None

    @torch.library.register_fake("bnff::pointwise_forward")
    def _(sources, n_sources, means, f1s, betas, residuals, act, weight, stride, stats, block_rows, layout):
        like = residuals[0] if residuals else sources[0]
        h, w = (like.shape[2] - 1) // stride + 1, (like.shape[3] - 1) // stride + 1
        vec = like.new_empty(weight.shape[0] if stats else 0, dtype=torch.float32)
        return (torch.empty((like.shape[0], weight.shape[0], h, w), dtype=weight.dtype, device=like.device,
                            memory_format=torch.channels_last), vec, torch.empty_like(vec))

    @torch.library.register_fake("bnff::pointwise_backward")
    def _(sources, mean, f1, beta, act, dy, weight, wgrad, block_rows, layout):
        x = sources[0]
        c = sum(s.shape[1] for s in sources)
        vec = x.new_empty(c, dtype=torch.float32)
        return (torch.empty((x.shape[0], c, *x.shape[2:]), dtype=x.dtype, device=x.device,
                            memory_format=torch.channels_last),
                weight.new_empty((weight.shape[0] if wgrad else 0, c, 1, 1)), vec, torch.empty_like(vec))

    @torch.library.register_fake("bnff::input_grad")
    def _(dy, sources, mean, f1, b, s1, layout):
        return [torch.empty_like(s) for s in sources]


def available() -> bool:
    """Build (once per process; torch caches the binary) and load the kernels; False if that fails,
    after one warning naming the reason. ``BNFF_DISABLE_CPU=1`` skips the build."""
    if "ok" not in _state:
        if os.environ.get("BNFF_DISABLE_CPU"):
            _state["ok"], _state["why"] = False, "BNFF_DISABLE_CPU is set"
        else:
            try:
                _build()
                _state["ok"] = True
            except Exception as exc:  # compiler missing, headers missing, ...
                _state["ok"], _state["why"] = False, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                warnings.warn(f"bnff: the cpu backend's kernels could not be built ({_state['why']}); "
                              f"using the reference backend (plain PyTorch, slower). Set BNFF_VERBOSE_BUILD=1 "
                              f"to see the compiler output.", RuntimeWarning, stacklevel=2)
    return bool(_state["ok"])


def workspace_bytes() -> int:
    """Bytes the kernels' workspace holds now: freed large outputs (>= 1 MiB) kept for reuse.

    A training step allocates the same large feature maps every step; from the system allocator
    each would be fresh pages, faulted in and zeroed on first touch (glibc maps blocks over 32 MiB
    anew every time). The workspace keeps freed blocks by exact size, up to ``BNFF_WORKSPACE_BYTES``
    (default 2 GiB), so a step reuses the last one's. 0 when the kernels are not built.
    """
    return int(torch.ops.bnff.workspace_held()) if available() else 0


def release_workspace() -> int:
    """Return every block the workspace holds to the system (e.g. after training); the bytes freed.
    Tensors still in use are not affected: their blocks are freed when they die."""
    return int(torch.ops.bnff.workspace_release()) if available() else 0


def kernel_calls() -> Counter:
    """Entries into the C++ kernels so far in this process, by "sweep/layout/dtype" (layout "nhwc"
    for channels_last, "nchw"; dtype of the sweep's feature maps). Empty when they are not built."""
    if not _state.get("ok"):
        return Counter()
    keys, calls = torch.ops.bnff.kernel_calls()
    return Counter({k: int(c) for k, c in zip(keys, calls) if c})


def fallbacks() -> Counter:
    """Sweeps this backend handed to the reference (plain PyTorch) so far, by (sweep, reason).

    By design the kernels cover 4-D CPU tensors in float32 or bfloat16, all of a call in one layout
    (contiguous NCHW or channels_last), with at most 4 BN terms and 4 shortcuts; float64 (reason
    "float64") and everything else run the reference sweeps, as do all sweeps when the kernels did not
    build ("kernels not built", after one warning)."""
    return Counter(_fallbacks)


_fallbacks: Counter = Counter()


def _nhwc(t: Tensor) -> bool:
    """The layout rule, written once: a 4-D tensor is read as channels_last when it is dense in that
    format and, if it is dense in both (C == 1 or H*W == 1), when its channel stride is 1."""
    return t.is_contiguous(memory_format=torch.channels_last) and (not t.is_contiguous() or t.stride(1) == 1)


_COVERED_DTYPES = (torch.float32, torch.bfloat16)


def _layout(t: Tensor) -> str | None:
    """The layout the kernels read ``t`` in ("nchw" or "nhwc", by ``_nhwc``), or None if they cannot."""
    if t.dim() != 4 or t.dtype not in _COVERED_DTYPES or not t.is_cpu:
        return None
    if _nhwc(t):
        return "nhwc"
    return "nchw" if t.is_contiguous() else None


def _uncovered(tensors: tuple[Tensor | None, ...]) -> tuple[str | None, str | None]:
    """(why the kernels do not cover these tensors or None if they do, their common layout).

    The common case, every tensor covered and in one layout, is one ``_layout`` per tensor (this runs
    for every sweep of every group in every step); only an uncovered call is examined for its reason."""
    first = None
    for t in tensors:
        if t is not None:
            layout = _layout(t)
            if layout is None or (first is not None and layout != first):
                return _reason(tensors), None
            first = layout
    return None, first


def _reason(tensors: tuple[Tensor | None, ...]) -> str:
    """Why the kernels do not cover ``tensors`` (which ``_uncovered`` found they do not)."""
    ts = [t for t in tensors if t is not None]
    dtypes = {t.dtype for t in ts}
    if torch.float64 in dtypes:
        return "float64"
    if not dtypes.issubset(_COVERED_DTYPES):
        return "dtype " + "/".join(sorted(str(d) for d in dtypes))
    if None in {_layout(t) for t in ts}:
        return "not a 4-D CPU tensor in NCHW or channels_last"
    return "mixed layouts"


class _Uncovered(Exception):
    """Raised by ``_require`` inside a sweep the kernels do not cover; ``_falls_back`` catches it."""


class _OtherDevice(Exception):
    """Raised by ``_require`` for a call on tensors of another device than the CPU: ``_falls_back`` hands it
    to that device's backend (``bnff.ops.backends.triton``, which runs the reference where it cannot)."""


def _require(sweep: str, *tensors: Tensor | None, why: str | None = None) -> int:
    """The layout code of ``tensors`` if the kernels cover them; else count the reason (``fallbacks``),
    say it once per reason (a failed build has warned already) and raise ``_Uncovered``.
    ``why``: a reason the caller found (too many terms, an uncovered output dtype)."""
    found, layout = _uncovered(tensors)
    if found is not None and any(t is not None and not t.is_cpu for t in tensors):
        raise _OtherDevice()
    why = why or found or (None if available() else "kernels not built")
    if why is None:
        return LAYOUT_CODES[layout]
    if why != "kernels not built" and not any(reason == why for _, reason in _fallbacks):
        warnings.warn(f"bnff: the cpu backend hands sweeps to the reference backend (plain PyTorch, slower) "
                      f"because of: {why}. Its kernels cover 4-D float32/bfloat16 maps in NCHW or channels_last, "
                      f"at most {MAX_TERMS} BN terms and shortcuts. Said once per reason; "
                      f"bnff.ops.backends.cpu.fallbacks() counts them.", RuntimeWarning, stacklevel=4)
    _fallbacks[(sweep, why)] += 1
    raise _Uncovered(why)


def _triton():
    from bnff.ops.backends import triton

    return triton


def _falls_back(sweep: Callable) -> Callable:
    """The one fallback: a sweep whose kernels do not cover its call (``_require`` raised) runs its
    ``reference`` namesake on the same arguments; a call on another device's tensors (CUDA) its ``triton``
    namesake (the one routing by device: a model restructured on the CPU and moved to a GPU trains there)."""
    return handing_over(sweep, {_Uncovered: lambda: reference, _OtherDevice: _triton})


def act_why(act: str | None) -> str | None:
    """Why the kernels do not compute activation ``act``, or None when they do (``ACT_CODES``)."""
    s = activations.spec(act)
    return None if s is None or s.entry.name in ACT_CODES else f"activation {act} (not in the kernels' ACT_CODES)"


def act_arg(act: str | None) -> int:
    """The kernels' activation argument for kind ``act`` (csrc/bnff_sweeps.h reads it): its code
    (``ACT_CODES``) in bits 0-7, ``ACT_FROM_Z`` when the table says its derivative reads the
    pre-activation z, its parameter (LeakyReLU's slope, ELU's and CELU's alpha) as float32 bits in bits
    32-63. No activation and the identity are 0; ReLU and ReLU6 their bare codes."""
    s = activations.spec(act)
    if s is None:
        return 0
    arg = ACT_CODES[s.entry.name] | (ACT_FROM_Z if s.reads == "z" else 0)
    if s.param is not None:
        arg |= struct.unpack("<I", struct.pack("<f", s.param))[0] << 32
    return arg - (1 << 64) if arg >= 1 << 63 else arg  # an int64 (a negative slope sets bit 63)


def _terms_why(n: int) -> str | None:
    return f"more than {MAX_TERMS} BN terms or shortcuts" if n > MAX_TERMS else None


def _out_why(out_dtype: torch.dtype) -> str | None:
    return None if out_dtype in (torch.float32, torch.bfloat16) else ("float64" if out_dtype == torch.float64
                                                                       else f"output dtype {out_dtype}")


def _like_layout(t: Tensor | None, ref: Tensor) -> Tensor | None:
    """``t`` in ``ref``'s layout (a copy only if it differs: e.g. the NCHW gradient an average pool
    hands back to channels_last feature maps)."""
    if t is None:
        return t
    want = _layout(ref)
    if want is None or _layout(t) == want:
        return t
    return t.contiguous(memory_format=torch.channels_last if want == "nhwc" else torch.contiguous_format)


def _one_dtype(maps: list[Tensor | None]) -> list[Tensor | None]:
    """The feature maps of one call in one dtype (the kernels are compiled per dtype): float32 copies
    of the bfloat16 ones if they are mixed (exact)."""
    if len({t.dtype for t in maps if t is not None}) <= 1:
        return maps
    return [None if t is None else t.to(torch.float32) for t in maps]


def _f32(v: Tensor) -> Tensor:
    """A per-channel vector as the kernels read it: contiguous float32 (a copy only if it is not;
    the sweeps run without autograd, so it need not be detached)."""
    return v if v.dtype == torch.float32 and v.is_contiguous() else v.detach().to(torch.float32).contiguous()


def _beta(beta: Tensor | None, f1: Tensor) -> Tensor:
    """A BN term's beta as the kernels read it (``_f32``): zeros without an affine BN."""
    return torch.zeros_like(_f32(f1)) if beta is None else _f32(beta)


def dense_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` in the layout of the feature map ``like`` (NCHW or channels_last), copied only if it is not
    (a channel slice of a concatenation's gradient), so the kernels read it as it is."""
    return _like_layout(t, like)


@_falls_back
def channel_stats(c: Tensor) -> tuple[Tensor, Tensor]:
    """``reference.channel_stats`` in one fused sweep."""
    layout = _require("channel_stats", c)  # first: it loads the kernels that torch.ops.bnff then names
    return torch.ops.bnff.channel_stats(c, layout)


@_falls_back
def apply(sources: list[list[Tensor]], means: list[Tensor], f1s: list[Tensor], betas: list[Tensor | None],
          residuals: list[Tensor], act: str | None, out_dtype: torch.dtype) -> Tensor:
    """``reference.apply`` in one fused sweep."""
    flat = [s for srcs in sources for s in srcs]
    if flat:  # a shortcut that is a channel slice (a part of a split) is copied dense, as grad_stats does
        residuals = [_like_layout(r, flat[0]) for r in residuals]
    layout = _require("apply", *flat, *residuals,
                      why=act_why(act) or _out_why(out_dtype) or _terms_why(max(len(sources), len(residuals))))
    maps = _one_dtype([*flat, *residuals])
    flat, residuals = maps[:len(flat)], maps[len(flat):]
    return torch.ops.bnff.apply(flat, [len(s) for s in sources], [_f32(m) for m in means], [_f32(f) for f in f1s],
                                [_beta(b, f) for b, f in zip(betas, f1s)],
                                residuals, act_arg(act), out_dtype, layout)


@_falls_back
def grad_stats(g_a: Tensor, a: Tensor | None, act: str | None, sources: list[list[Tensor]],
               means: list[Tensor], f1s: list[Tensor] | None = None, betas: list[Tensor | None] | None = None,
               residuals: list[Tensor] = ()) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``reference.grad_stats`` in one fused sweep; dy keeps ``g_a``'s dtype. The derivative reads ``a``
    or, for an activation whose derivative reads z, the pre-activation recomputed in the sweep from
    the terms' sources, ``f1s``, ``betas`` and the shortcuts ``residuals``."""
    flat = [s for srcs in sources for s in srcs]
    reads = activations.reads(act)
    a = a if reads == "a" else None
    residuals = list(residuals) if reads == "z" else []
    if flat:
        g_a, a = _like_layout(g_a, flat[0]), _like_layout(a, flat[0])
        residuals = [_like_layout(r, flat[0]) for r in residuals]
    layout = _require("grad_stats", g_a, a, *flat, *residuals,
                      why=act_why(act) or _terms_why(max(len(sources), len(residuals))))
    maps = _one_dtype([*flat, a, *residuals])
    flat, a, residuals = maps[:len(flat)], maps[len(flat)], maps[len(flat) + 1:]
    at_z = reads == "z"
    dy, s1s, s2cs = torch.ops.bnff.grad_stats(
        g_a, a, act_arg(act), flat, [len(s) for s in sources], [_f32(m) for m in means],
        [_f32(f) for f in f1s] if at_z else [],
        [_beta(b, f) for b, f in zip(betas, f1s)] if at_z else [],
        residuals, layout)
    return dy, list(s1s), list(s2cs)


@_falls_back
def grad_stats_x(g_a: Tensor, act: str | None, sources: list[Tensor], mean: Tensor, f1: Tensor,
                 beta: Tensor | None, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``reference.grad_stats_x`` in one sweep: reads g_a and x, writes nothing but S1, S2c."""
    g_a = _like_layout(g_a, sources[0])
    layout = _require("grad_stats_x", g_a, *sources, why=act_why(act) or _out_why(out_dtype))
    sources = _one_dtype(sources)
    return tuple(torch.ops.bnff.grad_stats_x(g_a, sources, _f32(mean), _f32(f1),
                                             _beta(beta, f1),
                                             act_arg(act), out_dtype, layout))


@_falls_back
def input_grad_x(g_a: Tensor, act: str | None, sources: list[Tensor], mean: Tensor, f1: Tensor,
                 beta: Tensor | None, out_dtype: torch.dtype, b: Tensor | None, s1: Tensor) -> list[Tensor]:
    """``reference.input_grad_x`` in one sweep: reads g_a and x, writes dx onto each source map."""
    g_a = _like_layout(g_a, sources[0])
    layout = _require("input_grad_x", g_a, *sources, why=act_why(act) or _out_why(out_dtype))
    sources = _one_dtype(sources)
    return list(torch.ops.bnff.input_grad_x(g_a, sources, _f32(mean), _f32(f1),
                                            _beta(beta, f1), act_arg(act),
                                            out_dtype, None if b is None else _f32(b), _f32(s1), layout))


@_falls_back
def input_grad(dy: Tensor, sources: list[Tensor], mean: Tensor, f1: Tensor, b: Tensor | None,
               s1: Tensor) -> list[Tensor]:
    """``reference.input_grad`` in one fused sweep, written straight onto each source map."""
    dy = _like_layout(dy, sources[0])
    layout = _require("input_grad", dy, *sources)
    return list(torch.ops.bnff.input_grad(dy, sources, _f32(mean), _f32(f1), None if b is None else _f32(b), _f32(s1),
                                          layout))


def group_layout(maps: list[Tensor], means: list[Tensor], out_dtype: torch.dtype, n_terms: int, n_residuals: int) -> int | None:
    """The layout code of a group call the group executor covers, else None (its steps then run one by
    one, each sweep covered or handed to the reference on its own, and counted there).

    Covered: the executor is on (``GROUP_EXECUTOR``) and the kernels built; the feature maps ``maps``
    (every BN term's sources, then the shortcuts) of one dtype, float32 or bfloat16, which is also
    ``out_dtype``, in one layout (``_layout``); float32 means; at most ``MAX_TERMS`` BN terms and shortcuts.
    """
    if not (GROUP_EXECUTOR and available()) or max(n_terms, n_residuals) > MAX_TERMS:
        return None
    if any(t.dtype != out_dtype for t in maps) or any(m.dtype != torch.float32 for m in means):
        return None
    why, layout = _uncovered(tuple(maps))
    return None if why is not None or layout is None else LAYOUT_CODES[layout]


def group_forward(flat: list[Tensor | None], terms: tuple[int, ...], residuals: tuple[int, int], convs: tuple[int, ...],
                  steps: tuple[int, ...], act: str | None, eps: list[float], out_dtype: torch.dtype,
                  layout: int) -> list[Tensor]:
    """A group's forward steps in one C++ call (csrc/bnff_group.cpp; the integers are ``bnff.ops.fused``'s
    program of the group's plan): ``[a, *the consumers' outputs]``."""
    return torch.ops.bnff.group_forward.default(flat, terms, residuals, convs, steps, act_arg(act), eps, out_dtype,
                                                layout)


def group_backward(flat: list[Tensor | None], a: Tensor | None, grad_outs: list[Tensor | None], terms: tuple[int, ...],
                   residuals: tuple[int, int], convs: tuple[int, ...], steps: tuple[int, ...], act: str | None,
                   eps: list[float], batch: list[bool], needs: list[bool], per_consumer: bool, out_dtype: torch.dtype,
                   layout: int) -> list[Tensor | None]:
    """A group's backward steps in one C++ call: a gradient (or None) per entry of ``flat``."""
    return torch.ops.bnff.group_backward.default(flat, a, grad_outs, terms, residuals, convs, steps, act_arg(act), eps,
                                                 [int(b) for b in batch], [int(n) for n in needs], per_consumer,
                                                 out_dtype, layout)


def pointwise_why(dtype: torch.dtype | None = None) -> str | None:
    """Why the fused pointwise convolution (``pointwise_forward``) cannot run here, or None when it can:
    the kernels did not build, or were built without libxsmm (``libxsmm.find().why``), or libxsmm has
    no GEMM kernel of ``dtype`` (float32 or bfloat16; None: either) at its target (bfloat16 below AVX-512)."""
    if not available():
        return "kernels not built"
    if libxsmm.find().why is not None:
        return libxsmm.find().why
    target = pointwise_target()
    if dtype is None:
        return None
    has = _state.setdefault("pointwise_has", {})  # asked once per dtype: this runs on every fused group's call
    if dtype not in has:
        has[dtype] = bool(torch.ops.bnff.pointwise_has(dtype))
    return None if has[dtype] else f"libxsmm has no {str(dtype).removeprefix('torch.')} GEMM kernel at target {target}"



def pointwise_target() -> str | None:
    """libxsmm's target architecture for the micro-kernels ("cpx", "skx", "hsw", ...: held to ``isa()``'s
    level by ``libxsmm.TARGETS`` unless LIBXSMM_TARGET is set), or None without libxsmm."""
    if not available() or libxsmm.find().why is not None:
        return None
    if "target" not in _state:
        _state["target"] = str(torch.ops.bnff.pointwise_target(libxsmm.TARGETS[isa()]))
    return str(_state["target"])


def pointwise_covers(maps: list[Tensor], weight: Tensor) -> bool:
    """Whether ``pointwise_forward`` runs a call with these feature maps (every BN term's sources and the
    shortcuts; for ``pointwise_backward`` the BN input and dy) and this weight here: every map a
    channels_last CPU tensor of one dtype, float32 or bfloat16; the weight float32 with float32 maps,
    or bfloat16 with even channel counts (libxsmm's VNNI pairs); libxsmm with a GEMM of the weight's
    dtype (``pointwise_why``)."""
    if not maps or len({m.dtype for m in maps}) != 1 or any(_layout(m) != "nhwc" for m in maps):
        return False
    if weight.dtype not in _COVERED_DTYPES or (weight.dtype == torch.float32 and maps[0].dtype != torch.float32):
        return False
    if weight.dtype == torch.bfloat16 and (weight.shape[0] % 2 or weight.shape[1] % 2):
        return False
    return pointwise_why(weight.dtype) is None


def pointwise_forward(sources: list[list[Tensor]], means: list[Tensor], f1s: list[Tensor], betas: list[Tensor | None],
                      residuals: list[Tensor], act: str | None, weight: Tensor, stride: int = 1, stats: bool = False,
                      block_rows: int = 0) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """A 1x1 convolution of a fused group's result, the result never written (csrc/bnff_pointwise.cpp).

    ``y = conv2d(a, weight, stride=stride)`` with ``a = act(sum_k BN_k(sources_k) + sum_j residuals_j)``
    (the apply step of ``reference.apply``: the same arguments and bits), computed in blocks of
    ``block_rows`` output rows (0: sized for the L2 cache) on libxsmm's micro-kernels, and, with
    ``stats``, y's per-channel mean and biased variance (``channel_stats`` of y) from each block while
    it is in cache. With no BN term, one shortcut and no activation it is the plain libxsmm 1x1
    convolution of that shortcut.

    Args:
        sources, means, f1s, betas, residuals, act: as ``reference.apply``; every map (N, C, H, W)
            channels_last, one dtype, float32 or bfloat16.
        weight: (C_out, C, 1, 1), float32 (with float32 maps) or bfloat16 (a is rounded to bfloat16
            as autocast's cast would, then multiplied with float32 accumulation). Any layout: it is
            packed per call (C_out * C elements).
        stride: the convolution's stride (both dimensions); no padding, no bias, one group.
        stats: also return y's mean and biased variance, each (C_out,) float32; else None, None.
        block_rows: output rows per block (0: sized so a block's a and y fit in about 256 KiB).
    Returns:
        (y (N, C_out, H_out, W_out) channels_last in weight's dtype, mean or None, var or None).
    Raises:
        RuntimeError: ``pointwise_why()`` is not None (the message names it), or the call is outside
            what the kernel takes (the message names the argument), or libxsmm has no kernel of this
            dtype for the CPU (bfloat16 below AVX-512).
    """
    why = pointwise_why(weight.dtype)  # (first: libxsmm set to its target before any kernel is generated)
    if why is not None:
        raise RuntimeError(f"bnff: the fused pointwise convolution is unavailable: {why}")
    flat = [s for srcs in sources for s in srcs]
    maps = [*flat, *residuals]
    if any(_layout(t) != "nhwc" for t in maps) or len({t.dtype for t in maps}) != 1:
        raise RuntimeError("bnff pointwise: every feature map must be a channels_last float32 or bfloat16 CPU tensor "
                           "of one dtype")
    y, mean, var = torch.ops.bnff.pointwise_forward(
        flat, [len(s) for s in sources], [_f32(m) for m in means], [_f32(f) for f in f1s],
        [_beta(b, f) for b, f in zip(betas, f1s)], residuals, act_arg(act), weight.detach().contiguous(), stride,
        stats, block_rows, LAYOUT_CODES["nhwc"])
    return (y, mean, var) if stats else (y, None, None)


def pointwise_backward(sources: list[Tensor], mean: Tensor, f1: Tensor, beta: Tensor | None, act: str | None,
                       dy: Tensor, weight: Tensor, wgrad: bool = True,
                       block_rows: int = 0) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """The backward of a lone fused group's 1x1 consumer (stride 1) with the group's ``grad_stats_x``,
    a never written (csrc/bnff_pointwise.cpp; the plan's ``pointwise_backward`` step).

    Per block of ``block_rows`` rows (0: sized for the L2 cache and the weight gradient's partial):
    ``g = conv2d's data gradient of dy`` (written), S1 and S2 of the lone BN from g and x as
    ``grad_stats_x`` forms them (the mask recomputed from x), a recomputed from x as the apply step
    forms it (the same bits) and the weight gradient ``sum over rows of dy^T a`` (float32 sums).

    Args:
        sources: the BN's input feature maps (N, C_j, H, W), channels_last, whose channel concatenation
            (C channels) the BN normalizes; float32 or bfloat16.
        mean, f1, beta, act: the BN's mean, F1 (``scale``) and beta (C,) and the group's activation, as
            ``grad_stats_x`` takes them; mean None (with f1, beta and act None, one source): no BN, the plain
            convolution backward of the source (``libxsmm_conv_backward``), S1 and S2 zeros.
        dy: dL/dy of the convolution's output (N, C_out, H, W), channels_last, the maps' dtype.
        weight: (C_out, C, 1, 1), the maps' dtype (bfloat16: even C and C_out).
        wgrad: also form the weight gradient (else None).
        block_rows: rows per block (0: automatic).
    Returns:
        (g (N, C, H, W) channels_last = dL/da, dW (C_out, C, 1, 1) in weight's dtype or None, S1 (C,),
        S2c (C,)): S1, S2c float32 as ``grad_stats_x`` returns them.
    Raises:
        RuntimeError: ``pointwise_why()`` is not None, or the arguments are outside what the kernel takes
            (the message names which).
    """
    why = pointwise_why(weight.dtype)
    if why is not None:
        raise RuntimeError(f"bnff: the fused pointwise convolution is unavailable: {why}")
    if any(_layout(t) != "nhwc" for t in (*sources, dy)):
        raise RuntimeError("bnff pointwise_backward: the BN inputs and dy must be channels_last CPU tensors")
    vecs = (None, None, None) if mean is None else (_f32(mean), _f32(f1), _beta(beta, f1))
    g, dw, s1, s2c = torch.ops.bnff.pointwise_backward(
        list(sources), *vecs, act_arg(act), dy, weight.detach().contiguous(), wgrad, block_rows, LAYOUT_CODES["nhwc"])
    return g, (dw if wgrad else None), s1, s2c


def libxsmm_conv(x: Tensor, weight: Tensor, stride: int = 1) -> Tensor:
    """The plain 1x1 convolution ``conv2d(x, weight, stride=stride)`` on libxsmm's micro-kernels
    (``pointwise_forward`` of x alone): the libxsmm half of ``bnff bench``'s conv floor and of
    ``BNFF_POINTWISE=libxsmm``. x (N, C, H, W) channels_last; weight (C_out, C, 1, 1) of x's dtype, or
    bfloat16. Returns (N, C_out, H_out, W_out) channels_last. Raises as ``pointwise_forward``."""
    return pointwise_forward([], [], [], [], [x], None, weight, stride)[0]


def libxsmm_conv_backward(x: Tensor, dy: Tensor, weight: Tensor, wgrad: bool = True) -> tuple[Tensor, Tensor | None]:
    """The plain 1x1 convolution's backward (stride 1) on libxsmm: (dgrad (N, C, H, W) channels_last,
    wgrad (C_out, C, 1, 1) or None), ``pointwise_backward`` without a BN. x, dy channels_last, x, dy and
    weight of one dtype. Raises as ``pointwise_backward``."""
    g, dw, _, _ = pointwise_backward([x], None, None, None, None, dy, weight, wgrad)
    return g, dw


def _float32(*vectors: Tensor | None) -> bool:
    """Whether the vector kernels take these per-channel vectors: float32 (float64 ones, of a float64
    model, and CUDA ones run the reference's; not counted in ``fallbacks``, which counts sweeps over feature
    maps)."""
    return available() and all(v is None or (v.dtype == torch.float32 and v.is_cpu) for v in vectors)


def scale(var: Tensor, gamma: Tensor | None, eps: float) -> Tensor:
    """``reference.scale`` (F1) in one call."""
    if not _float32(var):
        return reference.scale(var, gamma, eps)
    return torch.ops.bnff.scale(var.contiguous(), gamma, eps)


def backward_vectors(var: Tensor, f1: Tensor, s1: Tensor, s2c: Tensor, s2c_dx: Tensor, m: int, eps: float,
                     batch: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """``reference.backward_vectors`` (B, dgamma, dbeta) in one call."""
    if not _float32(var, f1, s1, s2c, s2c_dx):
        return reference.backward_vectors(var, f1, s1, s2c, s2c_dx, m, eps, batch)
    return tuple(torch.ops.bnff.backward_vectors(var.contiguous(), f1, s1, s2c, s2c_dx, m, eps, batch))


def running_update(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, factor: float, m: int) -> None:
    """``reference.running_update`` in one call (the same formula; the last bit may differ, see the C++)."""
    if not _float32(running_mean, running_var, mean, var):
        return reference.running_update(running_mean, running_var, mean, var, factor, m)
    torch.ops.bnff.running_update(running_mean, running_var, mean, var, factor, m)


__all__ = ["COVERAGE", "ISA_FLAGS", "apply", "available", "build_spec", "channel_stats", "dense_like", "fallbacks", "grad_stats", "grad_stats_x",
           "input_grad", "input_grad_x", "isa", "kernel_calls", "libxsmm_conv", "libxsmm_conv_backward", "pointwise_backward", "pointwise_covers", "pointwise_forward", "pointwise_target", "pointwise_why", "group_layout", "group_forward", "group_backward", "load_extension", "release_workspace", "scale",
           "backward_vectors", "running_update", "workspace_bytes"]
