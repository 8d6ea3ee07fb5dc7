"""The ``cpu`` backend: the sweeps of ``reference`` as fused C++ kernels (``csrc/bnff_cpu.cpp``).

Each function has the signature and the mathematics of its ``bnff.ops.backends.reference``
counterpart and makes one pass over its feature maps (channels_last or contiguous NCHW, float32 or
bfloat16, float32 accumulation), reading a concatenation's feature maps in place. The kernels are
built with ``torch.utils.cpp_extension`` on first use, cached by torch (``TORCH_EXTENSIONS_DIR``),
and registered as ``torch.ops.bnff.*`` through ``torch.library`` (with fake implementations, so
``torch.compile`` can trace around a bnff model). A gradient in another layout than its feature
maps is converted first; a call the kernels do not cover (float64, feature maps in mixed or
non-contiguous layouts) runs the reference sweep; if the build fails, every call does and one
warning says why. Large outputs come from a workspace of reused blocks (``workspace_bytes``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from bnff.ops.backends import reference

_SOURCE = Path(__file__).parent / "csrc" / "bnff_cpu.cpp"
_ACT = {None: 0, "relu": 1, "relu6": 2}
_MAX_TERMS = 4  # BN terms or shortcuts of one call the kernels take (kMaxTerms); more run the reference
_state: dict[str, object] = {}


def _build() -> None:
    from torch.utils import cpp_extension

    flags = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-mprefer-vector-width=512"]
    cpp_extension.load(name="bnff_cpu", sources=[str(_SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                       is_python_module=False, verbose=bool(os.environ.get("BNFF_VERBOSE_BUILD")))
    _register_fakes()


def _register_fakes() -> None:
    """Shape-only implementations for torch.compile / meta tensors."""

    def fmt(t: Tensor) -> torch.memory_format:
        return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
            and not t.is_contiguous() else torch.contiguous_format

    @torch.library.register_fake("bnff::channel_stats")
    def _(x):
        return x.new_empty(x.shape[1], dtype=torch.float32), x.new_empty(x.shape[1], dtype=torch.float32)

    @torch.library.register_fake("bnff::apply")
    def _(sources, n_sources, means, f1s, betas, residuals, act, out_dtype):
        like = residuals[0] if residuals else sources[0]
        c = sum(s.shape[1] for s in sources[:n_sources[0]]) if n_sources else like.shape[1]
        return torch.empty((like.shape[0], c, like.shape[2], like.shape[3]), dtype=out_dtype, device=like.device,
                           memory_format=fmt(like))

    @torch.library.register_fake("bnff::grad_stats")
    def _(grad, a, act, sources, n_sources, means):
        c = grad.shape[1]
        vecs = [grad.new_empty(c, dtype=torch.float32) for _ in n_sources]
        return torch.empty_like(grad), vecs, [grad.new_empty(c, dtype=torch.float32) for _ in n_sources]

    @torch.library.register_fake("bnff::grad_stats_x")
    def _(grad, sources, mean, f1, beta, act, out_dtype):
        c = grad.shape[1]
        return grad.new_empty(c, dtype=torch.float32), grad.new_empty(c, dtype=torch.float32)

    @torch.library.register_fake("bnff::input_grad_x")
    def _(grad, sources, mean, f1, beta, act, out_dtype, b, s1):
        return [torch.empty_like(s) for s in sources]

    @torch.library.register_fake("bnff::input_grad")
    def _(dy, sources, mean, f1, b, s1):
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


def _layout(t: Tensor) -> str | None:
    if t.dim() != 4 or t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16):
        return None
    if t.is_contiguous():
        return "nchw" if not (t.is_contiguous(memory_format=torch.channels_last) and t.stride(1) == 1) else "nhwc"
    return "nhwc" if t.is_contiguous(memory_format=torch.channels_last) else None


def _fast(*tensors: Tensor | None) -> bool:
    """The kernels cover these tensors: 4-D CPU float32/bfloat16, one layout for all."""
    layouts = {_layout(t) for t in tensors if t is not None}
    return len(layouts) == 1 and None not in layouts and available()


def _like_layout(t: Tensor | None, ref: Tensor) -> Tensor | None:
    """``t`` in ``ref``'s layout (a copy only if it differs: e.g. the NCHW gradient an average pool
    hands back to channels_last feature maps)."""
    if t is None or _layout(t) == _layout(ref) or _layout(ref) is None:
        return t
    return t.contiguous(memory_format=torch.channels_last if _layout(ref) == "nhwc" else torch.contiguous_format)


def _one_dtype(maps: list[Tensor | None]) -> list[Tensor | None]:
    """The feature maps of one call in one dtype (the kernels are compiled per dtype): float32 copies
    of the bfloat16 ones if they are mixed (exact)."""
    if len({t.dtype for t in maps if t is not None}) <= 1:
        return maps
    return [None if t is None else t.to(torch.float32) for t in maps]


def _f32(v: Tensor) -> Tensor:
    return v.detach().to(torch.float32).contiguous()


def channel_stats(c: Tensor) -> tuple[Tensor, Tensor]:
    """``reference.channel_stats`` in one fused sweep."""
    if not _fast(c):
        return reference.channel_stats(c)
    return torch.ops.bnff.channel_stats(c)


def apply(sources: list[list[Tensor]], means: list[Tensor], f1s: list[Tensor], betas: list[Tensor | None],
          residuals: list[Tensor], act: str | None, out_dtype: torch.dtype) -> Tensor:
    """``reference.apply`` in one fused sweep."""
    flat = [s for srcs in sources for s in srcs]
    if out_dtype not in (torch.float32, torch.bfloat16) or not _fast(*flat, *residuals) \
            or max(len(sources), len(residuals)) > _MAX_TERMS:
        return reference.apply(sources, means, f1s, betas, residuals, act, out_dtype)
    maps = _one_dtype([*flat, *residuals])
    flat, residuals = maps[:len(flat)], maps[len(flat):]
    return torch.ops.bnff.apply(flat, [len(s) for s in sources], [_f32(m) for m in means], [_f32(f) for f in f1s],
                                [torch.zeros_like(_f32(f)) if b is None else _f32(b) for b, f in zip(betas, f1s)],
                                residuals, _ACT[act], out_dtype)


def grad_stats(g_a: Tensor, a: Tensor | None, act: str | None, sources: list[list[Tensor]],
               means: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``reference.grad_stats`` in one fused sweep; dy keeps ``g_a``'s dtype (dz * mask is exact in it)."""
    flat = [s for srcs in sources for s in srcs]
    if flat:
        g_a, a = _like_layout(g_a, flat[0]), _like_layout(a, flat[0])
    if not _fast(g_a, a if act is not None else None, *flat) or len(sources) > _MAX_TERMS:
        return reference.grad_stats(g_a, a, act, sources, means)
    *flat, a = _one_dtype([*flat, a])
    dy, s1s, s2cs = torch.ops.bnff.grad_stats(g_a, a if act is not None else None, _ACT[act], flat,
                                              [len(s) for s in sources], [_f32(m) for m in means])
    return dy, list(s1s), list(s2cs)


