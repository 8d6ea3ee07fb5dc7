"""The ``reference`` backend: the element-wise sweeps of restructured BN in plain PyTorch.

This is the oracle every fast backend is tested against. Each function is one *sweep* of the
restructured layer (one pass over a feature map); a fast backend implements the same functions
with the same signatures in fused kernels. Feature maps are (N, C, H, W) in any memory format
(NCHW or channels_last, preserved); per-channel vectors are (C,) in the accumulation dtype
(``bn_math.accumulation_dtype``). A BN input is given as its *sources*: the feature maps whose
concatenation along channels it normalizes (one tensor when there is no concatenation; several
for DenseNet's inter-composite-layer fusion). The reference backend concatenates them; a fast
backend reads them in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnff import activations
from bnff.ops import bn_math
from bnff.ops.bn_math import accumulation_dtype

_REDUCE_DIMS = (0, 2, 3)
COVERAGE = "every dtype and layout in plain PyTorch (the reference sweeps)"


def _vec(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _join(sources: list[Tensor]) -> Tensor:
    """The BN input: the sources concatenated along channels (N, sum C_j, H, W)."""
    return sources[0] if len(sources) == 1 else torch.cat(sources, 1)


def dense_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` as the sweeps need it beside the feature map ``like``: plain PyTorch takes any layout, so ``t``."""
    return t


def channel_stats(c: Tensor) -> tuple[Tensor, Tensor]:
    """Step 1 of the forward, mean-variance fusion (MVF): per-channel mean and biased variance of
    ``c`` (N, C, H, W) from a single sweep (seed 002 eq. 1, 18).

    The sweep is ATen's one-pass Welford reduction (``torch.var_mean``): per-block mean and M2,
    merged with Chan's formula, in float32 (float64 for float64 input). It is the accuracy bar for
    every backend: the raw one-sweep var = S_xx/m - mu^2 cancels catastrophically when
    |mean| >> std, and even on shifted data it is ~10x less accurate, which a 50-layer backward
    amplifies into visibly worse gradients (measured against float64; docs/design.md section 3).
    Returns (mean, var), each (C,).
    """
    acc = accumulation_dtype(c.dtype)
    var, mean = torch.var_mean(c.to(acc), _REDUCE_DIMS, correction=0)
    return mean, var


def term(x: Tensor, mu: Tensor, f1: Tensor, beta: Tensor | None) -> Tensor:
    """One BN term F1 (x - mu) + beta of ``x`` (N, C, H, W) with (C,) vectors, in ``x``'s dtype: the
    centred form (no cancellation when |mu| >> std), each operation rounded, the same form as the cpu
    kernels' (``csrc/bnff_sweeps.h`` ``term``). Near an activation threshold it is as close to float64
    as eager's x * alpha + (beta - mu * alpha) (``tests/test_patterns.py``, issue 29 item 7)."""
    y = (x - _vec(mu)) * _vec(f1)
    return y if beta is None else y + _vec(beta)


def _preact(cs: list[Tensor], means: list[Tensor], f1s: list[Tensor], betas: list[Tensor | None],
            residuals: list[Tensor], acc: torch.dtype) -> Tensor:
    """z = sum_k [F1_k * (x_k - mu_k) + beta_k] + sum_j r_j in ``acc`` (``cs``: each term's joined input).

    Each term is ``term``'s form."""
    z = None
    for c, mu, f1, beta in zip(cs, means, f1s, betas):
        y = term(c.to(acc), mu.to(acc), f1.to(acc), None if beta is None else beta.to(acc))
        z = y if z is None else z + y
    for r in residuals:
        z = r.to(acc) if z is None else z + r.to(acc)
    return z


