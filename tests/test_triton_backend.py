"""The ``triton`` backend's kernels, run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``,
set by conftest before Triton is imported), against the reference sweeps and float64 (issue 32).

Element-wise results whose formula is the reference's (the BN terms, shortcuts, the piecewise-linear
activations, dx) must be bit-identical; the transcendental activations as close to float64 as the
reference's (the suite's ``K``); reductions within the recursive-summation bound of their float64
value. The backward's recompute must equal the forward's bits (the saved-a and the recomputed-a sweeps
give the same sums). The pattern tests also run on this backend (test_patterns.py, ``TRITON``); here one
whole network per architecture family, at small shapes, in float32, bfloat16 and float16 autocast.
"""

from __future__ import annotations

import pytest
import torch

import bnff
from bnff import activations, models
from bnff.ops import backends
from bnff.ops.backends import reference, triton
from helpers import (K, assert_aggregate_as_accurate_as_eager, assert_bf16_tracks_eager, compare_with_float64,
                     randomize_bn)

pytestmark = pytest.mark.skipif(not triton.available("cpu"), reason="Triton or its interpreter is not available")


@pytest.fixture
def kernels_ran(monkeypatch):
    """The triton backend as ``restructure``'s default; afterwards, its kernels must have run and nothing
    may have fallen back to the reference."""
    monkeypatch.setattr(backends, "_default", "triton")
    calls, fell = triton.kernel_calls(), triton.fallbacks()
    yield
    assert sum((triton.kernel_calls() - calls).values()) > 0, "the triton kernels never ran"
    assert triton.fallbacks() == fell, triton.fallbacks() - fell

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAME_FORMULA = [None, "relu", "relu6", "leaky_relu(0.1)", "leaky_relu(-0.2)", "hardswish", "hardsigmoid"]
TRANSCENDENTAL = ["silu", "gelu", "gelu_tanh", "mish", "tanh", "sigmoid", "elu(1.0)", "celu(0.5)", "selu"]


def _map(gen, c, dtype, layout, n=2, h=5, w=7, scale=2.0, shift=0.5):
    t = (torch.randn(n, c, h, w, generator=gen) * scale + shift).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else t


def _group(gen, dtype, layout):
    """A concatenation (2 + 4 channels) as BN term 0, one map as term 1 (a projection shortcut's BN), an
    identity shortcut: the sources cut into two channel segments."""
    srcs = [_map(gen, 2, dtype, layout), _map(gen, 4, dtype, layout)]
    x1, r = _map(gen, 6, dtype, layout), _map(gen, 6, dtype, layout)
    vec = lambda: torch.randn(6, generator=gen)  # noqa: E731
    return [srcs, [x1]], [vec(), vec()], [vec(), vec()], [vec(), None], [r]


