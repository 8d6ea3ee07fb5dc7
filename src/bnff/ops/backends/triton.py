"""The ``triton`` backend: the sweeps of ``reference`` as Triton kernels, for CUDA tensors.

Each sweep has the signature and the mathematics of its ``bnff.ops.backends.reference`` counterpart and
makes one pass over its feature maps (``triton_kernels``; reductions add one small kernel that merges
per-program partials in a fixed order: deterministic, no atomics). Feature maps may be in any layout
whose H and W merge into one stride (NCHW, channels_last and channel slices of either; others are copied
first), float32, bfloat16 or float16, mixed within a call; arithmetic is float32. A concatenation's
sources are read in place: a call runs once per channel segment over which every BN term reads one
source. It is the sweep backend of CUDA tensors when Triton is importable: ``restructure``'s default
(``bnff.ops.backends.default``) on a machine whose cpu kernels do not build, and where the ``cpu`` backend
meets a CUDA tensor, it hands the call here (``cpu``'s one routing by device). On CPU tensors the kernels
run in Triton's interpreter when ``TRITON_INTERPRET=1`` is set before Triton is first imported (how CI
tests them); otherwise CPU tensors, float64, more than ``MAX_TERMS`` BN terms or shortcuts, other devices
and, when Triton is missing, everything run the reference sweeps, one warning per reason
(``fallbacks()`` counts them). ``kernel_calls()`` counts the kernels' own entries.

The per-channel vector steps (F1, the backward's B, dgamma, dbeta, the running-statistics update) are
``reference``'s (a few element-wise ops on (C,) vectors, on the tensors' own device).

Under ``torch.compile`` each sweep is called through a custom operator (``torch.ops.bnff_triton.*``) with
a fake implementation, so the compiler traces the restructured model around the Triton kernels.
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from typing import Callable

import torch
from torch import Tensor

from bnff import activations
from bnff.ops.backends import reference
from bnff.ops.backends.cpu import ACT_CODES
from bnff.ops.backends.handover import handing_over

MAX_TERMS = 2  # BN terms of one call (a projection shortcut's BN is the second); more run the reference
MAX_RESIDUALS = 2  # identity shortcuts of one call
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # triton_kernels' F32, BF16, F16
_COVERS = ("CUDA tensors (and CPU tensors under TRITON_INTERPRET=1) in float32, bfloat16 or float16, any layout "
           "whose H and W merge (NCHW, channels_last), every activation of bnff.activations, at most "
           f"{MAX_TERMS} BN terms and {MAX_RESIDUALS} shortcuts per group")
COVERAGE = (f"{_COVERS} in Triton kernels; float64, CPU tensors "
            "without the interpreter and larger groups in the reference sweeps (bnff.ops.backends.triton.fallbacks() "
            "counts them by reason, kernel_calls() the kernels' own entries)")

_state: dict[str, object] = {}
_calls: Counter = Counter()
_fallbacks: Counter = Counter()


def _kernels():
    """``triton_kernels``, imported on first use (None when Triton is not importable; ``_state["why"]``)."""
    if "kernels" not in _state:
        try:
            from bnff.ops.backends import triton_kernels
            _state["kernels"] = triton_kernels
        except Exception as exc:  # ImportError, or a Triton that does not load here
            _state["kernels"] = None
            _state["why"] = f"triton is not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return _state["kernels"]


def why_not(device: torch.device) -> str | None:
    """Why the kernels cannot run on tensors of ``device``, or None when they can: Triton importable, and
    a CUDA device, or the CPU under the interpreter (``triton_kernels.INTERPRETED``: ``TRITON_INTERPRET=1``
    when the kernels were first imported)."""
    if _kernels() is None:
        return str(_state["why"])
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return None if _kernels().INTERPRETED else ("CPU tensors (Triton compiles for GPUs; TRITON_INTERPRET=1 runs "
                                                    "its kernels on CPU tensors in its interpreter)")
    return f"{device.type} tensors"


def available(device: str | torch.device = "cuda") -> bool:
    """Whether the kernels run on tensors of ``device`` here (``why_not`` is None); "cuda" also needs a
    CUDA device."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return False
    return why_not(device) is None