def apply(sources: list[list[Tensor]], means: list[Tensor], f1s: list[Tensor], betas: list[Tensor | None],
          residuals: list[Tensor], act: str | None, out_dtype: torch.dtype) -> Tensor:
    """Step 2 of the forward: a = act(sum_k [F1_k * (x_k - mu_k) + beta_k] + sum_j r_j).

    Seed 002 eq. 9 in centered form (see ``bn_math``), followed by the residual add (pattern (4))
    and the activation (``act``: a kind of ``bnff.activations``, or None). ``sources[k]`` are the
    feature maps of BN k's input x_k (N, C, H, W once concatenated), ``residuals`` tensors of the
    same shape; the sum and the activation are formed in the accumulation dtype and the result cast
    to ``out_dtype``.
    """
    cs = [_join(s) for s in sources]
    acc = accumulation_dtype(*(t.dtype for t in cs + residuals), *(v.dtype for v in f1s))
    return activations.forward(act, _preact(cs, means, f1s, betas, residuals, acc)).to(out_dtype)


def activation_grad(g: Tensor, t: Tensor | None, act: str | None) -> Tensor:
    """dy = g * act'(.) with PyTorch's own backward operator (``bnff.activations``); ``t`` is what the
    derivative reads (``activations.reads(act)``): the activation output a (ReLU: 1[a > 0], seed 002
    eq. 19; ReLU6: 1[0 < a < 6], as ``hardtanh_backward`` decides on the input, since a > 0 iff z > 0
    and a < 6 iff z < 6) or the pre-activation z (SiLU, GELU, ...); g itself without activation."""
    spec = activations.spec(act)
    return g if spec is None or spec.reads is None else spec.backward(g, t.to(g.dtype))


def grad_stats(g_a: Tensor, a: Tensor | None, act: str | None, sources: list[list[Tensor]],
               means: list[Tensor], f1s: list[Tensor] | None = None, betas: list[Tensor | None] | None = None,
               residuals: list[Tensor] = ()) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Step 1 of the backward: dy = g_a * act'(.) (seed 002 eq. 19/20) and, for every BN term k,
    S1_k = sum(dy) / m and S2c_k = sum(dy * (c_k - mu_k)) / m (eq. 16, 17, centered).

    Args:
        g_a: gradient w.r.t. the activation output a, (N, C, H, W).
        a: the activation output (saved or recomputed), same shape, when the activation's derivative
            reads it (``activations.reads(act) == "a"``); else unused (may be None).
        act: the activation kind (``bnff.activations``) or None.
        sources, means: each BN term's input (its feature maps, see ``apply``) and mean (C,).
        f1s, betas, residuals: each term's F1 and beta and the shortcuts, from which the
            pre-activation z is recomputed (as ``apply`` forms it) when the derivative reads z.
    Returns:
        (dy in the accumulation dtype, [S1_k], [S2c_k]).
    """
    cs = [_join(s) for s in sources]
    acc = accumulation_dtype(g_a.dtype, *(c.dtype for c in cs))
    reads = activations.reads(act)
    if reads == "z":
        acc = accumulation_dtype(acc, *(r.dtype for r in residuals), *(v.dtype for v in f1s))
        t = _preact(cs, means, f1s, betas, list(residuals), acc)
    else:
        t = a if reads == "a" else None
    dy = activation_grad(g_a.to(acc), t, act)
    m = dy.numel() // dy.shape[1]
    s1s, s2cs = [], []
    for c, mu in zip(cs, means):
        s1s.append(dy.sum(_REDUCE_DIMS) / m)
        s2cs.append((dy * (c.to(acc) - _vec(mu.to(acc)))).sum(_REDUCE_DIMS) / m)
    return dy, s1s, s2cs


def _lone_grad_stats(g_a: Tensor, act: str | None, sources: list[Tensor], mean: Tensor, f1: Tensor,
                     beta: Tensor | None, out_dtype: torch.dtype) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``grad_stats`` of a lone BN term from x: the mask from the recomputed a (rounded to ``out_dtype``
    as the forward stored it) or the derivative at the recomputed z (in the accumulation dtype, as the
    forward formed it)."""
    if activations.reads(act) == "z":
        return grad_stats(g_a, None, act, [sources], [mean], [f1], [beta])
    return grad_stats(g_a, apply([sources], [mean], [f1], [beta], [], act, out_dtype), act, [sources], [mean])