def _err(a, ref64):
    return torch.linalg.vector_norm(a.double() - ref64).item()


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_elementwise_sweeps_bit_identical_to_reference(dtype, layout, gen, kernels_ran):
    sources, means, f1s, betas, residuals = _group(gen, dtype, layout)
    g = _map(gen, 6, dtype, layout)
    b, s1 = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    for act in SAME_FORMULA:
        a = triton.apply(sources, means, f1s, betas, residuals, act, dtype)
        assert torch.equal(a, reference.apply(sources, means, f1s, betas, residuals, act, dtype)), act
        assert a.is_contiguous(memory_format=torch.channels_last) == (layout == "nhwc")
        args = (g, act, sources[0], means[0], f1s[0], betas[0], dtype, b, s1)
        for got, want in zip(triton.input_grad_x(*args), reference.input_grad_x(*args)):
            assert got.dtype == want.dtype and torch.equal(got, want), act
    dy = _map(gen, 6, torch.float32, layout)
    for bb in (b, None):
        for got, want in zip(triton.input_grad(dy, sources[0], means[0], f1s[0], bb, s1),
                             reference.input_grad(dy, sources[0], means[0], f1s[0], bb, s1)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_transcendental_activations_as_accurate_as_reference(layout, gen, kernels_ran):
    """a and dy = g * f'(.) of every activation computed with exp, erf, tanh or log1p: at most K times the
    reference's distance from float64 (plus an ulp of the size)."""
    x = _map(gen, 8, torch.float32, layout, n=4, h=6, w=6, scale=4.0, shift=0.0)
    g = torch.randn_like(x)
    mu, f1 = [torch.zeros(8)], [torch.ones(8)]
    x64 = x.double()
    for act in TRANSCENDENTAL:
        a = triton.apply([[x]], mu, f1, [None], [], act, torch.float32)
        ar = reference.apply([[x]], mu, f1, [None], [], act, torch.float32)
        a64 = activations.forward(act, x64)
        floor = 1e-7 * torch.linalg.vector_norm(a64).item()
        assert _err(a, a64) <= K * _err(ar, a64) + floor, act
        dy, _, _ = triton.grad_stats(g, a, act, [[x]], mu, f1, [None])
        dyr, _, _ = reference.grad_stats(g, ar, act, [[x]], mu, f1, [None])
        t64 = x64 if activations.reads(act) == "z" else a.double()
        dy64 = activations.spec(act).backward(g.double(), t64)
        assert _err(dy, dy64) <= K * _err(dyr, dy64) + 1e-7 * torch.linalg.vector_norm(dy64).item(), act


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_recompute_equals_the_forward_bits(dtype, gen, kernels_ran):
    """For every activation: the sums of the backward that recomputes a (or z) from x equal, bit for bit,
    those of the sweep that reads the stored a (or recomputes z with the shortcut-free group), and the
    dx formed on the fly equals the dx from the written dy (float32: dy is written in the maps' dtype)."""
    srcs = [_map(gen, 2, dtype, "nhwc"), _map(gen, 3, dtype, "nhwc")]
    mu, f1, beta = torch.randn(5, generator=gen), torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    g = _map(gen, 5, dtype, "nhwc")
    b, s1 = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    for act in SAME_FORMULA + TRANSCENDENTAL:
        a = triton.apply([srcs], [mu], [f1], [beta], [], act, dtype)
        dy, (s1_a,), (s2_a,) = triton.grad_stats(g, a, act, [srcs], [mu], [f1], [beta])
        s1_x, s2_x = triton.grad_stats_x(g, act, srcs, mu, f1, beta, dtype)
        assert torch.equal(s1_x, s1_a) and torch.equal(s2_x, s2_a), act
        if dtype == torch.float32:
            for got, want in zip(triton.input_grad_x(g, act, srcs, mu, f1, beta, dtype, b, s1),
                                 triton.input_grad(dy, srcs, mu, f1, b, s1)):
                assert torch.equal(got, want), act


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_reductions_within_summation_bounds_and_deterministic(dtype, layout, gen, monkeypatch, kernels_ran):
    """mean, var, S1, S2c against float64 of the same inputs: within m * u of the sum of magnitudes
    (recursive summation's bound, Higham 2002 eq. 4.4; u = 2^-24), the same bits on every call. The
    statistics of a map whose mean is 10^4 times its spread as well (the sums run on shifted values).
    Small tiles, so that several programs' partials are merged (the interpreter's own tiles hold it all)."""
    monkeypatch.setattr(triton, "_blocks", lambda first, c: (16, 4))
    assert triton._split(297, 2, 16, torch.device("cpu"))[1] == 2
    u, n = 2.0 ** -24, (3, 6, 9, 11)
    x = _map(gen, 6, dtype, layout, n=3, h=9, w=11)
    m = 3 * 9 * 11
    for c in (x, (_map(gen, 6, torch.float32, layout, n=3, h=9, w=11, scale=1.0, shift=1e4))):
        mean, var = triton.channel_stats(c)
        var64, mean64 = torch.var_mean(c.double(), (0, 2, 3), correction=0)
        assert (mean.double() - mean64).abs().le(m * u * c.double().abs().mean((0, 2, 3)) + u * mean64.abs()).all()
        d2 = (c.double() - mean64.view(1, -1, 1, 1)) ** 2
        assert (var.double() - var64).abs().le(2 * m * u * d2.mean((0, 2, 3)) + 1e-30).all()
        assert all(torch.equal(p, q) for p, q in zip((mean, var), triton.channel_stats(c)))
    g = _map(gen, 6, dtype, layout, n=3, h=9, w=11)
    mu = torch.randn(6, generator=gen)
    dy, (s1,), (s2,) = triton.grad_stats(g, None, None, [[x]], [mu])
    assert torch.equal(dy, g)
    terms = g.double() * (x.double() - mu.double().view(1, -1, 1, 1))
    assert (s1.double() - g.double().mean((0, 2, 3))).abs().le(m * u * g.double().abs().mean((0, 2, 3))).all()
    assert (s2.double() - terms.mean((0, 2, 3))).abs().le(2 * m * u * terms.abs().mean((0, 2, 3))).all()
    _, (s1_again,), (s2_again,) = triton.grad_stats(g, None, None, [[x]], [mu])
    assert torch.equal(s1, s1_again) and torch.equal(s2, s2_again)


def test_uncovered_calls_run_the_reference_and_are_counted(gen):
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    before = triton.fallbacks()
    mean, var = triton.channel_stats(x)
    assert mean.dtype == torch.float64 and torch.allclose(var, x.var((0, 2, 3), unbiased=False))
    xs = [[_map(gen, 3, torch.float32, "nchw")] for _ in range(3)]
    vec = [torch.randn(3, generator=gen) for _ in range(3)]
    with pytest.warns(RuntimeWarning, match="more than 2 BN terms"):
        a = triton.apply(xs, vec, vec, [None] * 3, [], "relu", torch.float32)
    assert torch.equal(a, reference.apply(xs, vec, vec, [None] * 3, [], "relu", torch.float32))
    fell = triton.fallbacks() - before
    assert fell[("channel_stats", "float64")] == 1 and fell[("apply", "more than 2 BN terms or 2 shortcuts")] == 1


def test_cpu_backend_hands_other_devices_to_triton():
    """The cpu backend's one routing by device: a sweep on non-CPU tensors goes to the triton backend (on
    ``meta`` tensors, which it does not cover either, so it runs the reference and says so)."""
    from bnff.ops.backends import cpu

    x = torch.empty(2, 4, 3, 3, device="meta")
    before, cpu_before = triton.fallbacks(), cpu.fallbacks()
    with pytest.warns(RuntimeWarning, match="meta tensors"):
        mean, var = cpu.channel_stats(x)
    assert mean.device.type == "meta" and mean.shape == (4,)
    assert (triton.fallbacks() - before)[("channel_stats", "meta tensors")] == 1
    assert cpu.fallbacks() == cpu_before


# One network per architecture family (residual; inverted residual with SiLU and squeeze-and-excitation;
# with Hardswish), small inputs, each in one precision (ResNet-18, the cheapest, in all three) to keep make
# test within its budget. MobileNetV2's ReLU6 inverted residuals, DenseNet's concatenations and projection
# shortcuts are in the pattern tests (test_patterns.py runs on this backend too); Inception-v3 and
# CSPDarknet-53 take minutes in the interpreter and add no pattern those do not run.
FAMILIES = {"resnet18": ("fp32", "bf16", "fp16"), "efficientnet_b0": ("bf16",), "mobilenet_v3_large": ("fp16",)}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_by_the_rule(name, gen, kernels_ran):
    """fp32: a training step by the suite's whole-network rule against float64 (forward tensors one by one,
    gradients by their median: a ReLU6 mask element within rounding of its threshold may flip in either
    implementation, helpers.assert_aggregate_as_accurate_as_eager); bf16 and fp16 autocast (channels_last):
    the median tensor and the output within K times eager's error."""
    model = models.MODELS[name](num_classes=10, small_input=True)
    randomize_bn(model, gen)
    assert backends.default() == "triton"
    for precision in FAMILIES[name]:
        if precision == "fp32":
            batch = lambda: (torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen))  # noqa: E731
            assert_aggregate_as_accurate_as_eager(compare_with_float64(model, batch, steps=1))
        else:
            x = torch.randn(2, 3, 16, 16, generator=gen).contiguous(memory_format=torch.channels_last)
            assert_bf16_tracks_eager(model, x, DTYPES[precision])
    assert bnff.fusion_report(bnff.restructure(model)).backend == "triton"


