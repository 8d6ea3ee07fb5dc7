"""The fused C++ sweeps (``cpu`` backend) against float64 and the reference sweeps (bounds from the unit
roundoff, never measured), the recomputed mask bit for bit, the kernels' entry counters, the fallback,
the per-ISA build cache, a killed build, torch.compile and the workspace."""

from __future__ import annotations

import copy
import os
import platform
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import bnff
from bnff.machine import cpu_info
from bnff.ops.backends import cpu, reference
from helpers import assert_compiled_tracks_plain, assert_rule

LAYOUTS = (torch.channels_last, torch.contiguous_format)
LAYOUT_NAME = {torch.channels_last: "nhwc", torch.contiguous_format: "nchw"}
DTYPES = (torch.float32, torch.bfloat16)
U32 = 2.0 ** -24  # float32 unit roundoff: the sweeps accumulate in float32 (and double)


def _t(gen, shape, dtype, fmt, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=gen) * scale + shift).to(dtype).contiguous(memory_format=fmt)


def _d(t):
    return t.detach().double()


def _vec(v):
    return _d(v).view(1, -1, 1, 1)


def _assert_within(got, exact, bound, what):
    """Element-wise |got - exact| <= bound, all in float64; the bound comes from the unit roundoff and
    the reduction length (Higham's summation bound), never from a measured run."""
    err = (_d(got) - exact).abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), f"{what}: error {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g}"


def _sum_bound(terms, m):
    """(m + 2) u sum |t| / m per channel: float32 summation of m products or differences, divided by m."""
    return (m + 2) * U32 * terms.abs().sum((0, 2, 3)) / m


@pytest.mark.exactness
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", [None, "relu", "relu6"])
def test_sweeps_match_float64_and_run_the_kernels(fmt, dtype, act, gen):
    """Two BN terms, the first over a concatenation of two maps (ICF), plus a shortcut. The element-wise
    sweeps (apply, dy) equal the reference bit for bit (one definition, no contraction); reductions
    and dx are within the float32 rounding bound of float64. Every sweep entered the C++ kernels."""
    assert cpu.available(), cpu._state.get("why")
    before = cpu.kernel_calls()
    n, h, w = 3, 5, 7
    m = n * h * w
    x1, x2 = _t(gen, (n, 24, h, w), dtype, fmt, 3, 5), _t(gen, (n, 8, h, w), dtype, fmt)
    x3, r = _t(gen, (n, 32, h, w), dtype, fmt), _t(gen, (n, 32, h, w), dtype, fmt)
    sources = [[x1, x2], [x3]]
    means = [torch.randn(32, generator=gen), torch.randn(32, generator=gen)]
    f1s = [torch.rand(32, generator=gen) + 0.5, torch.rand(32, generator=gen) + 0.5]
    betas = [torch.randn(32, generator=gen) * 3, None]  # relu6 sees values on both sides of 0 and 6
    mean, var = cpu.channel_stats(x1)
    mean64, var64 = _d(x1).mean((0, 2, 3)), _d(x1).var((0, 2, 3), correction=0)
    _assert_within(mean, mean64, _sum_bound(_d(x1), m), "mean")
    _assert_within(var, var64, 2 * _sum_bound((_d(x1) - mean64.view(1, -1, 1, 1)) ** 2, m), "var")
    a_ref = reference.apply(sources, means, f1s, betas, [r], act, dtype)
    a = cpu.apply(sources, means, f1s, betas, [r], act, dtype)
    assert a.is_contiguous(memory_format=fmt) and a.dtype == dtype and torch.equal(a, a_ref)
    g = _t(gen, (n, 32, h, w), dtype, fmt)
    dy_ref, s1_ref, s2_ref = reference.grad_stats(g, a_ref, act, sources, means)
    dy, s1, s2 = cpu.grad_stats(g, a_ref, act, sources, means)
    assert torch.equal(dy.to(dy_ref.dtype), dy_ref)  # g * mask is exact in g's dtype
    xs = [torch.cat([_d(x1), _d(x2)], 1), _d(x3)]
    for k, xk in enumerate(xs):
        _assert_within(s1[k], _d(dy).sum((0, 2, 3)) / m, _sum_bound(_d(dy), m), "S1")
        prod = _d(dy) * (xk - _vec(means[k]))
        _assert_within(s2[k], prod.sum((0, 2, 3)) / m, _sum_bound(prod, m), "S2c")
    b = torch.randn(32, generator=gen)
    u_out = torch.finfo(dtype).eps / 2  # the output's rounding (bf16: 2^-8)

    def dx_exact(d, term):
        f1, k0 = _vec(f1s[0]), _vec(f1s[0]) * _vec(s1[0])
        parts = [f1 * _d(d), _vec(b) * (term - _vec(means[0])), k0.expand_as(term)]
        exact = parts[0] + parts[1] - parts[2]
        size = sum(p.abs() for p in parts)
        return exact, 6 * U32 * size + u_out * (exact.abs() + 6 * U32 * size)

    exact, bound = dx_exact(dy, xs[0])
    dxs = cpu.input_grad(dy, [x1, x2], means[0], f1s[0], b, s1[0])
    for d, x, e, bd in zip(dxs, [x1, x2], exact.split([24, 8], 1), bound.split([24, 8], 1)):
        assert d.shape == x.shape and d.dtype == x.dtype and d.is_contiguous(memory_format=fmt)
        _assert_within(d, e, bd, "dx")
    # one term, no shortcut: the mask recomputed from x, dy never written
    lone = ([x1, x2], means[0], f1s[0], betas[0], dtype)
    s1x, s2x = cpu.grad_stats_x(g, act, *lone)
    a_lone = reference.apply([[x1, x2]], [means[0]], [f1s[0]], [betas[0]], [], act, dtype)
    dy_lone = _d(reference.activation_grad(g.double(), a_lone, act))  # the mask: exact in float64
    _assert_within(s1x, dy_lone.sum((0, 2, 3)) / m, _sum_bound(dy_lone, m), "S1 (lone)")
    prod = dy_lone * (xs[0] - _vec(means[0]))
    _assert_within(s2x, prod.sum((0, 2, 3)) / m, _sum_bound(prod, m), "S2c (lone)")
    s1 = [s1x]
    exact, bound = dx_exact(dy_lone, xs[0])
    for d, e, bd in zip(cpu.input_grad_x(g, act, *lone, b, s1x), exact.split([24, 8], 1), bound.split([24, 8], 1)):
        assert d.is_contiguous(memory_format=fmt)
        _assert_within(d, e, bd, "dx (lone)")
    ran = cpu.kernel_calls() - before
    key = f"{LAYOUT_NAME[fmt]}/{str(dtype).removeprefix('torch.')}"
    for sweep in ("channel_stats", "apply", "grad_stats", "input_grad", "grad_stats_x", "input_grad_x"):
        assert ran[f"{sweep}/{key}"] >= 1, (sweep, key, ran)


