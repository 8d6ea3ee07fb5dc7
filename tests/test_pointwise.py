"""The fused pointwise convolution (``cpu.pointwise_forward``, csrc/bnff_pointwise.cpp; issue 31):
y = conv1x1(act(sum_k BN_k(x_k) + sum_j r_j)) with the statistics of y, on libxsmm's micro-kernels.

Against float64 of the same applied map, with bounds from the unit roundoff (Higham's bound for a
dot product of C_in terms; bfloat16's half ulp on the output), never from a measured run; the
applied map inside the kernel equal bit for bit to the apply sweep's; the kernel counter proves the
C++ path ran; and what happens without libxsmm."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnff
from bnff import activations
from bnff.ops import pointwise
from bnff.ops.backends import cpu, libxsmm
from helpers import K, assert_as_accurate_as_eager, assert_moves_what_the_plan_says, compare_with_float64

U32 = 2.0 ** -24  # float32 unit roundoff
U_BF16 = 2.0 ** -8  # bfloat16 unit roundoff (8 bits of significand)
ACTS = [None, "identity", "relu", "relu6", "leaky_relu(0.1)", "elu(0.7)", "celu(0.5)", "selu", "silu", "hardswish",
        "hardsigmoid", "sigmoid", "tanh", "gelu", "gelu_tanh", "mish"]  # every entry of bnff.activations.TABLE
# (BN terms' source channels, shortcuts): a lone BN, BN + identity shortcut, BN + projection shortcut's BN,
# one BN over a concatenation of two maps (DenseNet)
PATTERNS = {"lone": ([[24]], 0), "identity": ([[24]], 1), "projection": ([[24], [24]], 0), "concat": ([[16, 8]], 0)}


def _needs(dtype: torch.dtype) -> None:
    why = cpu.pointwise_why(dtype)
    if why is not None:
        pytest.skip(why)


def _group(gen, pattern: str, dtype: torch.dtype, n: int = 3, hw: int = 9):
    """Random channels_last inputs of a group: sources per term, means, F1s, betas, shortcuts."""
    shapes, n_res = PATTERNS[pattern]
    c = sum(shapes[0])

    def t(ch):
        return (torch.randn(n, ch, hw, hw, generator=gen) * 1.5 + 0.3).to(dtype).contiguous(memory_format=torch.channels_last)
    sources = [[t(ch) for ch in term] for term in shapes]
    means = [torch.cat([s.float().mean((0, 2, 3)) for s in term]) for term in sources]
    f1s = [torch.rand(c, generator=gen) + 0.5 for _ in shapes]
    betas = [torch.randn(c, generator=gen) * 0.2 for _ in shapes]
    residuals = [t(c) for _ in range(n_res)]
    return sources, means, f1s, betas, residuals


@pytest.mark.exactness
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_and_statistics_within_roundoff_of_float64(gen, dtype, pattern, stride):
    _needs(dtype)
    sources, means, f1s, betas, residuals = _group(gen, pattern, dtype)
    c = sum(s.shape[1] for s in sources[0])
    weight = (torch.randn(40, c, 1, 1, generator=gen) / c ** 0.5).to(dtype)
    before = cpu.kernel_calls()[f"pointwise/nhwc/{str(dtype).removeprefix('torch.')}"]
    y, mean, var = cpu.pointwise_forward(sources, means, f1s, betas, residuals, "relu", weight, stride, stats=True)
    assert cpu.kernel_calls()[f"pointwise/nhwc/{str(dtype).removeprefix('torch.')}"] == before + 1
    a = cpu.apply(sources, means, f1s, betas, residuals, "relu", dtype)  # the same bits (test below)
    w64, a64 = weight.double(), a.double()
    y64 = F.conv2d(a64, w64, stride=stride)
    assert y.shape == y64.shape and y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    # a dot product of C_in float32 products: (C_in + 2) u sum |a w|; bfloat16 output: plus its half ulp
    bound = (c + 2) * U32 * F.conv2d(a64.abs(), w64.abs(), stride=stride)
    if dtype == torch.bfloat16:
        bound = bound * (1 + U_BF16) + U_BF16 * y64.abs()
    err = (y.double() - y64).abs()
    assert bool((err <= bound).all()), f"worst error {float((err - bound).max()):.3g} above the bound"
    # statistics of the y returned (its stored values) against float64, by the float32 summation bounds
    # of m values: (m + 2) u sum |y| / m for the mean, (m + 2) u sum y^2 / m for the second moment
    yd = y.double()
    m = yd.numel() // yd.shape[1]
    m64, v64 = yd.mean((0, 2, 3)), yd.var((0, 2, 3), unbiased=False)
    assert bool(((mean.double() - m64).abs() <= (m + 2) * U32 * yd.abs().sum((0, 2, 3)) / m).all())
    assert bool(((var.double() - v64).abs() <= (m + 2) * U32 * (yd * yd).sum((0, 2, 3)) / m).all())


@pytest.mark.exactness
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_activation_applies_the_bits_the_apply_sweep_stores(gen, dtype, act):
    """The applied map inside the blocks is the apply sweep's bit for bit (the one formula of
    csrc/bnff_sweeps.h, apply_row): the fused output equals libxsmm's plain convolution of the stored
    map, through the same micro-kernels and blocks."""
    _needs(dtype)
    sources, means, f1s, betas, residuals = _group(gen, "identity", dtype)
    weight = (torch.randn(32, 24, 1, 1, generator=gen) / 5).to(dtype)
    y, _, _ = cpu.pointwise_forward(sources, means, f1s, betas, residuals, act, weight)
    a = cpu.apply(sources, means, f1s, betas, residuals, act, dtype)
    plain, _, _ = cpu.pointwise_forward([], [], [], [], [a], None, weight)
    assert torch.equal(y, plain)
    ref = F.conv2d(activations.forward(act, sum(
        (torch.cat(s, 1).double() - m.double().view(1, -1, 1, 1)) * f.double().view(1, -1, 1, 1)
        + b.double().view(1, -1, 1, 1) for s, m, f, b in zip(sources, means, f1s, betas)) + residuals[0].double()),
        weight.double())
    # the applied map differs from float64 by its own roundings (a few ulp of a): a loose end-to-end check
    scale = F.conv2d(a.double().abs(), weight.double().abs())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert bool(((y.double() - ref).abs() <= tol * (scale + 1)).all())


def test_float32_maps_under_bfloat16_weights_round_a_once(gen):
    """Autocast's case of float32 maps into a bfloat16 convolution: a rounded to bfloat16 once (as the
    consumer's cast of the stored float32 a would), then multiplied."""
    _needs(torch.bfloat16)
    sources, means, f1s, betas, residuals = _group(gen, "lone", torch.float32)
    weight = (torch.randn(16, 24, 1, 1, generator=gen) / 5).to(torch.bfloat16)
    y, _, _ = cpu.pointwise_forward(sources, means, f1s, betas, residuals, "silu", weight)
    a = cpu.apply(sources, means, f1s, betas, residuals, "silu", torch.float32).to(torch.bfloat16)
    assert torch.equal(y, cpu.pointwise_forward([], [], [], [], [a], None, weight)[0])


