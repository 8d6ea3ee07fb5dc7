"""The Triton kernels of the ``triton`` backend (``bnff.ops.backends.triton`` launches them).

Imported on first use, after ``TRITON_INTERPRET`` is read: with ``TRITON_INTERPRET=1`` Triton runs these
kernels in its interpreter (numpy, on CPU tensors), which is how CI tests them without a GPU.

Every kernel sees a feature map (N, C, H, W) as rows r = (n, h, w) (M = N*H*W of them) by channels, with
the map's own strides: element (r, c) lies at n*sN + (h*W + w)*sHW + c*sC, which covers NCHW (sHW = 1),
channels_last (sC = 1) and channel slices of either; ``FLAT`` (every map of the call has sN = H*W*sHW, as
channels_last maps do) drops the division into n and h*W + w. Values are loaded into float32 and every
operation is float32 (the interpreter does not compute in bfloat16 or float16), written as the source
says: the host launches with ``enable_fp_fusion=False``, so no multiply-add is contracted, and the
activation table's exponentials, erf and tanh are libdevice's (correctly rounded to within an ulp or two)
when compiled, numpy's under the interpreter. Stores into bfloat16 round to nearest even with integer
operations (``_round``), the same bits in the interpreter (whose own cast truncates) and on a GPU.

The formulas are those of ``reference`` (seed 002 eq. 1, 9, 12, 16-20 in centred form; ``bn_math``) and,
for the activations, those of the cpu kernels (``csrc/bnff_sweeps.h``, namespace ``act``, which follow
ATen's): one ``_act_fwd`` and one ``_act_grad`` serve the apply sweep and every recompute, so the
backward's mask and derivative come from the very bits the forward stored. Reductions are deterministic:
each program reduces a fixed range of rows into a partial per channel (Welford means and M2 merged by
Chan's formula for the statistics, float32 sums for S1 and S2c), and one more kernel merges the partials
in program order. No atomics.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not INTERPRETED:
    from triton.language.extra import libdevice
_EXACT = tl.constexpr(not INTERPRETED)  # libdevice's functions (the interpreter has only tl.math's)
# The kernels' helper functions: Triton device functions when compiled; plain Python under the interpreter,
# which runs a kernel as Python with triton.language patched, and would otherwise patch it again on every
# helper call (about 1 ms each: most of a launch's cost there). The same source either way.
_device_fn = (lambda fn: fn) if INTERPRETED else triton.jit

# activation codes: bnff.ops.backends.cpu.ACT_CODES (the host passes them; the numbers are the same)
# (a kernel reads only constexpr globals)
_RELU, _RELU6, _LEAKY, _ELU, _CELU, _SELU, _SILU = (tl.constexpr(i) for i in range(1, 8))
_HARDSWISH, _HARDSIGMOID, _SIGMOID, _TANH, _GELU, _GELU_TANH, _MISH = (tl.constexpr(i) for i in range(8, 15))
# output kinds of _round: float32, bfloat16, float16 (the host's OUT_KINDS)
F32, BF16, F16 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


# -- elementary functions ---------------------------------------------------------------------------

@_device_fn
def _exp(x):
    if _EXACT:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@_device_fn
def _expm1(x):
    if _EXACT:
        y = libdevice.expm1(x)
    else:  # Kahan's form from exp and log (exact where exp and log are correctly rounded)
        u = tl.exp(x)
        um1 = u - 1.0
        y = tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * x / tl.log(tl.where((u == 1.0) | (u == 0.0), 2.0, u))))
        y = tl.where(x > 80.0, u, y)
    return y


@_device_fn
def _log1p(x):
    if _EXACT:
        y = libdevice.log1p(x)
    else:  # Kahan's form
        u = x + 1.0
        y = tl.where(u == 1.0, x, tl.log(u) * x / tl.where(u == 1.0, 1.0, u - 1.0))
        y = tl.where(x > 1e30, tl.log(x), y)
    return y


@_device_fn
def _tanh(x):
    if _EXACT:
        y = libdevice.tanh(x)
    else:  # Cephes' tanhf: an odd polynomial below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above, the sign put back
        ax = tl.abs(x)
        z = x * x
        small = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
                 - 3.33332819422e-1) * z * x + x
        big = 1.0 - 2.0 / (tl.exp(2.0 * tl.minimum(ax, 44.0)) + 1.0)
        y = tl.where(ax < 0.625, small, tl.where(x < 0.0, -big, big))
    return y


@_device_fn
def _erf(x):
    if _EXACT:
        y = libdevice.erf(x)
    else:
        y = tl.math.erf(x)
    return y


# -- the activation table (csrc/bnff_sweeps.h, namespace act) ------------------------------------------

@_device_fn
def _act_fwd(z, ACT: tl.constexpr, p0, p1, p2):
    """a = f(z); p0, p1, p2: LeakyReLU's slope, or the ELU family's (alpha * scale, scale, input scale)."""
    a = z
    if ACT == _RELU:
        a = tl.where(z < 0.0, 0.0, z)
    elif ACT == _RELU6:
        a = tl.where(z < 0.0, 0.0, tl.where(z > 6.0, 6.0, z))
    elif ACT == _LEAKY:
        a = tl.where(z > 0.0, z, z * p0)
    elif ACT == _ELU or ACT == _CELU or ACT == _SELU:
        a = tl.where(z > 0.0, z * p1, _expm1(z * p2) * p0)
    elif ACT == _SILU:
        a = z / (1.0 + _exp(-z))
    elif ACT == _HARDSWISH:
        a = z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    elif ACT == _HARDSIGMOID:
        a = tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    elif ACT == _SIGMOID:
        a = 1.0 / (1.0 + _exp(-z))
    elif ACT == _TANH:
        a = _tanh(z)
    elif ACT == _GELU:
        a = z * 0.5 * (1.0 + _erf(z * 0.7071067811865476))
    elif ACT == _GELU_TANH:
        a = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * (z * z * z))))
    elif ACT == _MISH:
        a = z * _tanh(_log1p(_exp(z)))
    return a


@_device_fn
def _act_grad(g, t, ACT: tl.constexpr, FROM_Z: tl.constexpr, p0, p1, p2):
    """dy = g * f'(t), t the output a or (``FROM_Z``) the pre-activation z, as the table says."""
    dy = g
    if ACT == _RELU:
        dy = tl.where(t > 0.0, g, 0.0)
    elif ACT == _RELU6:
        dy = tl.where((t > 0.0) & (t < 6.0), g, 0.0)
    elif ACT == _LEAKY:
        dy = tl.where(t > 0.0, g, g * p0)
    elif ACT == _ELU or ACT == _CELU or ACT == _SELU:
        if FROM_Z:
            neg = g * p2 * p0 * _exp(t * p2)
        else:
            neg = g * p2 * (t + p0)
        dy = tl.where(t > 0.0, g * p1, neg)
    elif ACT == _SILU:
        s = 1.0 / (1.0 + _exp(-t))
        dy = g * s * (1.0 + t * (1.0 - s))
    elif ACT == _HARDSWISH:
        dy = tl.where(t <= -3.0, 0.0, tl.where(t < 3.0, g * (t / 3.0 + 0.5), g))
    elif ACT == _HARDSIGMOID:
        dy = tl.where((t > -3.0) & (t < 3.0), g * 0.16666666666666666, 0.0)
    elif ACT == _SIGMOID:
        dy = g * (1.0 - t) * t
    elif ACT == _TANH:
        dy = g * (1.0 - t * t)
    elif ACT == _GELU:
        cdf = 0.5 * (1.0 + _erf(t * 0.7071067811865476))
        pdf = 0.3989422804014327 * _exp(t * t * -0.5)
        dy = g * (cdf + t * pdf)
    elif ACT == _GELU_TANH:
        sq = t * t
        th = _tanh(0.7978845608028654 * (t + 0.044715 * (sq * t)))
        dy = g * (0.5 * (1.0 + th) + 0.5 * t * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * sq))
    elif ACT == _MISH:
        s = 1.0 / (1.0 + _exp(-t))
        ts = _tanh(_log1p(_exp(t)))
        dy = g * (ts + t * s * (1.0 - ts * ts))
    return dy