def _near_threshold(gen, shape, dtype, fmt, mean, f1, beta, thresholds):
    """x with (x - mean) * F1 + beta within a few ulps of a threshold (0, or 0 and 6) in every element:
    x0 = mean + (t - beta) / F1 rounded to ``dtype``, moved by -3..3 of its ulps."""
    n, c, h, w = shape
    t = torch.tensor(thresholds, dtype=torch.float64)[torch.randint(len(thresholds), (n, c, h, w), generator=gen)]
    x0 = (_vec(mean) + (t - _vec(beta)) / _vec(f1)).to(dtype)
    mantissa = {torch.float32: 23, torch.bfloat16: 7}[dtype]
    ulp = 2.0 ** (torch.floor(torch.log2(x0.double().abs().clamp_min(1e-30))) - mantissa)
    steps = torch.randint(-3, 4, (n, c, h, w), generator=gen).double()
    return (x0.double() + steps * ulp).to(dtype).contiguous(memory_format=fmt)


@pytest.mark.exactness
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act, thresholds", [("relu", (0.0,)), ("relu6", (0.0, 6.0))])
def test_recomputed_mask_is_bit_identical(backend, fmt, dtype, act, thresholds, gen):
    """The backward of a lone BN recomputes the activation from x; its mask must be the one of the value
    the forward passed on (eager's rule: ReLU a > 0, ReLU6 0 < a < 6 on the stored output), element for
    element, on inputs placed within a few ulps of the thresholds."""
    be = {"reference": reference, "cpu": cpu}[backend]
    before = cpu.kernel_calls()
    shape = (4, 20, 6, 5)
    mean, f1 = torch.randn(20, generator=gen), torch.rand(20, generator=gen) * 3 + 0.1
    beta = torch.randn(20, generator=gen) * 4
    x = _near_threshold(gen, shape, dtype, fmt, mean, f1, beta, thresholds)
    a = be.apply([[x]], [mean], [f1], [beta], [], act, dtype)
    mask = (a > 0) if act == "relu" else (a > 0) & (a < 6)
    assert 0 < mask.sum() < mask.numel()  # the inputs do straddle the thresholds
    g = (torch.rand(shape, generator=gen) + 0.5).to(dtype).contiguous(memory_format=fmt)
    dx = be.input_grad_x(g, act, [x], mean, f1, beta, dtype, None, torch.zeros(20))[0]  # dx = F1 * g * mask
    assert torch.equal(dx != 0, mask)
    s1, _ = be.grad_stats_x(torch.ones_like(g), act, [x], mean, f1, beta, dtype)  # S1 * m = mask count
    assert torch.equal(torch.round(s1.double() * (shape[0] * shape[2] * shape[3])).long(), mask.sum((0, 2, 3)))
    if backend == "cpu":
        ran = cpu.kernel_calls() - before
        assert all(ran[f"{sweep}/{LAYOUT_NAME[fmt]}/{str(dtype).removeprefix('torch.')}"] >= 1
                   for sweep in ("apply", "input_grad_x", "grad_stats_x")), ran


