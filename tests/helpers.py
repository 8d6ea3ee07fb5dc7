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


@pytest.fixture(autouse=True, params=backends.available())
def every_backend(request, monkeypatch):
    """Run the test once per backend (``reference`` and the fused ``cpu`` kernels): it becomes the
    default of ``bnff.restructure``. Import this fixture into a test module to apply it there."""
    monkeypatch.setattr(backends, "_default", request.param)
    return request.param


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
        errors.append(StepErrors(rel_err(yf, ye), rel_err(gf, ge), perr[worst],
                                 max((rel_err(a.double(), b.double()) for a, b in zip(bf, be)), default=0.0),
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