def test_block_rows_do_not_change_the_output_only_the_statistics_order(gen):
    _needs(torch.float32)
    sources, means, f1s, betas, residuals = _group(gen, "lone", torch.float32, n=4, hw=10)
    weight = torch.randn(24, 24, 1, 1, generator=gen) / 5
    outs = [cpu.pointwise_forward(sources, means, f1s, betas, residuals, "relu", weight, 1, True, b) for b in (16, 48, 0)]
    for y, mean, var in outs[1:]:
        assert torch.equal(y, outs[0][0])  # each output row is one dot product per channel, whatever the block
        torch.testing.assert_close(mean, outs[0][1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(var, outs[0][2], rtol=1e-5, atol=0)


def test_libxsmm_leaves_thread_pinning_to_the_user():
    """libxsmm's initialisation puts OMP_PROC_BIND=TRUE into the environment when no affinity is set;
    OpenMP threads started afterwards then shared one core (a training step 7x slower). bnff takes it
    out again unless the user had set it."""
    _needs(torch.float32)
    if "OMP_PROC_BIND" in os.environ:
        pytest.skip("OMP_PROC_BIND is the user's here")
    code = ("import ctypes, os; from bnff.ops.backends import cpu; assert cpu.pointwise_target(); "
            "libc = ctypes.CDLL(None); libc.getenv.restype = ctypes.c_char_p; print(libc.getenv(b'OMP_PROC_BIND'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"


def test_bad_calls_name_the_problem(gen):
    _needs(torch.float32)
    sources, means, f1s, betas, residuals = _group(gen, "lone", torch.float32)
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous \(C_out, 24, 1, 1\)"):
        cpu.pointwise_forward(sources, means, f1s, betas, residuals, "relu", torch.randn(8, 24, 3, 3))
    with pytest.raises(RuntimeError, match="channels_last"):
        cpu.pointwise_forward([[sources[0][0].contiguous()]], means, f1s, betas, residuals, "relu", torch.randn(8, 24, 1, 1))
    with pytest.raises(RuntimeError, match="float32 weights need float32 feature maps"):
        bf = [[sources[0][0].to(torch.bfloat16)]]
        cpu.pointwise_forward(bf, means, f1s, betas, residuals, "relu", torch.randn(8, 24, 1, 1))


def test_without_libxsmm_it_says_why_and_how_to_install(monkeypatch):
    monkeypatch.setenv("BNFF_LIBXSMM", "0")
    libxsmm.find.cache_clear()
    try:
        found = libxsmm.find()
        assert found.version is None and found.cflags == [] and found.ldflags == []
        assert "BNFF_LIBXSMM=0" in found.why
        monkeypatch.setattr(libxsmm, "PREFIXES", ())
        monkeypatch.setattr(libxsmm, "_pkg_config", lambda: None)
        monkeypatch.delenv("BNFF_LIBXSMM")
        libxsmm.find.cache_clear()
        why = libxsmm.find().why
        assert "apt-get install libxsmm-dev" in why
        if cpu.available():
            assert cpu.pointwise_why() == why and cpu.pointwise_target() is None
            with pytest.raises(RuntimeError, match="pointwise convolution is unavailable: libxsmm not found"):
                cpu.pointwise_forward([], [], [], [], [torch.randn(1, 2, 3, 3).to(memory_format=torch.channels_last)],
                                      None, torch.randn(2, 2, 1, 1))
    finally:
        libxsmm.find.cache_clear()


def test_the_build_key_says_whether_libxsmm_was_found(monkeypatch):
    if libxsmm.find().version is None:
        pytest.skip("libxsmm is not installed here: both builds are without it")
    with_it = cpu.build_spec("avx2")
    monkeypatch.setenv("BNFF_LIBXSMM", "0")
    libxsmm.find.cache_clear()
    try:
        without = cpu.build_spec("avx2")
    finally:
        libxsmm.find.cache_clear()
    assert with_it[0] != without[0] and any(f.startswith("-DBNFF_LIBXSMM=") for f in with_it[2])
    assert not any(f.startswith("-DBNFF_LIBXSMM") for f in without[2])


def test_ci_runs_the_fused_path():
    """.ci/run installs libxsmm-dev, so that CI exercises the kernels above instead of skipping them."""
    if not os.environ.get("CI"):
        pytest.skip("not under CI")
    assert cpu.pointwise_why(torch.float32) is None


# ---- the bnff_pw scheme in training ------------------------------------------------------------------

class _Net(nn.Module):
    """Every way a group reaches the fused pointwise convolutions: a lone BN into two 1x1s, one of stride 2
    (relu), a BN plus a shortcut into a stride-2 1x1 (hardswish), two BNs into a 1x1 (relu_1), a BN over a
    concatenation of two 1x1 outputs into a 1x1 (relu_2); each 1x1's output statistics from its epilogue."""

    def __init__(self) -> None:
        super().__init__()
        conv = lambda i, o, k=1, s=1: nn.Conv2d(i, o, k, s, k // 2, bias=False)  # noqa: E731
        self.stem, self.bn0 = conv(3, 16, 3), nn.BatchNorm2d(16)
        self.c1, self.bn1 = conv(16, 32), nn.BatchNorm2d(32)
        self.c2, self.bn2 = conv(32, 32, 3), nn.BatchNorm2d(32)
        self.c3, self.bn3 = conv(32, 32, 1, 2), nn.BatchNorm2d(32)
        self.c3b, self.bn3b = conv(32, 32, 1, 2), nn.BatchNorm2d(32)
        self.c5, self.c6, self.bn4 = conv(32, 24), conv(16, 24, 1, 2), nn.BatchNorm2d(48)
        self.c7, self.bn5 = conv(48, 40), nn.BatchNorm2d(40)
        self.fc = nn.Linear(40, 10)

    def forward(self, x):
        a0 = F.relu(self.bn0(self.stem(x)))
        a1 = F.silu(self.bn1(self.c1(a0)))
        a2 = F.hardswish(self.bn2(self.c2(a1)) + a1)
        a3 = F.relu(self.bn3(self.c3(a2)) + self.bn3b(self.c3b(a1)))
        a4 = F.relu(self.bn4(torch.cat([self.c5(a3), self.c6(a0)], 1)))
        a5 = F.relu(self.bn5(self.c7(a4)))
        return self.fc(a5.mean((2, 3)))


class _LoneNet(nn.Module):
    """Lone groups whose one consumer is a stride-1 1x1 convolution (``pointwise_backward``): ReLU (a0),
    ReLU6 (a1, MobileNetV2's), Hardswish (a2: its derivative from z), no activation (a3) and a BN over the
    concatenation of two maps (a4, DenseNet's)."""

    def __init__(self) -> None:
        super().__init__()
        conv = lambda i, o, k=1: nn.Conv2d(i, o, k, 1, k // 2, bias=False)  # noqa: E731
        self.stem, self.bn0 = conv(3, 16, 3), nn.BatchNorm2d(16)
        self.c1, self.bn1 = conv(16, 24), nn.BatchNorm2d(24)
        self.c2, self.bn2 = conv(24, 32), nn.BatchNorm2d(32)
        self.c3, self.bn3 = conv(32, 16), nn.BatchNorm2d(16)
        self.c4, self.bn4 = conv(16, 16), nn.BatchNorm2d(40)
        self.c5, self.bn5 = conv(40, 16), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y1 = self.c1(F.relu(self.bn0(self.stem(x))))
        y3 = self.c3(F.hardswish(self.bn2(self.c2(F.relu6(self.bn1(y1))))))
        y4 = self.c4(self.bn3(y3))
        y5 = self.c5(F.relu(self.bn4(torch.cat([y4, y1], 1))))
        return self.fc(F.relu(self.bn5(y5)).mean((2, 3)))


_LONE = ["bn3", "hardswish", "relu", "relu6", "relu_1"]  # the groups (by result) that run pointwise_backward


def _batch(gen, n=4):
    return lambda: (torch.randn(n, 3, 12, 12, generator=gen), torch.randint(0, 10, (n,), generator=gen))


def _assert_tracks_eager(steps) -> None:
    """bf16 is far from float64 on both sides: per step, the median tensor and the output each within K x
    eager's error (``compare_with_float64``'s steps)."""
    for qs in steps:
        ours, eager = (sorted(getattr(q, side) / q.size for q in qs if q.size > 0) for side in ("bnff", "eager"))
        assert ours[len(ours) // 2] <= K * eager[len(eager) // 2]
        out = next(q for q in qs if q.name == "output")
        assert out.bnff <= K * out.eager


@pytest.fixture
def fused_pointwise(monkeypatch):
    """Every eligible group's consumers fused (no timing), the kernel counters' deltas afterwards."""
    _needs(torch.float32)
    monkeypatch.setattr(pointwise, "MODE", "on")
    return cpu.kernel_calls()


def test_the_plan_marks_each_pointwise_group_and_epilogue():
    from bnff.graph.layers import build
    from bnff.plan import plan_graph
    plan, _, _ = plan_graph(build(_Net(), (2, 3, 12, 12)).gm)
    assert sorted(len(g.consumers) for g in plan.groups if g.pointwise) == [1, 1, 1, 2]
    assert sorted(s for g in plan.groups for s in g.stats_in_producer) == ["c1", "c3", "c5", "c6", "c7"]
    for g in plan.groups:
        kinds = [s.kind for s in g.schedules["bnff_pw"].forward]
        assert ("apply" in kinds) != g.pointwise and kinds.count("pointwise") == (len(g.consumers) if g.pointwise else 0)
        assert kinds.count("epilogue_stats") == len(g.stats_in_producer)
        bp = g.schedules["bnff_pw"].kinds("bp")
        assert (bp == ("pointwise_backward", "input_grad_x")) == g.pointwise_backward
        assert g.pointwise_backward or g.schedules["bnff_pw"].backward == g.schedules["bnff"].backward
    assert [g.name for g in plan.groups if g.pointwise_backward] == ["relu_2"]  # lone, its one 1x1 of stride 1


@pytest.mark.exactness
def test_training_steps_as_accurate_as_eager_in_float32(gen, fused_pointwise):
    torch.manual_seed(0)
    model = _Net()
    channel_stats = cpu.kernel_calls()["channel_stats/nhwc/float32"]
    assert_as_accurate_as_eager(compare_with_float64(model, _batch(gen), steps=2, channels_last=True, backend="cpu"))
    ran = cpu.kernel_calls() - fused_pointwise
    assert ran["pointwise/nhwc/float32"] == 2 * 5  # c1, c3, c5, c6, c7 per step
    # only the stem's, c2's and c3b's outputs are swept for their statistics; the five 1x1s' come from their epilogues
    assert cpu.kernel_calls()["channel_stats/nhwc/float32"] - channel_stats == 2 * 3


# (model, the kernel whose calls prove the fused path ran, its calls per step)
RUNS = [(_Net, "pointwise", 5), (_LoneNet, "pointwise_backward", len(_LONE))]


@pytest.mark.exactness
@pytest.mark.parametrize("net, kernel, per_step", RUNS)
def test_training_steps_track_eager_under_bfloat16_autocast(gen, fused_pointwise, net, kernel, per_step):
    _needs(torch.bfloat16)
    torch.manual_seed(0)
    steps = compare_with_float64(net(), _batch(gen), steps=2, autocast=torch.bfloat16, channels_last=True,
                                 backend="cpu")
    assert (cpu.kernel_calls() - fused_pointwise)[f"{kernel}/nhwc/bfloat16"] == 2 * per_step
    _assert_tracks_eager(steps)


@pytest.mark.parametrize("net, kernel, per_step", RUNS)
def test_moves_exactly_the_bytes_of_the_bnff_pw_plan(gen, fused_pointwise, net, kernel, per_step):
    torch.manual_seed(0)
    model = net().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 12, 12, generator=gen).to(memory_format=torch.channels_last)
    assert assert_moves_what_the_plan_says(model, x, scheme="bnff_pw") == 6
    assert (cpu.kernel_calls() - fused_pointwise)[f"{kernel}/nhwc/float32"] == per_step


def test_auto_times_both_paths_once_per_shape_and_off_runs_none(gen, monkeypatch):
    _needs(torch.float32)
    model = bnff.restructure(_Net(), backend="cpu").to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 12, 12, generator=gen).to(memory_format=torch.channels_last)
    monkeypatch.setattr(pointwise, "MODE", "auto")
    monkeypatch.setattr(pointwise, "_choices", {})
    model(x).sum().backward()
    # one decision per pointwise group's shapes, and one for the backward of relu_2 (pointwise_backward)
    assert len(pointwise.choices()) == 5 and sum(k[0] == "backward" for k in pointwise.choices()) == 1
    model(x).sum().backward()
    assert len(pointwise.choices()) == 5
    monkeypatch.setattr(pointwise, "MODE", "off")
    before = cpu.kernel_calls()
    model(x).sum().backward()
    ran = cpu.kernel_calls() - before
    assert ran["pointwise/nhwc/float32"] == ran["pointwise_backward/nhwc/float32"] == 0


def test_the_fusion_report_lists_the_pointwise_consumers_and_whether_they_run(monkeypatch):
    report = bnff.fusion_report(bnff.restructure(_Net(), backend="cpu"))
    assert sorted(report.pointwise) == ["c1", "c3", "c5", "c6", "c7"]
    line = report.pointwise_where()
    assert line.startswith("5 1x1 consumers") and ("libxsmm target" in line if cpu.pointwise_why() is None
                                                   else "off: " in line)
    assert "fused pointwise convolutions: 5 1x1 consumers" in str(report)
    assert "the backend is not cpu" in bnff.fusion_report(bnff.restructure(_Net(), backend="reference")).pointwise_where()


def test_pointwise_covers_what_the_kernel_takes(gen):
    _needs(torch.float32)
    x = torch.randn(2, 8, 5, 5, generator=gen).to(memory_format=torch.channels_last)
    w32, w16 = torch.randn(4, 8, 1, 1), torch.randn(4, 8, 1, 1).to(torch.bfloat16)
    assert cpu.pointwise_covers([x, x.clone()], w32)
    assert not cpu.pointwise_covers([x.contiguous()], w32)  # NCHW
    assert not cpu.pointwise_covers([x, x.to(torch.bfloat16)], w32)  # two dtypes
    assert not cpu.pointwise_covers([x.to(torch.bfloat16)], w32)  # float32 weights need float32 maps
    assert not cpu.pointwise_covers([x.double()], w32)
    assert cpu.pointwise_covers([x], w16) == (cpu.pointwise_why(torch.bfloat16) is None)


def test_kernels_that_do_not_link_with_libxsmm_are_built_without_it(monkeypatch):
    """libxsmm is optional: a build that fails with it is retried without it, after one warning, instead of
    leaving the whole backend to the reference sweeps (no real build here: the builder is replaced)."""
    if libxsmm.find().version is None:
        pytest.skip("libxsmm is not installed here")
    calls = []

    def fake_load(name, sources, directory, flags, verbose=False, ldflags=()):
        calls.append((list(flags), list(ldflags)))
        if any(f.startswith("-DBNFF_LIBXSMM") for f in flags):
            raise RuntimeError("undefined reference to `libxsmm_init'")

    monkeypatch.setattr(cpu, "load_extension", fake_load)
    monkeypatch.setattr(cpu, "_register_fakes", lambda: None)
    monkeypatch.setattr(cpu, "_state", {})
    try:
        with pytest.warns(RuntimeWarning, match="building them without it"):
            cpu._build()
        assert len(calls) == 2 and calls[1][1] == [] and not any(f.startswith("-DBNFF_LIBXSMM") for f in calls[1][0])
        assert "did not build with libxsmm" in libxsmm.find().why
    finally:
        libxsmm._disabled.clear()
        libxsmm.find.cache_clear()
    assert libxsmm.find().version is not None


# ---- the fused backward: cpu.pointwise_backward and the plan's pointwise_backward step ----------------

def _backward_case(gen, dtype: torch.dtype, pattern: str, cout: int = 40):
    """A lone group's BN input (its sources), mean, F1, beta, a 1x1 weight and the gradient dy of its output."""
    sources, means, f1s, betas, _ = _group(gen, pattern, dtype)
    x = sources[0]
    c = sum(s.shape[1] for s in x)
    weight = (torch.randn(cout, c, 1, 1, generator=gen) / c ** 0.5).to(dtype)
    dy = torch.randn(x[0].shape[0], cout, *x[0].shape[2:], generator=gen).to(dtype).contiguous(
        memory_format=torch.channels_last)
    return x, means[0], f1s[0], betas[0], weight, dy


def _mag(t: torch.Tensor) -> torch.Tensor:
    return t.double().abs()


@pytest.mark.exactness
@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("pattern", ["lone", "concat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_within_roundoff_of_float64(gen, dtype, pattern, act):
    """g = dy W (a dot product of C_out terms), dW = sum over the m rows of dy a (a as the apply sweep
    stores it) and S1, S2 of the returned g with x, each against float64 by its float32 bound (bfloat16
    outputs: plus their half ulp)."""
    _needs(dtype)
    x, mean, f1, beta, weight, dy = _backward_case(gen, dtype, pattern)
    key = f"pointwise_backward/nhwc/{str(dtype).removeprefix('torch.')}"
    before = cpu.kernel_calls()[key]
    g, dw, s1, s2c = cpu.pointwise_backward(x, mean, f1, beta, act, dy, weight)
    assert cpu.kernel_calls()[key] == before + 1
    assert g.dtype == dw.dtype == dtype and g.is_contiguous(memory_format=torch.channels_last)
    a = cpu.apply([x], [mean], [f1], [beta], [], act, dtype)
    cout, m = weight.shape[0], a.numel() // a.shape[1]
    half_ulp = U_BF16 if dtype == torch.bfloat16 else 0.0

    def within(got, want, mag, terms):
        bound = (terms + 2) * U32 * mag * (1 + half_ulp) + half_ulp * want.abs()
        err = (got.double() - want).abs()
        assert bool((err <= bound).all()), f"worst error {float((err - bound).max()):.3g} above the bound"
    within(g, torch.einsum("nohw,oc->nchw", dy.double(), weight.double()[:, :, 0, 0]),
           torch.einsum("nohw,oc->nchw", _mag(dy), _mag(weight)[:, :, 0, 0]), cout)
    within(dw, torch.einsum("nohw,nchw->oc", dy.double(), a.double())[:, :, None, None],
           torch.einsum("nohw,nchw->oc", _mag(dy), _mag(a))[:, :, None, None], m)
    xc = torch.cat(x, 1).double() - mean.double().view(1, -1, 1, 1)
    d = g.double() * ((xc * f1.double().view(1, -1, 1, 1) + beta.double().view(1, -1, 1, 1)) > 0) if act else g.double()
    for got, terms in ((s1, d), (s2c, d * xc)):  # m float32 additions of one-rounding terms (x - mu: one more)
        want, mag = terms.sum((0, 2, 3)) / m, terms.abs().sum((0, 2, 3)) / m
        assert bool(((got.double() - want).abs() <= (m + 4) * U32 * mag).all())


@pytest.mark.exactness
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_every_activation_takes_the_sums_grad_stats_x_takes(gen, dtype, act):
    """For every activation of the table: S1, S2 are grad_stats_x's over the same g and x (the same
    derivative, recomputed from x; only the order of the blocks' float32 sums differs, so within twice
    their summation bound, |f'| <= 2), and a is recomputed with the apply sweep's bits: g and dW equal
    bit for bit libxsmm's plain backward of the stored a (the same kernels and blocks); dW within the
    float32 summation bound of float64."""
    _needs(dtype)
    x, mean, f1, beta, weight, dy = _backward_case(gen, dtype, "lone")
    g, dw, s1, s2c = cpu.pointwise_backward(x, mean, f1, beta, act, dy, weight)
    r1, r2 = cpu.grad_stats_x(g, act, x, mean, f1, beta, dtype)
    m = g.numel() // g.shape[1]
    xc = x[0].double() - mean.double().view(1, -1, 1, 1)
    for got, want, mag in ((s1, r1, _mag(g)), (s2c, r2, _mag(g) * xc.abs())):
        bound = 2 * (m + 4) * U32 * 2 * mag.sum((0, 2, 3)) / m
        assert bool(((got.double() - want.double()).abs() <= bound).all())
    a = cpu.apply([x], [mean], [f1], [beta], [], act, dtype)
    g_plain, dw_plain = cpu.libxsmm_conv_backward(a, dy, weight)
    assert torch.equal(g, g_plain) and torch.equal(dw, dw_plain)
    want = torch.einsum("nohw,nchw->oc", dy.double(), a.double())[:, :, None, None]
    half_ulp = U_BF16 if dtype == torch.bfloat16 else 0.0
    bound = (m + 2) * U32 * torch.einsum("nohw,nchw->oc", _mag(dy), _mag(a))[:, :, None, None] * (1 + half_ulp)
    assert bool(((dw.double() - want).abs() <= bound + half_ulp * want.abs()).all())


def test_backward_blocks_and_bad_calls(gen):
    """Block rows (odd ones too: bfloat16 pads the VNNI pair) change only the order of sums; bad calls name the
    problem."""
    for dtype in (torch.float32, torch.bfloat16):
        _needs(dtype)
        x, mean, f1, beta, weight, dy = _backward_case(gen, dtype, "lone")
        outs = [cpu.pointwise_backward(x, mean, f1, beta, "relu", dy, weight, True, b) for b in (0, 16, 27)]
        for g, dw, s1, s2c in outs[1:]:
            assert torch.equal(g, outs[0][0])  # one dot product per element, whatever the block
            torch.testing.assert_close(dw, outs[0][1], rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
            torch.testing.assert_close(s1, outs[0][2], rtol=1e-5, atol=1e-6)
        g, dw, _, _ = cpu.pointwise_backward(x, mean, f1, beta, "relu", dy, weight, wgrad=False)
        assert dw is None and torch.equal(g, outs[0][0])
    x, mean, f1, beta, weight, dy = _backward_case(gen, torch.float32, "lone")
    with pytest.raises(RuntimeError, match="dy must be a channels_last"):
        cpu.pointwise_backward(x, mean, f1, beta, "relu", dy[:, :, 1:].contiguous(memory_format=torch.channels_last),
                               weight)  # the output of a stride-2 convolution
    with pytest.raises(RuntimeError, match="all float32 or all bfloat16"):
        cpu.pointwise_backward(x, mean, f1, beta, "relu", dy, weight.to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="channels_last"):
        cpu.pointwise_backward([t.contiguous() for t in x], mean, f1, beta, "relu", dy, weight)


def test_the_plan_runs_the_backward_of_lone_groups_in_their_consumer():
    from bnff.graph.layers import build
    from bnff.plan import plan_graph
    plan, _, _ = plan_graph(build(_LoneNet(), (2, 3, 12, 12)).gm)
    assert sorted(g.name for g in plan.groups if g.pointwise_backward) == _LONE
    for g in plan.groups:
        if g.pointwise_backward:
            step = g.schedules["bnff_pw"].backward[0]
            assert step.reads == () and {r.role for r in step.writes} == {"s1", "s2"} and step.recomputes == (g.a(),)


@pytest.mark.exactness
def test_lone_training_steps_as_accurate_as_eager_in_float32(gen, fused_pointwise):
    torch.manual_seed(0)
    stats_x = cpu.kernel_calls()["grad_stats_x/nhwc/float32"]
    assert_as_accurate_as_eager(compare_with_float64(_LoneNet(), _batch(gen), steps=2, channels_last=True, backend="cpu"))
    ran = cpu.kernel_calls() - fused_pointwise
    assert ran["pointwise_backward/nhwc/float32"] == 2 * len(_LONE)
    # every lone group's S1, S2 in its consumer but bn5's (into the mean): one grad_stats_x sweep per step
    assert cpu.kernel_calls()["grad_stats_x/nhwc/float32"] - stats_x == 2


# ---- libxsmm's plain convolutions: bnff bench's conv floor and BNFF_POINTWISE=libxsmm -------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_libxsmm_conv_and_its_backward_within_roundoff_of_float64(gen, dtype):
    _needs(dtype)
    x = torch.randn(3, 32, 7, 9, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(48, 32, 1, 1, generator=gen) / 6).to(dtype)
    dy = torch.randn(3, 48, 7, 9, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    calls = cpu.kernel_calls()
    y = cpu.libxsmm_conv(x, w, 2)
    g, dw = cpu.libxsmm_conv_backward(x, dy, w)
    ran = cpu.kernel_calls() - calls
    name = str(dtype).removeprefix("torch.")
    assert ran[f"pointwise/nhwc/{name}"] == ran[f"pointwise_backward/nhwc/{name}"] == 1
    half_ulp = U_BF16 if dtype == torch.bfloat16 else 0.0
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    for got, want, mag, terms in (
            (y, F.conv2d(x64, w64, stride=2), F.conv2d(x64.abs(), w64.abs(), stride=2), 32),
            (g, torch.einsum("nohw,oc->nchw", dy64, w64[:, :, 0, 0]), torch.einsum("nohw,oc->nchw", dy64.abs(), w64.abs()[:, :, 0, 0]), 48),
            (dw, torch.einsum("nohw,nchw->oc", dy64, x64)[:, :, None, None],
             torch.einsum("nohw,nchw->oc", dy64.abs(), x64.abs())[:, :, None, None], 3 * 7 * 9)):
        bound = (terms + 2) * U32 * mag * (1 + half_ulp) + half_ulp * want.abs()
        assert bool(((got.double() - want).abs() <= bound).all())


def test_libxsmm_mode_runs_bnff_with_its_1x1_convolutions_on_libxsmm_unfused(gen, monkeypatch):
    """BNFF_POINTWISE=libxsmm (``bnff bench``'s bnff_libxsmm): the same steps as bnff, sweeps and all, with the
    pointwise groups' 1x1 convolutions (forward; the lone groups' backward too) on libxsmm; as accurate."""
    _needs(torch.float32)
    monkeypatch.setattr(pointwise, "MODE", "libxsmm")
    torch.manual_seed(0)
    calls = cpu.kernel_calls()
    assert_as_accurate_as_eager(compare_with_float64(_LoneNet(), _batch(gen), steps=2, channels_last=True, backend="cpu"))
    ran = cpu.kernel_calls() - calls
    assert ran["pointwise/nhwc/float32"] == 2 * 5 and ran["pointwise_backward/nhwc/float32"] == 2 * len(_LONE)
    # unfused: every 1x1 output's statistics swept (none handed over), every lone group's S1, S2 by grad_stats_x
    assert ran["grad_stats_x/nhwc/float32"] == 2 * (len(_LONE) + 1)
    assert ran["channel_stats/nhwc/float32"] == 2 * 6