# every activation of the table with a threshold (where f' jumps or changes formula), those whose
# derivative reads a and those that read z; the piecewise-linear ones compute the same values as
# PyTorch's backward operators, bit for bit
THRESHOLD_KINDS = ["leaky_relu(0.1)", "leaky_relu(-0.2)", "elu(0.5)", "celu(0.5)", "selu", "hardswish", "hardsigmoid",
                   "mish"]
PIECEWISE_LINEAR = {"leaky_relu(0.1)", "leaky_relu(-0.2)", "hardswish", "hardsigmoid"}


@pytest.mark.exactness
@pytest.mark.parametrize("fmt", LAYOUTS)
def test_silu_fast_exponential_only_where_bfloat16_rounds_it_away(fmt, gen):
    """SiLU over bfloat16 maps takes ATen's exp_u20 (csrc/bnff_sweeps.h, BNFF_ACT_FAST_EXP): its 20 ulp of
    float32 (2^-18 relative) lie far inside bfloat16's half ulp (2^-9), so the result is float64's SiLU
    of the same pre-activation rounded to bfloat16, but for the rare value within 2^-18 of a rounding
    boundary, which may round the other way (one ulp); forward a and backward dy alike. Over float32
    maps SiLU keeps SLEEF's 1-ulp expf, as eager's silu: a equals the reference's (torch's silu) bit for
    bit, dy lies within a bound on its terms' size."""
    shape, c = (4, 40, 9, 7), 40
    before = cpu.kernel_calls()
    mean, f1 = torch.randn(c, generator=gen), torch.rand(c, generator=gen) * 3 + 0.1
    beta = torch.randn(c, generator=gen) * 2
    for dtype in DTYPES:
        x = _t(gen, shape, dtype, fmt, 4)  # z over about (-40, 40): both tails of the sigmoid
        z = _d(reference._preact([x], [mean], [f1], [beta], [], torch.float32))  # the kernels' float32 z
        silu64 = z * torch.sigmoid(z)
        g = _t(gen, shape, dtype, fmt, 1, 0.5)
        dsilu64 = _d(g) * torch.sigmoid(z) * (1 + z * (1 - torch.sigmoid(z)))
        a = cpu.apply([[x]], [mean], [f1], [beta], [], "silu", dtype)
        dy = cpu.grad_stats(g, None, "silu", [[x]], [mean], [f1], [beta])[0]
        for got, exact, what in ((a, silu64, "a"), (dy, dsilu64, "dy")):
            if dtype == torch.bfloat16:
                rounded = exact.to(torch.bfloat16).double()
                off = _d(got) != rounded
                ulp = 2.0 ** (torch.floor(torch.log2(rounded.abs().clamp_min(2.0 ** -120))) - 7)
                assert bool(((_d(got) - rounded).abs() <= ulp)[off].all()), f"{what}: more than one bf16 ulp off"
                assert float(off.double().mean()) < 0.01, f"{what}: {int(off.sum())} values round differently"
            elif what == "a":  # eager's silu: the same formula on the same z with the same exponential
                assert torch.equal(got, reference.apply([[x]], [mean], [f1], [beta], [], "silu", dtype))
            else:  # f'(z) = s (1 + z (1 - s)) cancels near its zero and as s -> 1: a bound on the terms' size
                assert bool(((_d(got) - exact).abs() <= 16 * U32 * _d(g).abs() * (1 + z.abs())).all()), "dy"
    ran = cpu.kernel_calls() - before
    assert all(ran[f"{s}/{LAYOUT_NAME[fmt]}/{d}"] >= 1 for s in ("apply", "grad_stats") for d in ("float32", "bfloat16")), ran