def grad_stats_x(g_a: Tensor, act: str | None, sources: list[Tensor], mean: Tensor, f1: Tensor,
                 beta: Tensor | None, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``reference.grad_stats_x`` in one sweep: reads g_a and x, writes nothing but S1, S2c."""
    g_a = _like_layout(g_a, sources[0])
    if out_dtype not in (torch.float32, torch.bfloat16) or not _fast(g_a, *sources):
        return reference.grad_stats_x(g_a, act, sources, mean, f1, beta, out_dtype)
    sources = _one_dtype(sources)
    return tuple(torch.ops.bnff.grad_stats_x(g_a, sources, _f32(mean), _f32(f1),
                                             torch.zeros_like(_f32(f1)) if beta is None else _f32(beta),
                                             _ACT[act], out_dtype))


def input_grad_x(g_a: Tensor, act: str | None, sources: list[Tensor], mean: Tensor, f1: Tensor,
                 beta: Tensor | None, out_dtype: torch.dtype, b: Tensor | None, s1: Tensor) -> list[Tensor]:
    """``reference.input_grad_x`` in one sweep: reads g_a and x, writes dx onto each source map."""
    g_a = _like_layout(g_a, sources[0])
    if out_dtype not in (torch.float32, torch.bfloat16) or not _fast(g_a, *sources):
        return reference.input_grad_x(g_a, act, sources, mean, f1, beta, out_dtype, b, s1)
    sources = _one_dtype(sources)
    return list(torch.ops.bnff.input_grad_x(g_a, sources, _f32(mean), _f32(f1),
                                            torch.zeros_like(_f32(f1)) if beta is None else _f32(beta), _ACT[act],
                                            out_dtype, None if b is None else _f32(b), _f32(s1)))


def input_grad(dy: Tensor, sources: list[Tensor], mean: Tensor, f1: Tensor, b: Tensor | None,
               s1: Tensor) -> list[Tensor]:
    """``reference.input_grad`` in one fused sweep, written straight onto each source map."""
    dy = _like_layout(dy, sources[0])
    if not _fast(dy, *sources):
        return reference.input_grad(dy, sources, mean, f1, b, s1)
    return list(torch.ops.bnff.input_grad(dy, sources, _f32(mean), _f32(f1), None if b is None else _f32(b), _f32(s1)))


__all__ = ["apply", "available", "channel_stats", "grad_stats", "grad_stats_x", "input_grad", "input_grad_x",
           "release_workspace", "workspace_bytes"]