def grad_stats_x(g_a: Tensor, act: str | None, sources: list[Tensor], mean: Tensor, f1: Tensor,
                 beta: Tensor | None, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``grad_stats`` for one BN term without shortcut, the activation's derivative recomputed from x
    (the mask from ``apply`` in ``out_dtype``, or the derivative at the pre-activation) instead of read
    from a saved a, and dy not returned (nobody else needs it). Returns (S1, S2c), each (C,)."""
    _, s1s, s2cs = _lone_grad_stats(g_a, act, sources, mean, f1, beta, out_dtype)
    return s1s[0], s2cs[0]


def input_grad_x(g_a: Tensor, act: str | None, sources: list[Tensor], mean: Tensor, f1: Tensor,
                 beta: Tensor | None, out_dtype: torch.dtype, b: Tensor | None, s1: Tensor) -> list[Tensor]:
    """``input_grad`` for one BN term without shortcut, from the gradient g_a of a and the activation's
    derivative recomputed from x (dy = g_a * act'(.) is formed on the fly, never stored)."""
    dy, _, _ = _lone_grad_stats(g_a, act, sources, mean, f1, beta, out_dtype)
    return input_grad(dy, sources, mean, f1, b, s1)


def input_grad(dy: Tensor, sources: list[Tensor], mean: Tensor, f1: Tensor, b: Tensor | None,
               s1: Tensor) -> list[Tensor]:
    """Step 2 of the backward: dx = F1 * dy + B * (x - mu) - F1 * S1 (seed 002 eq. 12, centered).

    With ``b=None`` the statistics were frozen (eval mode, running statistics): dx = F1 * dy.
    ``sources`` are the feature maps whose concatenation is x. Returns dx split back onto them,
    each in its source's dtype.
    """
    c = _join(sources)
    acc = dy.dtype
    dx = dy * _vec(f1.to(acc))
    if b is not None:
        dx = dx + (c.to(acc) - _vec(mean.to(acc))) * _vec(b.to(acc)) - _vec((f1 * s1).to(acc))
    if len(sources) == 1:
        return [dx.to(c.dtype)]
    return [d.to(s.dtype) for d, s in zip(dx.split([s.shape[1] for s in sources], 1), sources)]


def scale(var: Tensor, gamma: Tensor | None, eps: float) -> Tensor:
    """F1 = gamma / sqrt(var + eps) per channel (seed 002 eq. 10; ``bn_math.scale``), shape (C,)."""
    return bn_math.scale(var, gamma, eps)


def backward_vectors(var: Tensor, f1: Tensor, s1: Tensor, s2c: Tensor, s2c_dx: Tensor, m: int, eps: float,
                     batch: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """A BN term's backward vectors, each (C,): B = -F1 S2c' / (var + eps) (seed 002 eq. 13, 15;
    ``bn_math.backward_coefficient``) from ``s2c_dx``, the S2c that dx uses (every process's for a
    SyncBatchNorm), None unless the BN normalized with mini-batch statistics (``batch``); then
    dgamma = m S2c / sqrt(var + eps) and dbeta = m S1 from this process's ``s1``, ``s2c``
    (``bn_math.affine_grads``); ``m`` is N*H*W."""
    b = bn_math.backward_coefficient(var, f1, s2c_dx, eps) if batch else None
    return (b, *bn_math.affine_grads(var, s1, s2c, m, eps))


def running_update(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, factor: float, m: int) -> None:
    """PyTorch's running-statistics blend in place (``bn_math.blend_running_stats``)."""
    bn_math.blend_running_stats(running_mean, running_var, mean, var, factor, m)