@pytest.mark.exactness
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", THRESHOLD_KINDS)
def test_recomputed_derivative_at_thresholds_is_the_forwards(fmt, dtype, act, gen):
    """The lone-term backward recomputes f' from x: on inputs within a few ulps of each threshold of
    ``act`` it takes, element for element, the branch the forward's value took, as the reference
    decides it on the same pre-activation (the same bits: one formula, no contraction). Piecewise-linear
    derivatives equal the reference's bit for bit, the others within 1e-5 (a wrong branch is off by
    O(1)); the forward equals it likewise."""
    from bnff import activations

    before = cpu.kernel_calls()
    thresholds = activations.spec(act).thresholds
    shape = (4, 20, 6, 5)
    mean, f1 = torch.randn(20, generator=gen), torch.rand(20, generator=gen) * 3 + 0.1
    beta = torch.randn(20, generator=gen) * 4
    x = _near_threshold(gen, shape, dtype, fmt, mean, f1, beta, thresholds)
    z = reference._preact([x], [mean], [f1], [beta], [], torch.float32)
    for t in thresholds:
        assert 0 < int((z > t).sum()) and 0 < int((z <= t).sum() - (z < t - 1).sum())  # straddled
    a, a_ref = (be.apply([[x]], [mean], [f1], [beta], [], act, dtype) for be in (cpu, reference))
    g = (torch.rand(shape, generator=gen) + 0.5).to(dtype).contiguous(memory_format=fmt)
    dx, dx_ref = (be.input_grad_x(g, act, [x], mean, f1, beta, dtype, None, torch.zeros(20))[0]  # F1 * g * f'
                  for be in (cpu, reference))
    if act in PIECEWISE_LINEAR:
        assert torch.equal(a, a_ref) and torch.equal(dx, dx_ref)
    else:
        torch.testing.assert_close(a, a_ref, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-30)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-30)
    s1, s1_ref = (be.grad_stats_x(g, act, [x], mean, f1, beta, dtype)[0] for be in (cpu, reference))
    torch.testing.assert_close(s1, s1_ref, rtol=1e-5, atol=1e-7)
    ran = cpu.kernel_calls() - before
    assert all(ran[f"{sweep}/{LAYOUT_NAME[fmt]}/{str(dtype).removeprefix('torch.')}"] >= 1
               for sweep in ("apply", "input_grad_x", "grad_stats_x")), ran


@pytest.mark.exactness
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hw", [12, 120])
def test_reductions_over_channel_tiles_and_rows_within_bound(dtype, hw, gen):
    """The channels_last reductions (channel_stats, grad_stats, grad_stats_x) walk tiles of vectors of
    channels down blocks of rows for maps of at most 16 MB read and written, and row by row (or one
    vector's column at a time) above: 2 x 181 x 12 x 12 is the first, 2 x 181 x 120 x 120 the second
    (the float32 map and the backward sweeps' maps are over 16 MB). 181 channels are full tiles,
    vectors left over and a partial vector at AVX-512 and AVX2; the backward sweeps read x from two
    maps split at channel 100 (a concatenation, read in place). Over several blocks of rows per chunk and on data far from 0 (mean 100, std 1: an
    uncentered sum x^2 / m - mu^2 would lose the variance), both stay within the float32 bound of
    float64."""
    n, c, h, w = 2, 181, hw, hw
    m = n * h * w
    name = str(dtype).removeprefix("torch.")
    before = cpu.kernel_calls()
    x = _t(gen, (n, c, h, w), dtype, torch.channels_last, 1.0, 100.0)
    mean, var = cpu.channel_stats(x)
    mean64, var64 = _d(x).mean((0, 2, 3)), _d(x).var((0, 2, 3), correction=0)
    _assert_within(mean, mean64, _sum_bound(_d(x), m), "mean")
    _assert_within(var, var64, 2 * _sum_bound((_d(x) - mean64.view(1, -1, 1, 1)) ** 2, m), "var")
    x1, x2 = _t(gen, (n, 100, h, w), dtype, torch.channels_last), _t(gen, (n, c - 100, h, w), dtype, torch.channels_last)
    g = _t(gen, (n, c, h, w), dtype, torch.channels_last)
    mu, f1 = torch.randn(c, generator=gen) * 0.1, torch.rand(c, generator=gen) + 0.5
    s1, s2 = cpu.grad_stats_x(g, "relu", [x1, x2], mu, f1, None, dtype)
    xs = torch.cat([_d(x1), _d(x2)], 1)
    a = (xs - _vec(mu)) * _vec(f1)
    if dtype == torch.bfloat16:  # the mask of the stored (rounded) activation, as the kernels take it
        a = a.to(torch.bfloat16).double()
    dy = _d(g) * (a > 0)
    _assert_within(s1, dy.sum((0, 2, 3)) / m, _sum_bound(dy, m), "S1")
    prod = dy * (xs - _vec(mu))
    _assert_within(s2, prod.sum((0, 2, 3)) / m, _sum_bound(prod, m), "S2c")
    a = cpu.apply([[x1, x2]], [mu], [f1], [None], [], "relu", dtype)
    dy_k, s1_k, s2_k = cpu.grad_stats(g, a, "relu", [[x1, x2]], [mu])
    assert torch.equal(_d(dy_k), _d(g) * (_d(a) > 0))  # g * mask is exact
    _assert_within(s1_k[0], dy.sum((0, 2, 3)) / m, _sum_bound(dy, m), "grad_stats S1")
    _assert_within(s2_k[0], prod.sum((0, 2, 3)) / m, _sum_bound(prod, m), "grad_stats S2c")
    ran = cpu.kernel_calls() - before
    assert all(ran[f"{s}/nhwc/{name}"] >= 1 for s in ("channel_stats", "grad_stats_x", "apply", "grad_stats")), ran


