"""The restructured BN operators that ``bnff.restructure`` puts into the graph.

Two graph-level functions replace every fused ``BatchNorm2d`` (seed 002 section 2.2/2.3):

* ``bn_statistics(c, bn)``: step 1 of the forward, a post-processing of the convolution that
  produced ``c``: per-channel mean and variance in one sweep (MVF), and the running-statistics
  update. Runs once per forward pass; no backward ever repeats it.
* ``bn_apply(terms, residuals, act, consumer)``: step 2, ``a = act(sum_k BN_k(c_k) + sum_j r_j)``,
  either handed straight to ``consumer`` (a convolution or pool, whose input is then recomputed
  in the backward instead of stored) or returned (materialized) when the result has several users.

The backward of ``bn_apply`` is the fused backward of seed 002: the consumer's dgrad gives
dL/da, step 1 forms dy = dL/da * act'(a) with S1, S2 per BN (eq. 16, 17, 19, 20), step 2 forms
dx = F1 * dy + B * x + C per BN (eq. 12). The same dy feeds every BN of a residual sum and is the
shortcut's gradient. Saved for backward: the convolution outputs ``c_k`` and (C,) vectors, the
shortcut tensors only when a consumer needs ``a`` recomputed, and the output itself only when it
is materialized with an activation (its mask; seed 002 Table 2, patterns (4)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bnff.ops import backends, bn_math, consumers

_PER_TERM = 5  # c, mean, var, gamma, beta


def _check_bn_input(c: Tensor, bn: nn.modules.batchnorm._BatchNorm) -> None:
    if c.dim() != 4:
        raise ValueError(f"expected 4D input (got {c.dim()}D input)")
    if c.shape[1] != bn.num_features:
        raise RuntimeError(f"{type(bn).__name__}({bn.num_features}) got an input with {c.shape[1]} channels, "
                           f"shape {tuple(c.shape)}")


def bn_statistics(c: Tensor, bn: nn.modules.batchnorm._BatchNorm, backend: str = "reference") -> tuple[Tensor, Tensor]:
    """Step 1 of a restructured BN forward: the statistics that ``bn`` normalizes ``c`` with.

    In training mode (or without running statistics) these are the mini-batch mean and biased
    variance, computed in one sweep by the backend (seed 002 eq. 1, 18), and the module's
    running statistics are updated exactly as PyTorch does. In eval mode with running statistics
    they are copies of ``running_mean`` and ``running_var``.

    Args:
        c: the producing convolution's output, (N, C, H, W).
        bn: the BatchNorm2d module being restructured (read at call time: mode, momentum, eps).
        backend: name of the sweep backend.
    Returns:
        (mean, var), each (C,) in the accumulation dtype, not requiring grad.
    Raises:
        ValueError: ``c`` is not 4-D, or has one value per channel in training (PyTorch's message).
    """
    _check_bn_input(c, bn)
    if not bn_math.uses_batch_stats(bn):
        acc = bn_math.accumulation_dtype(c.dtype, bn.running_mean.dtype)
        return bn.running_mean.detach().to(acc, copy=True), bn.running_var.detach().to(acc, copy=True)
    m = c.numel() // c.shape[1]
    if m == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {c.size()}")
    with torch.no_grad():
        mean, var = backends.get(backend).channel_stats(c)
    bn_math.update_running_stats(bn, mean, var, m)
    return mean, var


@dataclass(frozen=True)
class _TermSpec:
    eps: float
    batch: bool  # normalized with mini-batch statistics (their gradient terms B, C are live)


@dataclass(frozen=True)
class _Spec:
    terms: tuple[_TermSpec, ...]
    n_residuals: int
    act: str | None
    consumer: consumers.Consumer | None
    backend: str


def _amp_dtype(t: Tensor) -> torch.dtype | None:
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


class _ApplyConsume(torch.autograd.Function):
    """Fused BN apply (+ add + activation) [+ consumer]; see the module docstring."""

    @staticmethod
    def forward(ctx, spec: _Spec, *flat):
        T, R = len(spec.terms), spec.n_residuals
        cs, means, vars_, gammas, betas = (list(flat[i:_PER_TERM * T:_PER_TERM]) for i in range(_PER_TERM))
        residuals = list(flat[_PER_TERM * T:_PER_TERM * T + R])
        params = tuple(flat[_PER_TERM * T + R:])
        be = backends.get(spec.backend)
        f1s = [bn_math.scale(v, g, t.eps) for v, g, t in zip(vars_, gammas, spec.terms)]
        out_dtype = cs[0].dtype if cs else residuals[0].dtype
        for t in cs[1:] + residuals:
            out_dtype = torch.promote_types(out_dtype, t.dtype)
        a = be.apply(cs, means, f1s, betas, residuals, spec.act, out_dtype)
        amp = _amp_dtype(a)
        if spec.consumer is None:
            out, kept = a, ([a] if spec.act is not None else [None])
        else:
            out, kept = spec.consumer.forward(a, params, amp), residuals
        ctx.spec, ctx.amp, ctx.out_dtype = spec, amp, out_dtype
        ctx.save_for_backward(*cs, *means, *vars_, *gammas, *betas, *params, *kept)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        spec = ctx.spec
        T, R = len(spec.terms), spec.n_residuals
        saved = ctx.saved_tensors
        cs, means, vars_, gammas, betas = (list(saved[i * T:(i + 1) * T]) for i in range(_PER_TERM))
        n_params = len(saved) - _PER_TERM * T - (R if spec.consumer is not None else 1)
        params = tuple(saved[_PER_TERM * T:_PER_TERM * T + n_params])
        kept = list(saved[_PER_TERM * T + n_params:])
        be = backends.get(spec.backend)
        f1s = [bn_math.scale(v, g, t.eps) for v, g, t in zip(vars_, gammas, spec.terms)]
        needs = ctx.needs_input_grad[1:]
        param_grads: tuple = ()
        if spec.consumer is None:
            g_a, a = grad_out, kept[0]
        else:
            a = be.apply(cs, means, f1s, betas, kept, spec.act, ctx.out_dtype)
            g_a, param_grads = spec.consumer.backward(a, grad_out, params, ctx.amp,
                                                      (True, *needs[_PER_TERM * T + R:]))
        dy, s1s, s2cs = be.grad_stats(g_a, a, spec.act, cs, means)
        grads: list[Tensor | None] = []
        for k, term in enumerate(spec.terms):
            c, mean, var, gamma = cs[k], means[k], vars_[k], gammas[k]
            need_c, need_g, need_b = needs[_PER_TERM * k], needs[_PER_TERM * k + 3], needs[_PER_TERM * k + 4]
            dc = dgamma = dbeta = None
            if need_c:
                b = bn_math.backward_coefficient(var, f1s[k], s2cs[k], term.eps) if term.batch else None
                dc = be.input_grad(dy, c, mean, f1s[k], b, s1s[k])
            if need_g or need_b:
                dgamma, dbeta = bn_math.affine_grads(var, s1s[k], s2cs[k], c.numel() // c.shape[1], term.eps)
                dgamma = dgamma.to(gamma.dtype) if need_g else None
                dbeta = dbeta.to(betas[k].dtype) if need_b else None
            grads += [dc, None, None, dgamma, dbeta]
        for j in range(R):
            grads.append(dy.to(ctx.out_dtype) if needs[_PER_TERM * T + j] else None)
        grads += list(param_grads)
        return (None, *grads)


def bn_apply(terms: tuple[tuple[Tensor, tuple[Tensor, Tensor], nn.Module], ...], residuals: tuple[Tensor, ...],
             act: str | None, consumer: nn.Module | None, backend: str = "reference") -> Tensor:
    """Step 2 of restructured BN, fused with residual add, ReLU/ReLU6 and the consuming layer.

    Computes ``consumer(act(sum_k BN_k(c_k) + sum_j r_j))`` where ``BN_k(c) = F1_k * (c - mu_k) +
    beta_k`` uses the statistics from ``bn_statistics`` (seed 002 eq. 9; the shortcut add is
    pattern (4), with a second BN term for a projection shortcut, pattern (4)-2).

    Args:
        terms: ``(c_k, (mean_k, var_k), bn_k)`` per BN: convolution output (N, C, H, W), its
            statistics (C,) each, and the BatchNorm2d module that owns gamma, beta and eps.
        residuals: identity-shortcut tensors (N, C, H, W) added before the activation.
        act: None, "relu" or "relu6".
        consumer: a ``nn.Conv2d`` or pooling module fed by the result (its input is then
            recomputed in the backward, never stored), or None to return the result itself.
        backend: name of the sweep backend.
    Returns:
        The consumer's output, or the (N, C, H, W) activation when ``consumer`` is None.
    """
    flat: list[Tensor | None] = []
    specs = []
    for c, (mean, var), bn in terms:
        specs.append(_TermSpec(eps=bn.eps, batch=bn_math.uses_batch_stats(bn)))
        flat += [c, mean, var, bn.weight, bn.bias]
    flat += list(residuals)
    wrapped = None if consumer is None else consumers.make(consumer)
    if wrapped is not None:
        flat += list(wrapped.params())
    spec = _Spec(tuple(specs), len(residuals), act, wrapped, backend)
    return _ApplyConsume.apply(spec, *flat)
