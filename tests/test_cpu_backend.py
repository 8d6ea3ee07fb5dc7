"""The fused C++ sweeps (``cpu`` backend) against the reference sweeps, its fallback and torch.compile."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bnff
from bnff.ops.backends import cpu, reference
from helpers import rel_err

LAYOUTS = (torch.channels_last, torch.contiguous_format)
DTYPES = (torch.float32, torch.bfloat16)


def _t(gen, shape, dtype, fmt, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=gen) * scale + shift).to(dtype).contiguous(memory_format=fmt)


@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", [None, "relu", "relu6"])
def test_sweeps_match_reference(fmt, dtype, act, gen):
    """Two BN terms, the first over a concatenation of two maps (ICF), plus a shortcut."""
    n, h, w = 3, 5, 7
    x1, x2 = _t(gen, (n, 24, h, w), dtype, fmt, 3, 5), _t(gen, (n, 8, h, w), dtype, fmt)
    x3, r = _t(gen, (n, 32, h, w), dtype, fmt), _t(gen, (n, 32, h, w), dtype, fmt)
    sources = [[x1, x2], [x3]]
    means = [torch.randn(32, generator=gen), torch.randn(32, generator=gen)]
    f1s = [torch.rand(32, generator=gen) + 0.5, torch.rand(32, generator=gen) + 0.5]
    betas = [torch.randn(32, generator=gen) * 3, None]  # relu6 sees values on both sides of 0 and 6
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the output
    for a_ref, a in zip(reference.channel_stats(x1), cpu.channel_stats(x1)):
        assert rel_err(a, a_ref) <= 1e-6
    a_ref = reference.apply(sources, means, f1s, betas, [r], act, dtype)
    a = cpu.apply(sources, means, f1s, betas, [r], act, dtype)
    assert a.is_contiguous(memory_format=fmt) and a.dtype == dtype and rel_err(a, a_ref) <= tol
    g = _t(gen, (n, 32, h, w), dtype, fmt)
    dy_ref, s1_ref, s2_ref = reference.grad_stats(g, a_ref, act, sources, means)
    dy, s1, s2 = cpu.grad_stats(g, a_ref, act, sources, means)
    assert rel_err(dy, dy_ref) == 0  # g * mask is exact in g's dtype
    for u, v in zip(s1 + s2, s1_ref + s2_ref):
        assert rel_err(u, v) <= 1e-5
    b = torch.randn(32, generator=gen)
    for d, d_ref, x in zip(cpu.input_grad(dy, [x1, x2], means[0], f1s[0], b, s1[0]),
                           reference.input_grad(dy_ref, [x1, x2], means[0], f1s[0], b, s1_ref[0]), [x1, x2]):
        assert d.shape == x.shape and d.dtype == x.dtype and d.is_contiguous(memory_format=fmt)
        assert rel_err(d, d_ref) <= tol
    # one term, no shortcut: the mask recomputed from x, dy never written
    lone = ([x1, x2], means[0], f1s[0], betas[0], dtype)
    s1x, s2x = cpu.grad_stats_x(g, act, *lone)
    s1x_ref, s2x_ref = reference.grad_stats_x(g, act, *lone)
    assert rel_err(s1x, s1x_ref) <= 1e-5 and rel_err(s2x, s2x_ref) <= 1e-5
    for d, d_ref in zip(cpu.input_grad_x(g, act, *lone, b, s1x_ref), reference.input_grad_x(g, act, *lone, b, s1x_ref)):
        assert d.is_contiguous(memory_format=fmt) and rel_err(d, d_ref) <= tol


def test_mixed_layouts_and_float64_are_handled(gen):
    x = _t(gen, (2, 16, 4, 4), torch.float32, torch.channels_last)
    g = _t(gen, (2, 16, 4, 4), torch.float32, torch.contiguous_format)  # e.g. an average pool's gradient
    mean, f1 = torch.randn(16, generator=gen), torch.rand(16, generator=gen)
    dy, s1, s2 = cpu.grad_stats(g, x, "relu", [[x]], [mean])
    dy_ref, s1_ref, s2_ref = reference.grad_stats(g, x, "relu", [[x]], [mean])
    assert rel_err(dy, dy_ref) == 0 and rel_err(s2[0], s2_ref[0]) <= 1e-5
    x64 = x.double()
    m, v = cpu.channel_stats(x64)  # float64: the reference sweep
    assert m.dtype == torch.float64 and rel_err(v, torch.var(x64, (0, 2, 3), correction=0)) <= 1e-12


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
    assert rel_err(var, reference.channel_stats(x)[1]) == 0


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x))))


def test_torch_compile_runs_around_a_bnff_model(gen):
    """The sweeps are torch.library ops with fake implementations, so dynamo traces through them."""
    torch.manual_seed(0)
    model = _Net()
    plain, compiled = bnff.restructure(model, backend="cpu"), torch.compile(bnff.restructure(model, backend="cpu"))
    x = torch.randn(2, 3, 8, 8, generator=gen)
    y_plain = plain(x)
    grads_plain = torch.autograd.grad(y_plain.square().sum(), list(model.parameters()))
    y = compiled(x)
    grads = torch.autograd.grad(y.square().sum(), list(model.parameters()))
    assert rel_err(y, y_plain) <= 1e-5
    scale = max(g.abs().max().item() for g in grads_plain)  # c1's bias feeds a BN: its gradient is 0 + noise
    assert all(rel_err(a, b, floor=1e-2 * scale) <= 1e-4 for a, b in zip(grads, grads_plain))


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
    assert rel_err(a2, reference.apply([[big]], [mean], [f1], [beta], [], "relu", torch.bfloat16)) <= 1e-2
    small = cpu.apply([[x]], [mean], [f1], [beta], [], "relu", torch.bfloat16)
    del small, a2
    assert cpu.workspace_bytes() == nbytes  # the small one went back to the system allocator
    assert cpu.release_workspace() == nbytes and cpu.workspace_bytes() == 0
    nchw = big.contiguous()  # a pooled block in the NCHW layout
    a3 = cpu.apply([[nchw]], [mean], [f1], [beta], [], "relu", torch.bfloat16)
    assert a3.is_contiguous() and rel_err(a3, reference.apply([[nchw]], [mean], [f1], [beta], [], "relu",
                                                              torch.bfloat16)) <= 1e-2