@pytest.mark.exactness
@pytest.mark.parametrize("fmt", LAYOUTS)
def test_long_maps_reduce_within_bound_and_nan_stays_nan(fmt, gen):
    """Maps longer than one block of rows (channels_last) or one run of a plane (NCHW: 80x80 = 6400
    values, more than a 4096-value run, with a tail): statistics and backward statistics stay within
    the float32 bound of float64. A NaN in x stays NaN through ReLU and ReLU6, as in eager PyTorch
    (a diverging run must show it), and its mask in the backward is 0, as eager's."""
    n, c, h, w = 2, 3, 80, 80
    m = n * h * w
    before = cpu.kernel_calls()
    x = _t(gen, (n, c, h, w), torch.float32, fmt, 2, 3)
    mean, var = cpu.channel_stats(x)
    mean64, var64 = _d(x).mean((0, 2, 3)), _d(x).var((0, 2, 3), correction=0)
    _assert_within(mean, mean64, _sum_bound(_d(x), m), "mean")
    _assert_within(var, var64, 2 * _sum_bound((_d(x) - mean64.view(1, -1, 1, 1)) ** 2, m), "var")
    g, mu, f1 = _t(gen, (n, c, h, w), torch.float32, fmt), torch.randn(c, generator=gen), torch.rand(c, generator=gen)
    s1, s2 = cpu.grad_stats_x(g, "relu", [x], mu, f1, None, torch.float32)
    dy = _d(g) * (_d(x) - _vec(mu) > 0)
    _assert_within(s1, dy.sum((0, 2, 3)) / m, _sum_bound(dy, m), "S1")
    prod = dy * (_d(x) - _vec(mu))
    _assert_within(s2, prod.sum((0, 2, 3)) / m, _sum_bound(prod, m), "S2c")
    xn = x.clone()
    xn[1, 2, 7, 9] = float("nan")
    one = torch.ones(c)
    for act, eager in (("relu", torch.relu), ("relu6", nn.functional.relu6)):
        a = cpu.apply([[xn]], [torch.zeros(c)], [one], [None], [], act, torch.float32)
        assert torch.equal(torch.isnan(a), torch.isnan(eager(xn))) and bool(torch.isnan(a).any())
        dy_nan, _, _ = cpu.grad_stats(g, a, act, [[xn]], [torch.zeros(c)])
        assert float(dy_nan[1, 2, 7, 9]) == 0.0 and not bool(torch.isnan(dy_nan).any())
    ran = cpu.kernel_calls() - before
    assert all(ran[f"{sweep}/{LAYOUT_NAME[fmt]}/float32"] >= 1
               for sweep in ("channel_stats", "grad_stats_x", "apply", "grad_stats")), ran


class _OpsSeen(TorchDispatchMode):
    """Counts the operators dispatched inside it by name ("bnff.scale.default"): proof that a C++ op ran."""

    def __init__(self):
        super().__init__()
        self.seen = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.exactness
@pytest.mark.parametrize("affine", [True, False])
def test_vector_kernels_equal_bn_math_bit_for_bit_and_float64(affine, gen):
    """F1, B, dgamma, dbeta from the one-call vector kernels: bit for bit the reference's (bn_math's
    ATen ops), within a few float32 roundings of float64, from the C++ op (counted by a dispatch mode),
    and float64 vectors handed to the reference."""
    c, m, eps = 77, 5 * 7 * 3, 1e-3  # 77: more than 4 AVX-512 vectors and a tail
    var = torch.rand(c, generator=gen) * 3 + 1e-4  # some near eps
    gamma = torch.randn(c, generator=gen) if affine else None
    s1, s2c, s2d = (torch.randn(c, generator=gen) for _ in range(3))
    with _OpsSeen() as ops:
        f1 = cpu.scale(var, gamma, eps)
        b, dgamma, dbeta = cpu.backward_vectors(var, f1, s1, s2c, s2d, m, eps, True)
        no_b, *_ = cpu.backward_vectors(var, f1, s1, s2c, s2d, m, eps, False)
    assert ops.seen == {"bnff.scale.default": 1, "bnff.backward_vectors.default": 2}, ops.seen
    f1_ref = reference.scale(var, gamma, eps)
    b_ref, dgamma_ref, dbeta_ref = reference.backward_vectors(var, f1_ref, s1, s2c, s2d, m, eps, True)
    for got, ref in ((f1, f1_ref), (b, b_ref), (dgamma, dgamma_ref), (dbeta, dbeta_ref)):
        assert torch.equal(got, ref)
    assert no_b is None
    inv = 1 / (_d(var) + eps).sqrt()
    g64 = _d(gamma) if affine else 1.0
    # each is 2-4 float32 roundings of its float64 value (the inputs taken as exact)
    _assert_within(f1, g64 * inv, 3 * U32 * (g64 * inv).abs(), "F1")
    b64 = -_d(f1) * _d(s2d) / (_d(var) + eps)
    _assert_within(b, b64, 4 * U32 * b64.abs(), "B")
    _assert_within(dgamma, m * _d(s2c) * inv, 5 * U32 * (m * _d(s2c) * inv).abs(), "dgamma")
    _assert_within(dbeta, m * _d(s1), U32 * (m * _d(s1)).abs(), "dbeta")
    v64 = var.double()
    with _OpsSeen() as ops:
        f64 = cpu.scale(v64, None if gamma is None else gamma.double(), eps)
    assert not ops.seen.get("bnff.scale.default") and f64.dtype == torch.float64