def kernel_calls() -> Counter:
    """Entries into the Triton kernels so far in this process, by "sweep/layout/dtype" (layout "nhwc"
    when the first map's channels are contiguous, else "nchw"; dtype of that map)."""
    return Counter(_calls)


def fallbacks() -> Counter:
    """Sweeps this backend handed to the reference so far, by (sweep, reason)."""
    return Counter(_fallbacks)


class _Uncovered(Exception):
    """Raised by ``_require`` inside a sweep the kernels do not cover; ``_falls_back`` catches it."""


def _require(sweep: str, maps: list[Tensor], why: str | None = None) -> None:
    """Return if the kernels cover a call on ``maps`` (every feature map of it); else count and say the
    reason once (``fallbacks``) and raise ``_Uncovered``. ``why``: a reason the caller found."""
    if why is None:
        devices = {t.device for t in maps}
        if len(devices) != 1:
            why = "tensors on several devices"
        elif any(t.dtype == torch.float64 for t in maps):
            why = "float64"
        elif any(t.dtype not in _DTYPES for t in maps):
            why = "dtype " + "/".join(sorted({str(t.dtype) for t in maps}))
        elif any(t.dim() != 4 for t in maps):
            why = "not a 4-D feature map"
        else:
            why = why_not(maps[0].device)
    if why is None:
        _calls[f"{sweep}/{'nhwc' if maps[0].stride(1) == 1 else 'nchw'}/{str(maps[0].dtype).removeprefix('torch.')}"] += 1
        return
    if not any(reason == why for _, reason in _fallbacks):
        warnings.warn(f"bnff: the triton backend hands sweeps to the reference backend (plain PyTorch) because of: "
                      f"{why}. Its kernels cover {_COVERS}. Said once per reason; "
                      f"bnff.ops.backends.triton.fallbacks() counts them.", RuntimeWarning, stacklevel=4)
    _fallbacks[(sweep, why)] += 1
    raise _Uncovered(why)


def _falls_back(sweep: Callable) -> Callable:
    """The one fallback: a sweep the kernels do not cover runs its ``reference`` namesake."""
    return handing_over(sweep, {_Uncovered: lambda: reference})


# -- launch geometry ------------------------------------------------------------------------------------

def _strided(t: Tensor) -> tuple[Tensor, int, int, int]:
    """(t, sN, sC, sHW): a map whose H and W merge into one stride (a copy of one whose do not)."""
    n, c, h, w = t.shape
    if not (h == 1 or w == 1 or t.stride(2) == w * t.stride(3)):
        t = t.contiguous()
    return t, t.stride(0), t.stride(1), t.stride(3) if w > 1 else t.stride(2)


def _flat(maps: list[tuple[Tensor, int, int, int]]) -> bool:
    """Whether every map's rows (n, h, w) lie at one stride (sN = H*W*sHW: channels_last, or N == 1)."""
    return all(t.shape[0] == 1 or s0 == t.shape[2] * t.shape[3] * s2 for t, s0, _, s2 in maps)