def test_torch_compile_traces_the_triton_sweeps(gen, kernels_ran):
    """Under torch.compile the sweeps are custom operators (``torch.ops.bnff_triton.*``) with fake
    implementations: the forward's graph holds them (not a graph break into Python), and the compiled model's output
    and gradients are as close to float64 as the plain bnff model's (the suite's rule)."""
    from torch import nn

    from helpers import assert_compiled_tracks_plain

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
                          nn.Conv2d(8, 4, 3, padding=1, bias=False))
    randomize_bn(model, gen)
    seen: set[str] = set()

    def backend(gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        def record(g, _):
            seen.update(str(n.target) for n in g.graph.nodes if "bnff_triton" in str(n.target))
            return g
        return aot_autograd(fw_compiler=record, bw_compiler=record)(gm, example_inputs)

    torch._dynamo.reset()  # a fresh compiler state: earlier tests' compiled frames made this 10x slower in make test
    plain = bnff.restructure(model, backend="triton")
    compiled = torch.compile(bnff.restructure(model, backend="triton"), backend=backend)
    assert_compiled_tracks_plain(model, plain, compiled, torch.randn(2, 3, 8, 8, generator=gen))
    # the forward's sweeps are in the compiled graph; the backward (a once_differentiable autograd.Function's)
    # runs its sweeps as they are, in the kernels too (kernels_ran)
    assert {"bnff_triton.apply.default", "bnff_triton.channel_stats.default"} <= seen, seen


_COMPILE_FOR_A_GPU = r'''
import triton
from triton.backends.compiler import GPUTarget
from bnff.ops.backends import triton_kernels as k

assert not k.INTERPRETED
target = GPUTarget("cuda", 90, 32)  # sm_90 (H100/H200), Triton's own compiler and bundled ptxas


def compile_(fn, pointers, consts, floats=()):
    sig = {n: "constexpr" if n in consts else pointers.get(n, "fp32" if n in floats else "i32") for n in fn.arg_names}
    out = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                         options={"enable_fp_fusion": False})
    assert out.asm["cubin"], fn.__name__


def ptrs(names, t="*fp32"):
    return {n: t for n in names}


p = ("p0", "p1", "p2")
vectors = ptrs(["mu0", "f0", "b0", "mu1", "f1", "b1"])
for act in range(15):  # every activation of the table (cpu.ACT_CODES), bfloat16 maps
    compile_(k.apply, ptrs(["out", "x0", "x1", "r0", "r1"], "*bf16") | vectors,
             dict(N_TERMS=2, N_RES=1, ACT=act, OUT=1, FLAT=True, BLOCK_R=32, BLOCK_C=64), p)
compile_(k.stats_partial, ptrs(["x"], "*fp16") | ptrs(["shift", "part_mean", "part_m2"]),
         dict(FLAT=False, BLOCK_R=512, BLOCK_C=4))
compile_(k.stats_merge, ptrs(["shift", "part_mean", "part_m2", "mean_out", "var_out"]), dict(BLOCK_C=128))
compile_(k.sum_merge, ptrs(["part", "out"]), dict(BLOCK_C=128), ("m",))
maps = ptrs(["g", "t", "dy", "x0", "x1", "r0", "r1"], "*bf16") | ptrs(["part_s1", "part_s2a", "part_s2b"]) | vectors
for t_from, act, from_z in [(0, 0, False), (1, 1, False), (2, 4, False), (3, 14, True)]:
    compile_(k.grad_stats, maps, dict(N_TERMS=2, N_RES=2, ACT=act, FROM_Z=from_z, T_FROM=t_from, OUT=1, WRITE_DY=True,
                                      DY=1, FLAT=True, BLOCK_R=32, BLOCK_C=64), p)
for from_g, act, from_z in [(False, 0, False), (True, 13, True)]:
    compile_(k.input_grad, ptrs(["dx", "dy", "x"], "*fp16") | ptrs(["mu", "f1", "beta", "bvec", "s1"]),
             dict(HAS_B=True, FROM_G=from_g, ACT=act, FROM_Z=from_z, OUT=2, DX=2, FLAT=False, BLOCK_R=512, BLOCK_C=4), p)
print("compiled")
'''


def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter runs the kernels as Python and so cannot catch what the compiler refuses: every kernel
    (apply with each activation, the reductions, both input gradients) compiled to an sm_90 binary by
    Triton's compiler (libdevice included), in a process without ``TRITON_INTERPRET``. (The GPU machine's
    Triton is 3.6; this is the test environment's.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(bnff.__file__).parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _COMPILE_FOR_A_GPU], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