@pytest.mark.exactness
def test_running_update_kernel_blends_like_bn_math(gen):
    """The running-statistics blend in one C++ call (a dispatch mode sees it): within two float32
    roundings of the float64 blend of the same inputs, and of the reference's ATen ops, in place."""
    c, m, factor = 77, 2 * 9 * 9, 0.1
    rm, rv = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    mean, var = torch.randn(c, generator=gen), torch.rand(c, generator=gen) * 2
    rm_ref, rv_ref = rm.clone(), rv.clone()
    exact_m = (1 - factor) * _d(rm) + factor * _d(mean)
    exact_v = (1 - factor) * _d(rv) + factor * _d(var) * m / (m - 1)
    with _OpsSeen() as ops:
        cpu.running_update(rm, rv, mean, var, factor, m)
    assert ops.seen == {"bnff.running_update.default": 1}, ops.seen
    reference.running_update(rm_ref, rv_ref, mean, var, factor, m)
    sizes = ((1 - factor) * _d(rm).abs() + factor * _d(mean).abs(),
             (1 - factor) * _d(rv).abs() + factor * _d(var).abs() * m / (m - 1))
    for got, ref, exact, size, name in ((rm, rm_ref, exact_m, sizes[0], "running_mean"),
                                        (rv, rv_ref, exact_v, sizes[1], "running_var")):
        # the factors rounded to float32, each product, the unbiased variance and the sum: at most
        # 4 roundings of the terms' size (no cancellation bound needed: the size is of |terms|)
        bound = 4 * U32 * size
        _assert_within(got, exact, bound, name)
        _assert_within(got, _d(ref), 2 * bound, name + " against the reference")


def test_mixed_layouts_and_float64_are_handled(gen, monkeypatch):
    x = _t(gen, (2, 16, 4, 4), torch.float32, torch.channels_last)
    g = _t(gen, (2, 16, 4, 4), torch.float32, torch.contiguous_format)  # e.g. an average pool's gradient
    mean = torch.randn(16, generator=gen)
    before = cpu.kernel_calls()
    dy, s1, s2 = cpu.grad_stats(g, x, "relu", [[x]], [mean])
    dy_ref, s1_ref, s2_ref = reference.grad_stats(g, x, "relu", [[x]], [mean])
    assert torch.equal(dy, dy_ref)
    prod = _d(dy) * (_d(x) - _vec(mean))
    _assert_within(s2[0], prod.sum((0, 2, 3)) / 32, _sum_bound(prod, 32), "S2c")
    assert (cpu.kernel_calls() - before)["grad_stats/nhwc/float32"] == 1  # converted, not fallen back
    x64 = x.double()
    monkeypatch.setattr(cpu, "_fallbacks", Counter())  # as in a fresh process: no float64 fallback yet
    with pytest.warns(RuntimeWarning, match="reference backend .* because of: float64"):
        m, v = cpu.channel_stats(x64)  # float64: not covered, the reference sweep, said once and counted
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        cpu.apply([[x64]], [mean.double()], [mean.double()], [None], [], "relu", torch.float64)
    assert m.dtype == torch.float64 and torch.equal(v, torch.var_mean(x64, (0, 2, 3), correction=0)[0])
    assert cpu.fallbacks() == {("channel_stats", "float64"): 1, ("apply", "float64"): 1}


def test_failed_build_falls_back_with_one_warning(monkeypatch, gen):
    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.delenv("BNFF_DISABLE_CPU", raising=False)

    def broken():
        raise OSError("no compiler")

    monkeypatch.setattr(cpu, "_build", broken)
    x = _t(gen, (2, 8, 3, 3), torch.float32, torch.channels_last)
    with pytest.warns(RuntimeWarning, match="could not be built.*no compiler"):
        mean, var = cpu.channel_stats(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        cpu.channel_stats(x)
    assert torch.equal(var, reference.channel_stats(x)[1])


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x))))


def test_torch_compile_runs_around_a_bnff_model(gen):
    """The sweeps are torch.library ops with fake implementations, so dynamo traces through them; the
    compiled model is as close to float64 as the plain one (the suite's rule, with the plain bnff
    model in eager's place) and its sweeps ran in the kernels."""
    torch.manual_seed(0)
    model = _Net()
    plain, compiled = bnff.restructure(model, backend="cpu"), torch.compile(bnff.restructure(model, backend="cpu"))
    x = torch.randn(2, 3, 8, 8, generator=gen)
    before = {}
    assert_compiled_tracks_plain(model, plain, compiled, x, lambda: before.update(cpu.kernel_calls()))
    assert sum((cpu.kernel_calls() - Counter(before)).values()) > 0