def _blocks(first: Tensor, c: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of a tile of about 2048 elements, long along the map's contiguous dimension; in
    the interpreter, whose cost is per program, of up to 16384 elements and every channel up to 256."""
    import triton

    if _kernels().INTERPRETED:
        bc = min(256, triton.next_power_of_2(c))
        m = first.shape[0] * first.shape[2] * first.shape[3]
        return max(16, min(triton.next_power_of_2(m), 16384 // bc)), bc
    if first.stride(1) == 1:
        bc = min(64, triton.next_power_of_2(c))
        return max(16, 2048 // bc), bc
    bc = min(4, triton.next_power_of_2(c))
    return 2048 // bc, bc


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device) -> int:
    """How many programs a reduction spreads over: 4 per multiprocessor, 4 under the interpreter."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _split(m: int, c_blocks: int, block_r: int, device: torch.device) -> tuple[int, int]:
    """(rows per program, programs) of a reduction over ``m`` rows: a multiple of ``block_r``; fixed by the
    shape and the device, so the sums' order (and bits) is the same every step."""
    want = max(1, _programs(device) // c_blocks)
    rows = -(-(-(-m // want)) // block_r) * block_r
    return rows, -(-m // rows)


def _act(act: str | None) -> tuple[int, bool, float, float, float]:
    """(code, from z, p0, p1, p2) of activation ``act`` for the kernels: LeakyReLU's slope in p0, the ELU
    family's (alpha * scale, scale, input scale) as aten::elu (and the cpu kernels) form them."""
    s = activations.spec(act)
    if s is None or s.entry.name == "identity":
        return 0, False, 0.0, 0.0, 0.0
    name, p = s.entry.name, s.param
    if name in ("elu", "celu", "selu"):
        alpha, scale, input_scale = activations.elu_args(name, p)
        params = (alpha * scale, scale, input_scale)
    else:
        params = (p, 0.0, 0.0) if name == "leaky_relu" else (0.0, 0.0, 0.0)
    return (ACT_CODES[name], s.reads == "z", *params)


def _vec(v: Tensor, c0: int, c1: int) -> Tensor:
    """Channels [c0, c1) of a per-channel vector as the kernels read it: float32, contiguous."""
    v = v[c0:c1]
    return v if v.dtype == torch.float32 and v.is_contiguous() else v.detach().to(torch.float32).contiguous()


def _segments(sources: list[list[Tensor]], c: int) -> list[tuple[int, int]]:
    """The channel segments [c0, c1) of ``c`` channels over which every BN term reads one source: cut
    wherever some term passes from one source to the next."""
    cuts = {0, c}
    for srcs in sources:
        at = 0
        for s in srcs:
            at += s.shape[1]
            cuts.add(at)
    cuts = sorted(cuts)
    return list(zip(cuts[:-1], cuts[1:]))


def _piece(srcs: list[Tensor], c0: int, c1: int) -> Tensor:
    """Channels [c0, c1) of a term's input, a view of the one source that holds them all."""
    at = 0
    for s in srcs:
        if at <= c0 and c1 <= at + s.shape[1]:
            return s.narrow(1, c0 - at, c1 - c0)
        at += s.shape[1]
    raise AssertionError("a channel segment spans two sources")  # _segments makes none


def _out_like(like: Tensor, c: int, dtype: torch.dtype) -> Tensor:
    """An (N, c, H, W) map of ``dtype`` in ``like``'s memory format (channels_last when its channels are the
    contiguous dimension)."""
    fmt = torch.channels_last if like.stride(1) == 1 and c > 1 and not like.is_contiguous() else torch.contiguous_format
    return torch.empty((like.shape[0], c, like.shape[2], like.shape[3]), dtype=dtype, device=like.device,
                       memory_format=fmt)


class _Group:
    """A call's BN terms and shortcuts cut to one channel segment, as the kernels' arguments (up to
    ``MAX_TERMS`` terms, ``MAX_RESIDUALS`` shortcuts; unused slots repeat the first map with strides 0)."""

    def __init__(self, sources, means, f1s, betas, residuals, c0: int, c1: int, dummy: Tensor) -> None:
        self.maps: list[tuple[Tensor, int, int, int]] = []
        args: list = []
        zero = (dummy, 0, 0, 0)
        for k in range(MAX_TERMS):
            if k < len(sources):
                x = _strided(_piece(sources[k], c0, c1))
                f1 = _vec(f1s[k], c0, c1)
                beta = torch.zeros_like(f1) if betas[k] is None else _vec(betas[k], c0, c1)
                self.maps.append(x)
                args += [*x, _vec(means[k], c0, c1), f1, beta]
            else:
                args += [*zero, dummy, dummy, dummy]
        for j in range(MAX_RESIDUALS):
            if j < len(residuals):
                r = _strided(residuals[j].narrow(1, c0, c1 - c0))
                self.maps.append(r)
                args += list(r)
            else:
                args += list(zero)
        self.args = args
        self.n_terms, self.n_res = len(sources), len(residuals)


def _launch(kernel, grid, *args, **meta) -> None:
    kernel[grid](*args, enable_fp_fusion=False, **meta)


# -- the sweeps (plain functions; ``_op`` calls them through custom operators under torch.compile) ---------

def _channel_stats(c: Tensor) -> tuple[Tensor, Tensor]:
    k = _kernels()
    x = _strided(c)
    m, ch, hw = c.shape[0] * c.shape[2] * c.shape[3], c.shape[1], c.shape[2] * c.shape[3]
    br, bc = _blocks(c, ch)
    cb = -(-ch // bc)
    rows, p = _split(m, cb, br, c.device)
    part_mean = torch.empty((p, ch), dtype=torch.float32, device=c.device)
    part_m2 = torch.empty_like(part_mean)
    # separate tensors: a custom operator's outputs may not alias each other (torch.compile)
    mean, var, shift = (torch.empty(ch, dtype=torch.float32, device=c.device) for _ in range(3))
    _launch(k.stats_partial, (p, cb), *x, shift, part_mean, part_m2, m, ch, hw, rows, FLAT=_flat([x]), BLOCK_R=br,
            BLOCK_C=bc)
    _launch(k.stats_merge, (-(-ch // 128),), shift, part_mean, part_m2, mean, var, p, m, ch, rows, BLOCK_C=128)
    return mean, var


def _apply(sources: list[list[Tensor]], means, f1s, betas, residuals, act: str | None, out_dtype: torch.dtype) -> Tensor:
    k = _kernels()
    like = (sources[0] if sources else residuals)[0]
    c = sum(s.shape[1] for s in sources[0]) if sources else like.shape[1]
    out = _out_like(like, c, out_dtype)
    code, _, p0, p1, p2 = _act(act)
    n, h, w = like.shape[0], like.shape[2], like.shape[3]
    for c0, c1 in _segments(sources, c):
        grp = _Group(sources, means, f1s, betas, residuals, c0, c1, out)
        o = _strided(out.narrow(1, c0, c1 - c0))
        br, bc = _blocks(grp.maps[0][0], c1 - c0)
        _launch(k.apply, (-(-(n * h * w) // br), -(-(c1 - c0) // bc)), *o, *grp.args, n * h * w, c1 - c0, h * w,
                p0, p1, p2, N_TERMS=grp.n_terms, N_RES=grp.n_res, ACT=code, OUT=OUT_KINDS[out_dtype],
                FLAT=_flat([o, *grp.maps]), BLOCK_R=br, BLOCK_C=bc)
    return out


def _reduce(g: Tensor, t: Tensor | None, t_from: int, dy: Tensor | None, sources, means, f1s, betas, residuals,
            act: str | None, out_dtype: torch.dtype) -> tuple[Tensor, list[Tensor]]:
    """The backward's statistics sweep (``triton_kernels.grad_stats``) over every channel segment:
    (S1, [S2c_k]), each (C,) float32, dy written into ``dy`` when given."""
    k = _kernels()
    code, from_z, p0, p1, p2 = _act(act)
    n, c, h, w = g.shape
    m = n * h * w
    s1s, s2s = [], [[] for _ in sources]
    for c0, c1 in _segments(sources, c):
        cc = c1 - c0
        grp = _Group(sources, means, f1s, betas, residuals, c0, c1, g)
        gs = _strided(g.narrow(1, c0, cc))
        ts = _strided(t.narrow(1, c0, cc)) if t is not None else (g, 0, 0, 0)
        ds = _strided(dy.narrow(1, c0, cc)) if dy is not None else (g, 0, 0, 0)
        br, bc = _blocks(g, cc)
        cb = -(-cc // bc)
        rows, p = _split(m, cb, br, g.device)
        parts = torch.empty((3, p, cc), dtype=torch.float32, device=g.device)
        maps = [gs, *grp.maps] + ([ts] if t is not None else []) + ([ds] if dy is not None else [])
        _launch(k.grad_stats, (p, cb), *gs, *ts, *ds, parts[0], parts[1], parts[2], *grp.args, m, cc, h * w, p0, p1, p2,
                rows, N_TERMS=grp.n_terms, N_RES=grp.n_res, ACT=code, FROM_Z=from_z, T_FROM=t_from,
                OUT=OUT_KINDS[out_dtype], WRITE_DY=dy is not None, DY=OUT_KINDS[dy.dtype] if dy is not None else 0,
                FLAT=_flat(maps), BLOCK_R=br, BLOCK_C=bc)
        sums = [torch.empty(cc, dtype=torch.float32, device=g.device) for _ in range(3)]
        for i in range(1 + len(sources)):
            _launch(k.sum_merge, (-(-cc // 128),), parts[i], sums[i], p, cc, float(m), BLOCK_C=128)
        s1s.append(sums[0])
        for j in range(len(sources)):
            s2s[j].append(sums[1 + j])
    cat = lambda v: v[0] if len(v) == 1 else torch.cat(v)  # noqa: E731
    return cat(s1s), [cat(v) for v in s2s]


def _t_from(act: str | None, recompute: bool) -> int:
    """What ``triton_kernels.grad_stats`` takes the derivative from (its T_NONE, T_LOADED, T_A, T_Z)."""
    reads = activations.reads(act)
    return 0 if reads is None else 3 if reads == "z" else 2 if recompute else 1


def _grad_stats(g_a: Tensor, a: Tensor | None, act: str | None, sources, means, f1s, betas,
                residuals) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    dy = torch.empty_like(g_a)
    t_from = _t_from(act, False)
    s1, s2s = _reduce(g_a, a if t_from == 1 else None, t_from, dy, sources, means, f1s, betas, residuals, act,
                      g_a.dtype)
    return dy, [s1] + [s1.clone() for _ in sources[1:]], s2s  # one S1 per term, not aliases of one tensor


def _grad_stats_x(g_a: Tensor, act: str | None, sources: list[Tensor], mean: Tensor, f1: Tensor, beta: Tensor | None,
                  out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    s1, (s2c,) = _reduce(g_a, None, _t_from(act, True), None, [sources], [mean], [f1], [beta], [], act, out_dtype)
    return s1, s2c


def _input_grad(grad: Tensor, from_g: bool, act: str | None, sources: list[Tensor], mean: Tensor, f1: Tensor,
                beta: Tensor | None, out_dtype: torch.dtype, b: Tensor | None, s1: Tensor) -> list[Tensor]:
    k = _kernels()
    code, from_z, p0, p1, p2 = _act(act if from_g else None)
    n, _, h, w = grad.shape
    dxs, at = [], 0
    for x in sources:
        c0, c1 = at, at + x.shape[1]
        at = c1
        dx = torch.empty_like(x)
        o, gs, xs = _strided(dx), _strided(grad.narrow(1, c0, c1 - c0)), _strided(x)
        f = _vec(f1, c0, c1)
        bt = torch.zeros_like(f) if beta is None else _vec(beta, c0, c1)
        bv = f if b is None else _vec(b, c0, c1)
        br, bc = _blocks(x, c1 - c0)
        _launch(k.input_grad, (-(-(n * h * w) // br), -(-(c1 - c0) // bc)), *o, *gs, *xs, _vec(mean, c0, c1), f, bt,
                bv, _vec(s1, c0, c1), n * h * w, c1 - c0, h * w, p0, p1, p2, HAS_B=b is not None, FROM_G=from_g,
                ACT=code, FROM_Z=from_z, OUT=OUT_KINDS.get(out_dtype, 0), DX=OUT_KINDS[x.dtype],
                FLAT=_flat([o, gs, xs]), BLOCK_R=br, BLOCK_C=bc)
        dxs.append(dx)
    return dxs


# -- the Backend protocol ------------------------------------------------------------------------------

def _covered_out(out_dtype: torch.dtype) -> str | None:
    return None if out_dtype in _DTYPES else ("float64" if out_dtype == torch.float64 else f"output dtype {out_dtype}")


def _groups_why(n_terms: int, n_res: int) -> str | None:
    if n_terms > MAX_TERMS or n_res > MAX_RESIDUALS:
        return f"more than {MAX_TERMS} BN terms or {MAX_RESIDUALS} shortcuts"
    return None


def dense_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` as the sweeps need it beside ``like``: the kernels read any layout whose H and W merge, so ``t``."""
    return t


@_falls_back
def channel_stats(c: Tensor) -> tuple[Tensor, Tensor]:
    """``reference.channel_stats`` in one sweep (Welford partials per program, Chan-merged in order) and a
    merge kernel; (mean, var) float32 (C,)."""
    _require("channel_stats", [c])
    return _op("channel_stats")(c)


@_falls_back
def apply(sources: list[list[Tensor]], means: list[Tensor], f1s: list[Tensor], betas: list[Tensor | None],
          residuals: list[Tensor], act: str | None, out_dtype: torch.dtype) -> Tensor:
    """``reference.apply`` in one sweep (per channel segment of a concatenation)."""
    flat = [s for srcs in sources for s in srcs]
    _require("apply", flat + list(residuals),
             why=_groups_why(len(sources), len(residuals)) or _covered_out(out_dtype))
    return _op("apply")(flat, [len(s) for s in sources], list(means), list(f1s), _betas(betas, f1s), list(residuals),
                        act or "", out_dtype)


@_falls_back
def grad_stats(g_a: Tensor, a: Tensor | None, act: str | None, sources: list[list[Tensor]],
               means: list[Tensor], f1s: list[Tensor] | None = None, betas: list[Tensor | None] | None = None,
               residuals: list[Tensor] = ()) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``reference.grad_stats`` in one sweep; dy keeps ``g_a``'s dtype (as the cpu backend's)."""
    flat = [s for srcs in sources for s in srcs]
    f1s = list(f1s) if f1s is not None else [torch.ones_like(m) for m in means]  # read only for a z-reading act
    betas = list(betas) if betas is not None else [None] * len(means)
    residuals = list(residuals) if activations.reads(act) == "z" else []  # read (and kept) only to recompute z
    _require("grad_stats", [g_a, *flat, *residuals] + ([a] if a is not None else []),
             why=_groups_why(len(sources), len(residuals)))
    dy, s1, s2 = _op("grad_stats")(g_a, a, act or "", flat, [len(s) for s in sources], list(means), f1s,
                                   _betas(betas, f1s), list(residuals))
    return dy, list(s1), list(s2)


@_falls_back
def grad_stats_x(g_a: Tensor, act: str | None, sources: list[Tensor], mean: Tensor, f1: Tensor,
                 beta: Tensor | None, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``reference.grad_stats_x`` in one sweep, the derivative recomputed from x (the forward's bits)."""
    _require("grad_stats_x", [g_a, *sources], why=_covered_out(out_dtype))
    return tuple(_op("grad_stats_x")(g_a, list(sources), mean, f1, _beta(beta, f1), act or "", out_dtype))


@_falls_back
def input_grad_x(g_a: Tensor, act: str | None, sources: list[Tensor], mean: Tensor, f1: Tensor,
                 beta: Tensor | None, out_dtype: torch.dtype, b: Tensor | None, s1: Tensor) -> list[Tensor]:
    """``reference.input_grad_x`` in one sweep per source: reads g_a and x, writes dx."""
    _require("input_grad_x", [g_a, *sources], why=_covered_out(out_dtype))
    return list(_op("input_grad_x")(g_a, list(sources), mean, f1, _beta(beta, f1), act or "", out_dtype, b, s1))


@_falls_back
def input_grad(dy: Tensor, sources: list[Tensor], mean: Tensor, f1: Tensor, b: Tensor | None,
               s1: Tensor) -> list[Tensor]:
    """``reference.input_grad`` in one sweep per source, written onto each source's dtype and layout."""
    _require("input_grad", [dy, *sources])
    return list(_op("input_grad")(dy, list(sources), mean, f1, b, s1))


def _beta(beta: Tensor | None, f1: Tensor) -> Tensor:
    return torch.zeros_like(f1, dtype=torch.float32) if beta is None else beta


def _betas(betas: list[Tensor | None], f1s: list[Tensor]) -> list[Tensor]:
    return [_beta(b, f) for b, f in zip(betas, f1s)]


scale = reference.scale
backward_vectors = reference.backward_vectors
running_update = reference.running_update


# -- custom operators for torch.compile ------------------------------------------------------------------

def _split_sources(flat: list[Tensor], n_sources: list[int]) -> list[list[Tensor]]:
    out, i = [], 0
    for n in n_sources:
        out.append(flat[i:i + n])
        i += n
    return out


def _impl_apply(flat, n_sources, means, f1s, betas, residuals, act, out_dtype):
    return _apply(_split_sources(flat, n_sources), means, f1s, betas, residuals, act or None, out_dtype)


def _impl_grad_stats(g_a, a, act, flat, n_sources, means, f1s, betas, residuals):
    dy, s1, s2 = _grad_stats(g_a, a, act or None, _split_sources(flat, n_sources), means, f1s, betas, residuals)
    return dy, s1, s2


def _impl_grad_stats_x(g_a, sources, mean, f1, beta, act, out_dtype):
    return _grad_stats_x(g_a, act or None, sources, mean, f1, beta, out_dtype)


def _impl_input_grad_x(g_a, sources, mean, f1, beta, act, out_dtype, b, s1):
    return _input_grad(g_a, True, act or None, sources, mean, f1, beta, out_dtype, b, s1)


def _impl_input_grad(dy, sources, mean, f1, b, s1):
    return _input_grad(dy, False, None, sources, mean, f1, None, dy.dtype, b, s1)


_IMPLS = {"channel_stats": _channel_stats, "apply": _impl_apply, "grad_stats": _impl_grad_stats,
          "grad_stats_x": _impl_grad_stats_x, "input_grad_x": _impl_input_grad_x, "input_grad": _impl_input_grad}


def _op(name: str) -> Callable:
    """The sweep's implementation: the plain function, or under ``torch.compile`` its custom operator."""
    if torch.compiler.is_compiling():
        _register_ops()
        return getattr(torch.ops.bnff_triton, name)
    return _IMPLS[name]


def _register_ops() -> None:
    """Register ``torch.ops.bnff_triton.*`` (the sweeps as opaque operators) and their fake (shape-only)
    implementations, once."""
    if _state.get("ops"):
        return
    _state["ops"] = True
    from torch.library import custom_op, register_fake

    f32 = torch.float32
    ops = {
        "channel_stats": "(Tensor c) -> (Tensor, Tensor)",
        "apply": "(Tensor[] flat, int[] n_sources, Tensor[] means, Tensor[] f1s, Tensor[] betas, Tensor[] residuals, "
                 "str act, ScalarType out_dtype) -> Tensor",
        "grad_stats": "(Tensor g_a, Tensor? a, str act, Tensor[] flat, int[] n_sources, Tensor[] means, Tensor[] f1s, "
                      "Tensor[] betas, Tensor[] residuals) -> (Tensor, Tensor[], Tensor[])",
        "grad_stats_x": "(Tensor g_a, Tensor[] sources, Tensor mean, Tensor f1, Tensor beta, str act, "
                        "ScalarType out_dtype) -> (Tensor, Tensor)",
        "input_grad_x": "(Tensor g_a, Tensor[] sources, Tensor mean, Tensor f1, Tensor beta, str act, "
                        "ScalarType out_dtype, Tensor? b, Tensor s1) -> Tensor[]",
        "input_grad": "(Tensor dy, Tensor[] sources, Tensor mean, Tensor f1, Tensor? b, Tensor s1) -> Tensor[]",
    }
    for name, schema in ops.items():
        custom_op(f"bnff_triton::{name}", _IMPLS[name], mutates_args=(), schema=schema)

    def vec(t: Tensor, c: int) -> Tensor:
        return t.new_empty(c, dtype=f32)

    register_fake("bnff_triton::channel_stats")(lambda c: (vec(c, c.shape[1]), vec(c, c.shape[1])))

    @register_fake("bnff_triton::apply")
    def _(flat, n_sources, means, f1s, betas, residuals, act, out_dtype):
        like = flat[0] if flat else residuals[0]
        c = sum(s.shape[1] for s in flat[:n_sources[0]]) if n_sources else like.shape[1]
        return _out_like(like, c, out_dtype)

    @register_fake("bnff_triton::grad_stats")
    def _(g_a, a, act, flat, n_sources, means, f1s, betas, residuals):
        c = g_a.shape[1]
        return torch.empty_like(g_a), [vec(g_a, c) for _ in n_sources], [vec(g_a, c) for _ in n_sources]

    register_fake("bnff_triton::grad_stats_x")(
        lambda g_a, sources, mean, f1, beta, act, out_dtype: (vec(g_a, g_a.shape[1]), vec(g_a, g_a.shape[1])))
    register_fake("bnff_triton::input_grad_x")(
        lambda g_a, sources, mean, f1, beta, act, out_dtype, b, s1: [torch.empty_like(s) for s in sources])
    register_fake("bnff_triton::input_grad")(lambda dy, sources, mean, f1, b, s1: [torch.empty_like(s) for s in sources])


__all__ = ["COVERAGE", "MAX_RESIDUALS", "MAX_TERMS", "apply", "available", "backward_vectors", "channel_stats",
           "dense_like", "fallbacks", "grad_stats", "grad_stats_x", "input_grad", "input_grad_x",
           "kernel_calls", "running_update", "scale", "why_not"]