@_device_fn
def _round(v, KIND: tl.constexpr):
    """float32 ``v`` as a value of the output kind (F32, BF16, F16), rounded to nearest even."""
    if KIND == BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        r = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif KIND == F16:
        r = v.to(tl.float16)
    else:
        r = v
    return r


# -- addressing ---------------------------------------------------------------------------------------

@_device_fn
def _at(ptr, rows, cols, HW, sN, sC, sHW, FLAT: tl.constexpr):
    """Pointers of elements (rows [R, 1], cols [1, C]) of a map with strides sN, sC, sHW."""
    if FLAT:
        off = rows * sHW + cols * sC
    else:
        n = rows // HW
        off = n * sN + (rows - n * HW) * sHW + cols * sC
    return ptr + off


@_device_fn
def _tile(r0, c0, M, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    cols = (c0 + tl.arange(0, BLOCK_C))[None, :]
    return rows, cols, (rows < M) & (cols < C), cols < C


@_device_fn
def _rows_of_program(M, C, ROWS, BLOCK_C: tl.constexpr):
    """A reduction program (p, cb)'s share: p, its first channel c0, its rows [start, end) and its
    channels (cols [1, BLOCK_C], cmask)."""
    p = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    start = p * ROWS
    cols = (c0 + tl.arange(0, BLOCK_C))[None, :]
    return p, c0, start, tl.minimum(start + ROWS, M), cols, cols < C


@_device_fn
def _term(x, xs0, xs1, xs2, mu, f1, beta, rows, cols, mask, cmask, HW, FLAT: tl.constexpr):
    """One BN term F1 (x - mu) + beta (reference.term's form) over a tile."""
    v = tl.load(_at(x, rows, cols, HW, xs0, xs1, xs2, FLAT), mask=mask, other=0.0).to(tl.float32)
    m = tl.load(mu + cols, mask=cmask, other=0.0)
    f = tl.load(f1 + cols, mask=cmask, other=0.0)
    b = tl.load(beta + cols, mask=cmask, other=0.0)
    return (v - m) * f + b


@_device_fn
def _preact(x0, x0s0, x0s1, x0s2, mu0, f0, b0, x1, x1s0, x1s1, x1s2, mu1, f1, b1,
            r0, r0s0, r0s1, r0s2, r1, r1s0, r1s1, r1s2, rows, cols, mask, cmask, HW,
            N_TERMS: tl.constexpr, N_RES: tl.constexpr, FLAT: tl.constexpr):
    """z = sum_k [F1_k (x_k - mu_k) + beta_k] + sum_j r_j in float32 (reference._preact's order)."""
    if N_TERMS > 0:
        z = _term(x0, x0s0, x0s1, x0s2, mu0, f0, b0, rows, cols, mask, cmask, HW, FLAT)
        if N_TERMS > 1:
            z = z + _term(x1, x1s0, x1s1, x1s2, mu1, f1, b1, rows, cols, mask, cmask, HW, FLAT)
        if N_RES > 0:
            z = z + tl.load(_at(r0, rows, cols, HW, r0s0, r0s1, r0s2, FLAT), mask=mask, other=0.0).to(tl.float32)
    else:
        z = tl.load(_at(r0, rows, cols, HW, r0s0, r0s1, r0s2, FLAT), mask=mask, other=0.0).to(tl.float32)
    if N_RES > 1:
        z = z + tl.load(_at(r1, rows, cols, HW, r1s0, r1s1, r1s2, FLAT), mask=mask, other=0.0).to(tl.float32)
    return z


@_device_fn
def _chan(n, mean, m2, cnt, b_mean, b_m2):
    """(count, mean, M2) of a set of n values merged with a block of cnt values (Chan, Golub and LeVeque
    1979, the pairwise update)."""
    tot = n + cnt
    delta = b_mean - mean
    return tot, mean + delta * (cnt / tot), m2 + b_m2 + delta * delta * (n * cnt / tot)


# -- the sweeps -----------------------------------------------------------------------------------------

@triton.jit
def stats_partial(x, xs0, xs1, xs2, shift, part_mean, part_m2, M, C, HW, ROWS,
                  FLAT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (p, cb): mean and M2 of rows [p*ROWS, (p+1)*ROWS) per channel, of the values less a
    shift (row 0's value, which program 0 stores in ``shift``: the sums then carry the spread, not
    the mean, so a mean 10^4 times the standard deviation costs no digits), tile by tile (exact
    two-pass per tile, merged by Chan's formula), into part_mean[p, c], part_m2[p, c]."""
    p, c0, start, end, cols, cmask = _rows_of_program(M, C, ROWS, BLOCK_C)
    zero = tl.zeros((1, 1), tl.int64)
    k = tl.load(_at(x, zero, cols, HW, xs0, xs1, xs2, FLAT), mask=cmask, other=0.0).to(tl.float32)
    if p == 0:
        tl.store(shift + cols, k, mask=cmask)
    n = 0.0
    mean = tl.zeros((1, BLOCK_C), tl.float32)
    m2 = tl.zeros((1, BLOCK_C), tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
        mask = (rows < end) & cmask
        v = tl.load(_at(x, rows, cols, HW, xs0, xs1, xs2, FLAT), mask=mask, other=0.0).to(tl.float32) - k
        cnt = tl.minimum(end - r0, BLOCK_R).to(tl.float32)
        t_mean = tl.sum(tl.where(mask, v, 0.0), axis=0)[None, :] / cnt
        d = tl.where(mask, v - t_mean, 0.0)
        t_m2 = tl.sum(d * d, axis=0)[None, :]
        n, mean, m2 = _chan(n, mean, m2, cnt, t_mean, t_m2)
    out = p * C + cols
    tl.store(part_mean + out, mean, mask=cmask)
    tl.store(part_m2 + out, m2, mask=cmask)


@triton.jit
def stats_merge(shift, part_mean, part_m2, mean_out, var_out, P, M, C, ROWS, BLOCK_C: tl.constexpr):
    """Per channel: the P partials merged by Chan's formula in program order; mean = shift + their mean,
    var = M2 / M (biased)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    n = 0.0
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for p in range(0, P):
        cnt = tl.minimum(M - p * ROWS, ROWS).to(tl.float32)
        pm = tl.load(part_mean + p * C + cols, mask=cmask, other=0.0)
        pq = tl.load(part_m2 + p * C + cols, mask=cmask, other=0.0)
        n, mean, m2 = _chan(n, mean, m2, cnt, pm, pq)
    tl.store(mean_out + cols, tl.load(shift + cols, mask=cmask, other=0.0) + mean, mask=cmask)
    tl.store(var_out + cols, m2 / n, mask=cmask)


@triton.jit
def apply(out, os0, os1, os2, x0, x0s0, x0s1, x0s2, mu0, f0, b0, x1, x1s0, x1s1, x1s2, mu1, f1, b1,
          r0, r0s0, r0s1, r0s2, r1, r1s0, r1s1, r1s2, M, C, HW, p0, p1, p2,
          N_TERMS: tl.constexpr, N_RES: tl.constexpr, ACT: tl.constexpr, OUT: tl.constexpr,
          FLAT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """a = act(sum_k BN_k(x_k) + sum_j r_j), stored in the output kind ``OUT``."""
    rows, cols, mask, cmask = _tile(tl.program_id(0) * BLOCK_R, tl.program_id(1) * BLOCK_C, M, C, BLOCK_R, BLOCK_C)
    z = _preact(x0, x0s0, x0s1, x0s2, mu0, f0, b0, x1, x1s0, x1s1, x1s2, mu1, f1, b1,
                r0, r0s0, r0s1, r0s2, r1, r1s0, r1s1, r1s2, rows, cols, mask, cmask, HW, N_TERMS, N_RES, FLAT)
    a = _act_fwd(z, ACT, p0, p1, p2)
    tl.store(_at(out, rows, cols, HW, os0, os1, os2, FLAT), _round(a, OUT), mask=mask)


# what the derivative reads (grad_stats' T_FROM): nothing, the saved a, a recomputed (rounded to OUT as
# the forward stored it) or z recomputed
T_NONE, T_LOADED, T_A, T_Z = (tl.constexpr(i) for i in range(4))


@triton.jit
def grad_stats(g, gs0, gs1, gs2, t, ts0, ts1, ts2, dy, ds0, ds1, ds2, part_s1, part_s2a, part_s2b,
               x0, x0s0, x0s1, x0s2, mu0, f0, b0, x1, x1s0, x1s1, x1s2, mu1, f1, b1,
               r0, r0s0, r0s1, r0s2, r1, r1s0, r1s1, r1s2, M, C, HW, p0, p1, p2, ROWS,
               N_TERMS: tl.constexpr, N_RES: tl.constexpr, ACT: tl.constexpr, FROM_Z: tl.constexpr,
               T_FROM: tl.constexpr, OUT: tl.constexpr, WRITE_DY: tl.constexpr, DY: tl.constexpr,
               FLAT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (p, cb) over rows [p*ROWS, (p+1)*ROWS): dy = g * f'(t) (written in kind ``DY`` when
    ``WRITE_DY``), and partial sums of dy and, per BN term, of dy * (x_k - mu_k)."""
    p, c0, start, end, cols, cmask = _rows_of_program(M, C, ROWS, BLOCK_C)
    s1 = tl.zeros((BLOCK_C,), tl.float32)
    s2a = tl.zeros((BLOCK_C,), tl.float32)
    s2b = tl.zeros((BLOCK_C,), tl.float32)
    m0 = tl.load(mu0 + cols, mask=cmask, other=0.0)
    m1 = tl.load(mu1 + cols, mask=cmask, other=0.0)
    for r in range(start, end, BLOCK_R):
        rows = (r + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
        mask = (rows < end) & cmask
        gv = tl.load(_at(g, rows, cols, HW, gs0, gs1, gs2, FLAT), mask=mask, other=0.0).to(tl.float32)
        if T_FROM == T_LOADED:
            tv = tl.load(_at(t, rows, cols, HW, ts0, ts1, ts2, FLAT), mask=mask, other=0.0).to(tl.float32)
            d = _act_grad(gv, tv, ACT, FROM_Z, p0, p1, p2)
        elif T_FROM == T_A or T_FROM == T_Z:
            z = _preact(x0, x0s0, x0s1, x0s2, mu0, f0, b0, x1, x1s0, x1s1, x1s2, mu1, f1, b1,
                        r0, r0s0, r0s1, r0s2, r1, r1s0, r1s1, r1s2, rows, cols, mask, cmask, HW, N_TERMS, N_RES, FLAT)
            if T_FROM == T_A:
                tv = _round(_act_fwd(z, ACT, p0, p1, p2), OUT).to(tl.float32)
            else:
                tv = z
            d = _act_grad(gv, tv, ACT, FROM_Z, p0, p1, p2)
        else:
            d = gv
        d = tl.where(mask, d, 0.0)
        if WRITE_DY:
            tl.store(_at(dy, rows, cols, HW, ds0, ds1, ds2, FLAT), _round(d, DY), mask=mask)
        s1 += tl.sum(d, axis=0)
        if N_TERMS > 0:
            v0 = tl.load(_at(x0, rows, cols, HW, x0s0, x0s1, x0s2, FLAT), mask=mask, other=0.0).to(tl.float32)
            s2a += tl.sum(d * (v0 - m0), axis=0)
        if N_TERMS > 1:
            v1 = tl.load(_at(x1, rows, cols, HW, x1s0, x1s1, x1s2, FLAT), mask=mask, other=0.0).to(tl.float32)
            s2b += tl.sum(d * (v1 - m1), axis=0)
    out = p * C + c0 + tl.arange(0, BLOCK_C)
    om = (c0 + tl.arange(0, BLOCK_C)) < C
    tl.store(part_s1 + out, s1, mask=om)
    tl.store(part_s2a + out, s2a, mask=om)
    tl.store(part_s2b + out, s2b, mask=om)


@triton.jit
def sum_merge(part, out, P, C, m, BLOCK_C: tl.constexpr):
    """out[c] = (sum over p in order of part[p, c]) / m."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    s = tl.zeros((BLOCK_C,), tl.float32)
    for p in range(0, P):
        s += tl.load(part + p * C + cols, mask=cmask, other=0.0)
    tl.store(out + cols, s / m, mask=cmask)


@triton.jit
def input_grad(dx, dxs0, dxs1, dxs2, dy, ds0, ds1, ds2, x, xs0, xs1, xs2, mu, f1, beta, bvec, s1,
               M, C, HW, p0, p1, p2, HAS_B: tl.constexpr, FROM_G: tl.constexpr, ACT: tl.constexpr,
               FROM_Z: tl.constexpr, OUT: tl.constexpr, DX: tl.constexpr, FLAT: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = F1 dy + B (x - mu) - F1 S1 (reference.input_grad's order), dy read, or (``FROM_G``) formed
    from the gradient g of a and the activation's derivative recomputed from x (input_grad_x)."""
    rows, cols, mask, cmask = _tile(tl.program_id(0) * BLOCK_R, tl.program_id(1) * BLOCK_C, M, C, BLOCK_R, BLOCK_C)
    gv = tl.load(_at(dy, rows, cols, HW, ds0, ds1, ds2, FLAT), mask=mask, other=0.0).to(tl.float32)
    xv = tl.load(_at(x, rows, cols, HW, xs0, xs1, xs2, FLAT), mask=mask, other=0.0).to(tl.float32)
    m = tl.load(mu + cols, mask=cmask, other=0.0)
    f = tl.load(f1 + cols, mask=cmask, other=0.0)
    if FROM_G:
        z = (xv - m) * f + tl.load(beta + cols, mask=cmask, other=0.0)
        if FROM_Z:
            tv = z
        else:
            tv = _round(_act_fwd(z, ACT, p0, p1, p2), OUT).to(tl.float32)
        gv = _act_grad(gv, tv, ACT, FROM_Z, p0, p1, p2)
    d = gv * f
    if HAS_B:
        b = tl.load(bvec + cols, mask=cmask, other=0.0)
        fs = f * tl.load(s1 + cols, mask=cmask, other=0.0)
        d = d + (xv - m) * b - fs
    tl.store(_at(dx, rows, cols, HW, dxs0, dxs1, dxs2, FLAT), _round(d, DX), mask=mask)