def test_workspace_reuses_freed_blocks_and_releases_them(gen):
    """A large output's block goes back to the workspace when the tensor dies and the next output of
    that size gets it (no fresh pages); the reused memory gives the same results; release frees it."""
    if not cpu.available():
        pytest.skip("cpu kernels not built")
    cpu.release_workspace()
    x = _t(gen, (4, 64, 32, 32), torch.bfloat16, torch.channels_last)  # 512 KiB: below the pool's minimum
    big = _t(gen, (8, 64, 48, 48), torch.bfloat16, torch.channels_last)  # 2.25 MiB
    mean, f1, beta = torch.randn(64, generator=gen), torch.rand(64, generator=gen), torch.randn(64, generator=gen)
    a = cpu.apply([[big]], [mean], [f1], [beta], [], "relu", torch.bfloat16)
    ptr, nbytes = a.data_ptr(), a.numel() * a.element_size()
    assert cpu.workspace_bytes() == 0
    del a
    assert cpu.workspace_bytes() == nbytes
    a2 = cpu.apply([[big]], [mean], [f1], [beta], [], "relu", torch.bfloat16)
    assert a2.data_ptr() == ptr and cpu.workspace_bytes() == 0
    assert a2.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a2, reference.apply([[big]], [mean], [f1], [beta], [], "relu", torch.bfloat16))
    small = cpu.apply([[x]], [mean], [f1], [beta], [], "relu", torch.bfloat16)
    del small, a2
    assert cpu.workspace_bytes() == nbytes  # the small one went back to the system allocator
    assert cpu.release_workspace() == nbytes and cpu.workspace_bytes() == 0
    nchw = big.contiguous()  # a pooled block in the NCHW layout
    a3 = cpu.apply([[nchw]], [mean], [f1], [beta], [], "relu", torch.bfloat16)
    assert a3.is_contiguous() and torch.equal(a3, reference.apply([[nchw]], [mean], [f1], [beta], [], "relu",
                                                                  torch.bfloat16))


@pytest.mark.exactness
def test_each_isa_level_gets_its_own_cache_and_follows_aten(monkeypatch, tmp_path):
    """Two ISA levels: two names, two folders, their own -march; the level follows ATen's (here held
    to AVX2 by ATEN_CPU_CAPABILITY in a fresh interpreter, as the rehearsal run does); the folders sit
    under TORCH_EXTENSIONS_DIR when it is set, as torch's own builds do."""
    with monkeypatch.context() as env:
        env.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
        assert cpu.build_spec("avx2")[1].parent == tmp_path
    specs = {level: cpu.build_spec(level) for level in ("avx512_bf16", "avx512", "avx2", "default")}
    assert len({s[0] for s in specs.values()}) == len({s[1] for s in specs.values()}) == 4
    assert "-march=x86-64-v4" in specs["avx512"][2] and "-march=x86-64-v3" in specs["avx2"][2]
    assert "-mavx512bf16" in specs["avx512_bf16"][2] and "-mavx512bf16" not in specs["avx512"][2]
    assert not any(f.startswith("-march") for f in specs["default"][2])
    assert all("-ffp-contract=off" in s[2] for s in specs.values())
    with pytest.raises(ValueError, match="unknown ISA level"):
        cpu.build_spec("sse9")
    code = "from bnff.ops.backends import cpu; print(cpu.isa(), cpu.build_spec()[1])"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
                         capture_output=True, text=True, check=True).stdout.split()
    if platform.machine() == "x86_64" and cpu.isa() in ("avx2", "avx512", "avx512_bf16"):
        assert out == ["avx2", str(specs["avx2"][1])]
    flags = cpu_info()["isa_flags"]
    if cpu.isa().startswith("avx512"):  # the bf16 conversion instruction only where the CPU lists it
        assert (cpu.isa() == "avx512_bf16") == ("avx512_bf16" in flags)
    assert cpu.available() and cpu._state["library"] == cpu.build_spec()[1]  # this process loaded its own level


_TINY = """#include <torch/library.h>
TORCH_LIBRARY(bnff_killed_build_test, m) { m.def("one() -> int", []() -> int64_t { return 1; }); }
"""
_LOAD = """import sys, torch
from pathlib import Path
from bnff.ops.backends import cpu
cpu.load_extension("bnff_killed_build_test", [sys.argv[1]], Path(sys.argv[2]), [])
print(torch.ops.bnff_killed_build_test.one())
"""


