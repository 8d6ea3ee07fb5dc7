"""Shared test helpers: side-by-side eager vs bnff training on fresh random inputs."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import bnff
from bnff.ops import backends
from bnff.train import training_loss


# The numerics rule of the suite (issue 12): an fp32 (or bf16) result of bnff may be at most K times
# as far from float64 as eager PyTorch's result on the same machine, inputs and weights, plus a floor
# of FLOOR times the quantity's own float64 size (for true zeros, such as the gradient of a conv bias
# feeding a training-mode BN, where both are rounding noise). Nothing here is tuned to a CPU: the
# bound moves with whatever kernels ATen, oneDNN and MKL pick on this one.
K = 4.0
FLOOR = 1e-6
# float64 exactness: half of float64's digits (sqrt(eps) = 1.5e-8); what differs between two float64
# implementations is rounding, 1e-16 per operation, amplified by depth far less than 1e8.
FLOAT64_BOUND = torch.finfo(torch.float64).eps ** 0.5


@pytest.fixture(autouse=True, params=["reference", "cpu", "triton"])
def every_backend(request, monkeypatch):
    """Run the test once per backend (``reference``, the fused ``cpu`` kernels and, in modules that set
    ``TRITON = True``, the ``triton`` kernels in Triton's interpreter: conftest deselects it elsewhere): it
    becomes the default of ``bnff.restructure``. Import this fixture into a test module to apply it there.

    On ``cpu`` the test fails unless the kernels built and ran: the kernels' own entry counters must
    have moved, and no sweep on float32/bfloat16 tensors may have fallen back to the reference. float64
    is not covered by the kernels (it runs the reference sweeps, ``cpu.fallbacks()`` says so): float64
    tests run on ``reference`` only (``indirect`` parametrization of this fixture)."""
    from bnff.ops.backends import cpu, triton

    monkeypatch.setattr(backends, "_default", request.param)
    if request.param == "triton":
        calls, fell = triton.kernel_calls(), triton.fallbacks()
        yield request.param
        fallen = {k: v for k, v in (triton.fallbacks() - fell).items() if k[1] != "float64"}
        assert sum((triton.kernel_calls() - calls).values()) > 0, "the triton kernels never ran"
        assert not fallen, f"sweeps fell back to the reference on the triton backend: {fallen}"
        return
    if request.param != "cpu":
        yield request.param
        return
    assert cpu.available(), f"the cpu backend's kernels did not build: {cpu._state.get('why')}"
    calls, fell = cpu.kernel_calls(), cpu.fallbacks()
    yield request.param
    ran = cpu.kernel_calls() - calls
    # float64 runs the reference sweeps by design, said and counted by reason; anything else falling back
    # (an activation of bnff.activations included: the kernels compute every one) is a defect
    fallen = {k: v for k, v in (cpu.fallbacks() - fell).items() if k[1] != "float64"}
    assert sum(ran.values()) > 0, "the cpu kernels never ran: this test compared the reference with itself"
    assert not fallen, f"sweeps fell back to the reference on the cpu backend: {fallen}"


reference_only = pytest.mark.parametrize("every_backend", ["reference"], indirect=True)
cpu_only = pytest.mark.parametrize("every_backend", ["cpu"], indirect=True)
"""For whole-network fp32 tests whose math the reference backend already passes in float64 and in the
pattern tests: one run, on the fused kernels (keeps make test within its time budget)."""
"""For float64 tests (the cpu kernels do not cover float64: it would run the reference sweeps again)
and tests that run no sweep (restructuring and reports only): one run, on ``reference``."""
triton_only = pytest.mark.parametrize("every_backend", ["triton"], indirect=True)
"""For tests of the triton backend itself (its kernels in Triton's interpreter)."""


def rel_err(a: Tensor, b: Tensor, floor: float = 0.0) -> float:
    """max |a - b| / max(max |b|, floor), in float64.

    ``floor`` is for tensors whose true value is zero (a convolution bias feeding a training-mode
    BN has zero gradient; both sides are then rounding noise): pass the scale of the model's
    largest gradient, so noise is measured against it.
    """
    a, b = a.detach().double(), b.detach().double()
    scale = max(b.abs().max().item() if b.numel() else 0.0, floor)
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Give every BN non-trivial gamma (some negative), beta and running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 1.5 - 0.25)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def logits_and_loss(y, target: Tensor | None) -> tuple[Tensor, Tensor]:
    """All outputs concatenated (Inception-v3 returns (logits, aux_logits) in training) and the loss:
    ``bnff train``'s (cross-entropy, aux weighted 0.4) or, without targets, mean square (aux 0.4)."""
    outs = [o for o in (y if isinstance(y, tuple) else (y,)) if o is not None]
    if target is None:
        loss = sum(w * (o.double() ** 2).mean() for w, o in zip([1.0, 0.4], outs))
    else:
        loss = training_loss(y, target)
    return torch.cat([o.detach().flatten(1) for o in outs], 1), loss


@dataclass
class StepErrors:
    """Worst relative errors of one training step, bnff vs eager."""

    output: float
    input_grad: float
    param_grad: float
    buffers: float
    worst_param: str
    median_param_grad: float = 0.0


def train_side_by_side(model: nn.Module, make_input, steps: int = 3, lr: float = 0.05,
                       dtype: torch.dtype = torch.float32, backend: str | None = None,
                       autocast: torch.dtype | None = None, channels_last: bool = False) -> list[StepErrors]:
    """Train an eager copy and a restructured copy of ``model`` from the same weights on the same
    fresh random batches with SGD, and return the per-step errors of bnff against eager."""
    eager = copy.deepcopy(model).to(dtype)
    fused = bnff.restructure(copy.deepcopy(model).to(dtype), backend=backend)
    if channels_last:
        eager.to(memory_format=torch.channels_last)
        fused.to(memory_format=torch.channels_last)
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m in (eager, fused)]
    names = [n for n, _ in eager.named_parameters()]
    errors = []
    for step in range(steps):
        x, target = make_input()
        x = x.to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        results = []
        for m, opt in zip((eager, fused), opts):
            xi = x.clone().requires_grad_(True)
            with torch.random.fork_rng(), torch.autocast("cpu", dtype=autocast or torch.bfloat16,
                                                         enabled=autocast is not None):
                torch.manual_seed(1000 + step)  # the same dropout masks for both
                y, loss = logits_and_loss(m(xi), target)
            opt.zero_grad()
            loss.backward()
            results.append((y, xi.grad,
                            [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in m.parameters()],
                            [b.clone() for b in m.buffers()]))
            opt.step()
        (ye, ge, pe, be), (yf, gf, pf, bf) = results
        grad_scale = max(g.abs().max().item() for g in pe)
        perr = [rel_err(a, b, floor=1e-2 * grad_scale) for a, b in zip(pf, pe)]
        worst = max(range(len(perr)), key=perr.__getitem__)
        buf_scale = max((b.double().abs().max().item() for b in be if b.numel()), default=0.0)  # true zeros:
        # a running mean of a zero-mean map is rounding noise on both sides, measured against the buffers' scale
        errors.append(StepErrors(rel_err(yf, ye), rel_err(gf, ge), perr[worst],
                                 max((rel_err(a.double(), b.double(), floor=buf_scale) for a, b in zip(bf, be)),
                                     default=0.0),
                                 names[worst], sorted(perr)[len(perr) // 2]))
    return errors


def errors_vs_float64(model: nn.Module, x: Tensor, autocast: torch.dtype | None = None) -> tuple[list[float], list[float]]:
    """Per-tensor relative errors (output, input grad, every parameter grad) of eager and of bnff,
    each against eager float64 on the same weights and input (loss: mean of squared outputs)."""

    def grads(m: nn.Module, xx: Tensor, amp: torch.dtype | None) -> list[Tensor]:
        xx = xx.clone().requires_grad_(True)
        with torch.random.fork_rng(), torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            torch.manual_seed(1000)
            y, loss = logits_and_loss(m(xx), None)
        loss.backward()
        return [y, xx.grad] + [p.grad for p in m.parameters()]

    ref = grads(copy.deepcopy(model).double(), x.double(), None)
    eager = grads(copy.deepcopy(model), x, autocast)
    fused = grads(bnff.restructure(copy.deepcopy(model)), x, autocast)
    return [rel_err(a, b) for a, b in zip(eager, ref)], [rel_err(a, b) for a, b in zip(fused, ref)]


@dataclass
class Quantity:
    """One compared tensor: eager's and bnff's error against float64 and float64's size, as L2 norms."""

    name: str
    eager: float
    bnff: float
    size: float
    scale: float = 0.0  # what the floor is relative to besides the quantity's size: for a parameter
    # gradient the largest one of the step, for a running statistic the largest one. A true zero (the
    # gradient of a conv bias feeding a training-mode BN, the running mean of a zero-mean map) is
    # rounding noise on both sides, measured against its kind's scale.

    @property
    def bound(self) -> float:
        return K * self.eager + FLOOR * max(self.size, self.scale)

    @property
    def ok(self) -> bool:
        return self.bnff <= self.bound


def _err(a: Tensor, ref: Tensor) -> float:
    """||a - ref||_2 in float64: the L2 norm, not the largest element, so that one element's luck does
    not decide (the ratio of two implementations' largest errors is an extreme statistic)."""
    return torch.linalg.vector_norm(a.detach().double() - ref.detach().double()).item()


def _size(ref: Tensor) -> float:
    """||ref||_2 in float64."""
    return torch.linalg.vector_norm(ref.detach().double()).item()


def _run(m: nn.Module, x: Tensor, target, amp: torch.dtype | None, step: int) -> dict[str, Tensor]:
    xx = x.clone().requires_grad_(True)
    with torch.random.fork_rng(), torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        torch.manual_seed(1000 + step)  # the same dropout masks for all three
        y, loss = logits_and_loss(m(xx), target)
    loss.backward()
    out = {"output": y, "input grad": xx.grad}
    out.update({f"grad {n}": torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in m.named_parameters()})
    out.update({f"buffer {n}": b.clone() for n, b in m.named_buffers() if b.is_floating_point()})
    m.zero_grad(set_to_none=True)
    return out


def compare_with_float64(model: nn.Module, make_input, steps: int = 1, autocast: torch.dtype | None = None,
                         channels_last: bool = False, backend: str | None = None,
                         fused: nn.Module | None = None) -> list[list[Quantity]]:
    """Train float64 eager, fp32 eager and fp32 bnff copies of ``model`` from the same weights on the
    same fresh batches (weights held fixed, so the running statistics accumulate over ``steps``
    comparable steps) and return, per step, every output, input gradient, parameter gradient and
    floating-point buffer as a ``Quantity``. Integer buffers (``num_batches_tracked``) must be equal.
    ``fused``: an already restructured copy to use (e.g. with a mutation applied)."""
    ref = copy.deepcopy(model).double()
    eager = copy.deepcopy(model).float()
    fused = bnff.restructure(copy.deepcopy(model).float(), backend=backend) if fused is None else fused
    if channels_last:
        for m in (ref, eager, fused):
            m.to(memory_format=torch.channels_last)
    result = []
    for step in range(steps):
        x, target = make_input()
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        r = _run(ref, x.double(), target, None, step)
        e = _run(eager, x.float(), target, autocast, step)
        f = _run(fused, x.float(), target, autocast, step)
        ints = [(a, b) for a, b in zip(eager.buffers(), fused.buffers()) if not a.is_floating_point()]
        assert all(torch.equal(a, b) for a, b in ints), "num_batches_tracked differs"
        scale = {kind: max((_size(r[k]) for k in r if k.startswith(kind)), default=0.0) for kind in ("grad ", "buffer ")}
        result.append([Quantity(k, _err(e[k], r[k]), _err(f[k], r[k]), _size(r[k]),
                                next((v for kind, v in scale.items() if k.startswith(kind)), 0.0)) for k in r])
    return result


def output_and_grads(model: nn.Module, x: Tensor, params: list[Tensor]) -> list[Tensor]:
    """[y, d(sum y^2)/dp for p in params] of ``model`` on ``x``."""
    y = model(x)
    return [y, *torch.autograd.grad(y.square().sum(), params)]


def assert_compiled_tracks_plain(model: nn.Module, plain: nn.Module, compiled, x: Tensor,
                                 before_compiled=lambda: None) -> None:
    """``compiled`` (a ``torch.compile``d restructured copy of ``model``) as close to float64 as ``plain``
    (the same restructured without compiling) by the suite's rule: output and every parameter gradient.
    ``before_compiled`` runs just before the compiled model does (to read kernel counters)."""
    params = list(model.parameters())
    ref = copy.deepcopy(model).double()
    exact = output_and_grads(ref, x.double(), list(ref.parameters()))
    plain_t = output_and_grads(plain, x, params)
    before_compiled()
    got = output_and_grads(compiled, x, params)
    for i, (g, p, e) in enumerate(zip(got, plain_t, exact)):
        assert_rule(g, p, e, f"compiled output or gradient {i}")


def assert_rule(got: Tensor, eager: Tensor, ref: Tensor, name: str = "tensor") -> None:
    """One tensor by the suite's rule: ``got`` (bnff) at most ``K`` times as far from the float64
    ``ref`` as ``eager`` is, plus ``FLOOR`` of its size (``Quantity``)."""
    assert_as_accurate_as_eager([[Quantity(name, _err(eager, ref), _err(got, ref), _size(ref))]])


def assert_as_accurate_as_eager(steps: list[list[Quantity]]) -> None:
    """Every quantity of every step within the suite's rule (``K``, ``FLOOR``); the message lists the
    worst offenders with eager's error, bnff's and the bound."""
    bad = [(i, q) for i, qs in enumerate(steps) for q in qs if not q.ok]
    if bad:
        lines = [f"step {i} {q.name}: bnff {q.bnff:.3g} > bound {q.bound:.3g} (eager {q.eager:.3g}, size {q.size:.3g})"
                 for i, q in sorted(bad, key=lambda b: -b[1].bnff / max(b[1].bound, 1e-300))[:8]]
        raise AssertionError(f"{len(bad)} quantities less accurate than eager allows:\n" + "\n".join(lines))


def assert_aggregate_as_accurate_as_eager(steps: list[list[Quantity]], gradients: bool = True) -> None:
    """Whole-network fp32: the forward's quantities (outputs, running statistics) tensor by tensor by
    the rule; with ``gradients``, the input and parameter gradients by the median over tensors of the
    relative error, in the median step (the upper one for an even count: with two steps, both): at most
    ``K`` times eager's.

    In a deep fp32 network some pre-activation lands within rounding of a ReLU threshold every few
    steps (~1e-7 of its scale among millions of values), and any two implementations, eager fp32
    against float64 included, may put it on either side. That one mask element moves the gradients of
    every earlier layer by up to a few percent: which implementation suffers in a given step is luck
    (measured: a ResNet-18 step where bnff's median gradient error was 1e-3 against eager's 4e-6, and
    steps the other way round; a MobileNetV2 step 150x eager's from one ReLU6 element of one BN, the
    next steps 1x). So one step of three may be unlucky; an inaccuracy of bnff's own shows in every
    step. The forward is continuous (no mask) and is held to the rule exactly. Masks that the backward
    recomputes inconsistently with the forward are not luck: they are caught bit for bit by
    test_cpu_backend.test_recomputed_mask_is_bit_identical."""
    ratios = []
    for qs in steps:
        grads = [q for q in qs if q.name.startswith("grad ") or q.name == "input grad"]
        assert_as_accurate_as_eager([[q for q in qs if q not in grads]])
        mid = len(grads) // 2
        rel = sorted(q.bnff / q.size for q in grads if q.size > 0)[mid]
        rel_eager = sorted(q.eager / q.size for q in grads if q.size > 0)[mid]
        ratios.append((rel + FLOOR) / (rel_eager + FLOOR))
    if gradients:
        ratio = sorted(ratios)[len(ratios) // 2]
        assert ratio <= K, f"median gradient error {ratio:.3g} x eager's in the median step (steps: {ratios})"


def assert_moves_what_the_plan_says(model: nn.Module, x: torch.Tensor, scheme: str = "bnff") -> int:
    """One training step of ``bnff.restructure(model, backend="cpu")`` on ``x`` with the byte recorder
    on: every fused group's recorded forward, backward and kept feature-map bytes equal its plan's
    ``scheme`` schedule priced by ``bnff.traffic`` (``x``'s element size), and the plan the analysis
    makes of ``model`` is the one the execution runs. Returns the number of groups checked.

    ``scheme`` "bnff_pw" (run with ``bnff.ops.pointwise.MODE`` "on"): a pointwise group's consumers
    read its inputs in their prologue, so its forward is compared together with its consumers' (the
    recorder's consumer scopes against the plan's and the convolution layers' own forward bytes); a
    ``pointwise_backward`` group's consumer backward (the fused call, in the consumer's scope) moves the
    convolution layer's backward bytes less one read of dy, and its own backward the plan's."""
    from bnff.graph.layers import build
    from bnff.ops.backends import cpu
    from bnff.ops.record import Recorder
    from bnff.plan import plan_graph
    from bnff.traffic import Assumptions
    from bnff.traffic.account import account, group_costs

    fused = bnff.restructure(model, backend="cpu")
    calls, fell = cpu.kernel_calls(), cpu.fallbacks()
    with Recorder(model) as rec:
        out = fused(x)
        sum(o.float().square().mean() for o in (out if isinstance(out, tuple) else (out,))).backward()
    assert sum((cpu.kernel_calls() - calls).values()) > 0, "the cpu kernels did not run"
    assert not (cpu.fallbacks() - fell), f"sweeps fell back to the reference: {cpu.fallbacks() - fell}"
    lg = build(model, tuple(x.shape))
    plan, _, _ = plan_graph(lg.gm)
    assert plan.as_dict() == bnff.fusion_plan(fused).as_dict(), "analysis and execution planned differently"
    eb = x.element_size()
    costs = group_costs(lg, plan, scheme, Assumptions(element_bytes=eb))
    layers = account(lg, plan, scheme, Assumptions(element_bytes=eb))
    bad = []
    for g in plan.groups:
        kept = sum(lg.numel(lg.node(r.node)) * eb for r in g.schedules[scheme].keeps if not r.vector)
        fp, want_fp = rec.moved[(g.name, "fp")], costs[g.name].fp_bytes
        if scheme == "bnff_pw" and g.pointwise:
            fp += sum(rec.moved[(f"{g.name}/consumer{i}", "fp")] for i in range(len(g.consumers)))
            want_fp += sum(layers[c].fp_read + layers[c].fp_write for c in g.consumers)
        got = (fp, rec.moved[(g.name, "bp")], rec.kept[g.name])
        want = (want_fp, costs[g.name].bp_bytes, kept)
        if scheme == "bnff_pw" and g.pointwise_backward:
            # its consumer's backward, the one fused call: the ifmap's bytes (x), dy, W in, g_a and dW out, which
            # is the convolution layer's dgrad and wgrad bytes with dy read once instead of twice
            c = g.consumers[0]
            got += (rec.moved[(f"{g.name}/consumer0", "bp")],)
            want += (layers[c].bp_dgrad + layers[c].bp_wgrad - lg.numel(lg.node(c)) * eb,)
        if got != want:
            bad.append(f"{g.name} ({g.pattern}): recorded fp/bp/kept {got}, plan {want}; ops "
                       f"{dict(rec.ops.get((g.name, 'fp'), {}))} | {dict(rec.ops.get((g.name, 'bp'), {}))}")
    assert not bad, "\n".join(bad)
    ran = {k[0] for k in rec.moved if "/" not in k[0]}  # "group/consumer0", "group/user": those layers' work
    assert ran <= {g.name for g in plan.groups}, f"sweeps ran outside the plan's groups: {ran}"
    return len(plan.groups)


def assert_bf16_tracks_eager(model: nn.Module, x: Tensor, dtype: torch.dtype = torch.bfloat16) -> None:
    """bf16 autocast keeps 8 mantissa bits, so eager bf16 is itself far off float64: bnff must be as close
    by the rule on the median tensor (output, input gradient, parameter gradients; ``errors_vs_float64``)
    and on the output, each within ``K`` times eager's error. ``dtype``: the autocast dtype (float16 too)."""
    eager, fused = errors_vs_float64(model, x, autocast=dtype)
    mid = len(eager) // 2
    assert sorted(fused)[mid] <= K * sorted(eager)[mid], (sorted(fused)[mid], sorted(eager)[mid])
    assert fused[0] <= K * eager[0], (fused[0], eager[0])


def measured_footprints(model: nn.Module, x: Tensor) -> tuple[int, int]:
    """(eager's, bnff's) saved-activation bytes of one training step on ``x``, measured
    (``bnff.memory.saved_activation_bytes``; bnff on the reference backend), after asserting that the
    footprint model (``bnff.traffic.compare``) prices both exactly as measured."""
    from bnff.memory import saved_activation_bytes
    from bnff.traffic import compare

    eager = saved_activation_bytes(copy.deepcopy(model), x)
    restructured = saved_activation_bytes(bnff.restructure(copy.deepcopy(model), backend="reference"), x)
    res = compare(model, tuple(x.shape))
    assert res["unfused"].summary()["footprint_bytes"] == eager
    assert res["bnff"].summary()["footprint_bytes"] == restructured
    return eager, restructured


def assert_float64_exact(model: nn.Module, make_input, steps: int = 2) -> None:
    """Train eager and bnff copies of ``model`` in float64 side by side (``train_side_by_side``): outputs,
    input gradients, parameter gradients and running statistics within ``FLOAT64_BOUND`` every step."""
    for e in train_side_by_side(model.double(), make_input, steps=steps, dtype=torch.float64):
        assert max(e.output, e.input_grad, e.param_grad, e.buffers) <= FLOAT64_BOUND, e