def test_a_build_killed_midway_leaves_the_next_load_working(tmp_path):
    """Kill a build while torch's ``lock`` file is held (as Ctrl-C or a timeout would), then load
    again in a new process: it must build and load, not wait on the dead build's lock."""
    src, folder = tmp_path / "tiny.cpp", tmp_path / "ext"
    src.write_text(_TINY)
    first = subprocess.Popen([sys.executable, "-c", _LOAD, str(src), str(folder)], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (folder / "lock").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (folder / "lock").exists(), "the first build never took its lock"
    os.killpg(first.pid, signal.SIGKILL)  # the build and its compiler
    first.wait()
    assert (folder / "lock").exists()  # what a killed build leaves behind
    second = subprocess.run([sys.executable, "-c", _LOAD, str(src), str(folder)], capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0 and second.stdout.strip() == "1", second.stderr[-2000:]


def test_fusion_report_says_where_the_sweeps_run():
    for backend, words in (("cpu", "float64"), ("reference", "plain PyTorch")):
        text = str(bnff.fusion_report(bnff.restructure(_Net(), backend=backend)))
        assert "sweeps:" in text and words in text, text


# Small variants of the four families: together their groups hold every step kind the group executor
# runs (lone BNs feeding convolutions, block outputs with a shortcut, projection shortcuts, relu6 and
# no activation, results feeding several convolutions, results read as a concatenation's slice).
# bf16 autocast once (the executor only passes dtypes through; bf16 convolutions are slow at AVX2).
# (model, dtype, the activation module that replaces its ReLU/ReLU6, or None): SiLU and Hardswish take the
# derivative at z, recomputed in grad_stats from the BN inputs and the shortcuts
EXECUTOR_MODELS = (("resnet50", torch.bfloat16, None), ("resnet50", torch.float32, None),
                   ("densenet121", torch.float32, None), ("mobilenet_v2", torch.float32, None),
                   ("inception_v3", torch.float32, None), ("resnet50", torch.bfloat16, nn.SiLU),
                   ("mobilenet_v2", torch.float32, nn.Hardswish))


def _swap_activations(net: nn.Module, make) -> nn.Module:
    """``net`` with every nn.ReLU / nn.ReLU6 replaced by ``make()``."""
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if type(child) in (nn.ReLU, nn.ReLU6):
                setattr(parent, name, make())
    return net


@pytest.mark.exactness
def test_group_executor_equals_the_python_steps_bit_for_bit(gen, monkeypatch):
    """The group executor (a group's forward and backward as one C++ call each) runs the same plan
    steps with the same kernels as the Python steps: a training step's outputs, parameter gradients
    and running statistics equal theirs bit for bit, on fresh random inputs. The Python steps are
    the oracle (the rest of the suite holds them to eager PyTorch and float64). It must have run, and
    its programs must have held every step kind it knows. (The fused pointwise convolutions, whose
    forward runs in Python, are off here: tests/test_pointwise.py.)"""
    from bnff import models
    from bnff.ops import pointwise

    monkeypatch.setattr(pointwise, "MODE", "off")

    ran: Counter = Counter()
    kinds: set[int] = set()
    for direction in ("group_forward", "group_backward"):
        def spy(*args, _f=getattr(cpu, direction), _d=direction, **kwargs):
            ran[_d] += 1
            steps = args[4] if _d == "group_forward" else args[6]
            kinds.update(steps[0::5])
            return _f(*args, **kwargs)
        monkeypatch.setattr(cpu, direction, spy)

    def train_step(net, x, y, amp, executor):
        monkeypatch.setattr(cpu, "GROUP_EXECUTOR", executor)
        net = copy.deepcopy(net)
        torch.manual_seed(1)  # dropout
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = net(x)
        out = getattr(out, "logits", out)
        nn.functional.cross_entropy(out.float(), y).backward()
        return [out] + [p.grad for p in net.parameters()] + list(net.buffers())

    for name, dtype, act in EXECUTOR_MODELS:
        amp = dtype == torch.bfloat16
        net = models.MODELS[name](num_classes=10, small_input=True).train().to(memory_format=torch.channels_last)
        if act is not None:
            net = _swap_activations(net, act)
        x = torch.randn(2, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (2,), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            net = bnff.restructure(net, backend="cpu", example_input=x)
        before = sum(ran.values())
        fast = train_step(net, x, y, amp, True)
        assert sum(ran.values()) > before, f"{name}: the group executor never ran"
        runs = sum(ran.values())
        steps = train_step(net, x, y, amp, False)
        assert sum(ran.values()) == runs, f"{name}: the executor ran while switched off"
        for i, (f, s) in enumerate(zip(fast, steps)):
            assert (f is None and s is None) or torch.equal(f, s), f"{name} {dtype}: result {i} differs"
    assert ran["group_forward"] >= ran["group_backward"] > 0
    assert kinds == set(cpu.STEP_CODES.values()), f"step kinds never run: {set(cpu.STEP_CODES.values()) - kinds}"


def test_the_declared_ninja_is_found_without_an_activated_environment(monkeypatch):
    """torch's builder runs ``ninja`` by name; ``make test`` runs ``.venv/bin/python`` without activating the
    environment, so on a machine without a system ninja the kernels would not build (issue 30). The
    builder puts the ``ninja`` package's binary first on PATH."""
    import shutil

    import ninja

    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != ninja.BIN_DIR))
    cpu._ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
    assert shutil.which("ninja") == os.path.join(ninja.BIN_DIR, "ninja")
