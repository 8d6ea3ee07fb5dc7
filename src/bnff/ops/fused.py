"""The restructured BN operators that ``bnff.restructure`` puts into the graph.

Three graph-level functions replace every fused ``BatchNorm2d`` (seed 002 section 2.2/2.3; seeds
001/004 for inter-composite-layer fusion, ICF):

* ``feature_statistics(f, bns)``: step 1 of the forward as a post-processing of the layer that
  produced the feature map ``f``: per-channel mean and variance in one sweep (MVF). It runs once per
  feature map, however many BNs later normalize its channels (DenseNet: every later layer of the
  block normalizes it again, inside a concatenation).
* ``bn_statistics(sources, stats, bn)``: gathers one BN's statistics from the feature maps it
  normalizes (their concatenation along channels) and updates its running statistics exactly as
  PyTorch does. Runs once per forward pass; no backward ever repeats it.
* ``bn_apply(terms, residuals, act, consumers)``: step 2, ``a = act(sum_k BN_k(x_k) + sum_j r_j)``,
  handed straight to each consumer (convolutions or pools, whose input is then recomputed in the
  backward instead of stored) or returned (materialized) when a user cannot take pre-processing.

The backward of ``bn_apply`` is the fused backward of seed 002: the consumers' dgrads give dL/da
(summed over consumers), step 1 forms dy = dL/da * act'(a) with S1, S2 per BN (eq. 16, 17, 19,
20), step 2 forms dx = F1 * dy + B * x + C per BN (eq. 12), split back onto the feature maps of a
concatenation, where autograd accumulates each map's gradient from all its BNs. The same dy
feeds every BN of a residual sum and is the shortcut's gradient. Saved for backward: the BN
inputs (the feature maps themselves, shared by every operator that normalizes them, never their
concatenation) and (C,) vectors; the shortcut tensors only when a consumer needs ``a``
recomputed; the output only when it is materialized with an activation *and* a shortcut (its
mask; seed 002 Table 2, patterns (4)); without a shortcut the mask is recomputed from x.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bnff.ops import backends, bn_math, consumers

Stats = tuple[Tensor, Tensor]


def feature_statistics(f: Tensor, bns: tuple[nn.modules.batchnorm._BatchNorm, ...],
                       backend: str = "reference") -> Stats | None:
    """Step 1 of the forward for one feature map: its per-channel mean and biased variance.

    One sweep over ``f`` (seed 002 eq. 1, 18: mean-variance fusion), computed once and shared by
    every BN in ``bns`` (all the BNs that normalize channels of ``f``, alone or inside a
    concatenation: ICF, seed 001 section 4). Skipped (None) when none of them uses mini-batch
    statistics (all in eval mode with running statistics).

    Args:
        f: the feature map (N, C, H, W), NCHW or channels_last.
        bns: the BatchNorm2d modules that will use the statistics (read at call time).
        backend: name of the sweep backend.
    Returns:
        (mean, var), each (C,) in the accumulation dtype, or None.
    Raises:
        ValueError: ``f`` is not 4-D.
    """
    if not any(bn_math.uses_batch_stats(bn) for bn in bns):
        return None
    if f.dim() != 4:
        raise ValueError(f"expected 4D input (got {f.dim()}D input)")
    with torch.no_grad():
        return backends.get(backend).channel_stats(f)


def bn_statistics(sources: tuple[Tensor, ...], stats: tuple[Stats | None, ...],
                  bn: nn.modules.batchnorm._BatchNorm) -> Stats:
    """One BN's statistics, gathered from the feature maps it normalizes, and its running-stats update.

    The BN normalizes the concatenation of ``sources`` along channels (a single source without a
    concatenation). Per-channel statistics of a concatenation are those of its parts, so the
    parts' ``feature_statistics`` are concatenated, not recomputed (ICF). In training mode (or
    without running statistics) the mini-batch statistics are returned and ``running_mean`` /
    ``running_var`` / ``num_batches_tracked`` are updated exactly as PyTorch does (DESIGN.md
    section 3); in eval mode with running statistics, copies of those are returned.

    Args:
        sources: the feature maps, each (N, C_j, H, W), with sum(C_j) == bn.num_features.
        stats: ``feature_statistics`` of each source (None where it was skipped).
        bn: the BatchNorm2d module (read at call time: mode, momentum, eps).
    Returns:
        (mean, var), each (num_features,) in the accumulation dtype, not requiring grad.
    Raises:
        ValueError: a source is not 4-D, or there is one value per channel in training (PyTorch's
            message).
        RuntimeError: the channel count differs from ``bn.num_features``.
    """
    for s in sources:
        if s.dim() != 4:
            raise ValueError(f"expected 4D input (got {s.dim()}D input)")
    channels = sum(s.shape[1] for s in sources)
    if channels != bn.num_features:
        shapes = ", ".join(str(tuple(s.shape)) for s in sources)
        raise RuntimeError(f"{type(bn).__name__}({bn.num_features}) got an input with {channels} channels "
                           f"(from {shapes})")
    if not bn_math.uses_batch_stats(bn):
        acc = bn_math.accumulation_dtype(sources[0].dtype, bn.running_mean.dtype)
        return bn.running_mean.detach().to(acc, copy=True), bn.running_var.detach().to(acc, copy=True)
    m = sources[0].numel() // sources[0].shape[1]
    if m == 1:
        size = list(sources[0].shape)
        size[1] = channels
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {torch.Size(size)}")
    if any(st is None for st in stats):
        raise RuntimeError("feature statistics were skipped for a BN in training mode: the BNs passed to "
                           "feature_statistics must include every BN that uses them")
    mean = torch.cat([st[0] for st in stats]) if len(stats) > 1 else stats[0][0]
    var = torch.cat([st[1] for st in stats]) if len(stats) > 1 else stats[0][1]
    bn_math.update_running_stats(bn, mean, var, m)
    return mean, var


@dataclass(frozen=True)
class _TermSpec:
    eps: float
    batch: bool  # normalized with mini-batch statistics (their gradient terms B, C are live)
    n_sources: int


@dataclass(frozen=True)
class _Spec:
    terms: tuple[_TermSpec, ...]
    n_residuals: int
    act: str | None
    consumers: tuple[consumers.Consumer, ...]
    n_params: tuple[int, ...]
    backend: str


@dataclass
class _Term:
    sources: list[Tensor]
    mean: Tensor
    var: Tensor
    gamma: Tensor | None
    beta: Tensor | None
    start: int  # index of the first source in the flat argument list


@dataclass
class _Args:
    """The flat argument list of ``_ApplyConsume`` split by ``_unpack``, with the offsets of its parts."""

    terms: list[_Term]
    residuals: list[Tensor]
    params: list[tuple]  # per consumer
    residual_start: int
    param_start: int
    end: int


def _unpack(spec: _Spec, flat: tuple) -> _Args:
    """Split the flat argument list: per term (*sources, mean, var, gamma, beta), then the residuals,
    then each consumer's parameters."""
    i, terms = 0, []
    for t in spec.terms:
        terms.append(_Term(list(flat[i:i + t.n_sources]), *flat[i + t.n_sources:i + t.n_sources + 4], start=i))
        i += t.n_sources + 4
    residual_start, param_start = i, i + spec.n_residuals
    i, params = param_start, []
    for n in spec.n_params:
        params.append(tuple(flat[i:i + n]))
        i += n
    return _Args(terms, list(flat[residual_start:param_start]), params, residual_start, param_start, i)


def _amp_dtype(t: Tensor) -> torch.dtype | None:
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _apply(be, spec: _Spec, terms: list[_Term], f1s: list[Tensor], residuals: list[Tensor],
           out_dtype: torch.dtype) -> Tensor:
    return be.apply([t.sources for t in terms], [t.mean for t in terms], f1s, [t.beta for t in terms],
                    residuals, spec.act, out_dtype)


class _ApplyConsume(torch.autograd.Function):
    """Fused BN apply (+ add + activation) [+ consumers]; see the module docstring."""

    @staticmethod
    def forward(ctx, spec: _Spec, *flat):
        args = _unpack(spec, flat)
        terms, residuals = args.terms, args.residuals
        be = backends.get(spec.backend)
        f1s = [bn_math.scale(t.var, t.gamma, s.eps) for t, s in zip(terms, spec.terms)]
        dtypes = [s.dtype for t in terms for s in t.sources] + [r.dtype for r in residuals]
        out_dtype = functools.reduce(torch.promote_types, dtypes)
        a = _apply(be, spec, terms, f1s, residuals, out_dtype)
        amp = _amp_dtype(a)
        saved = list(flat)
        if spec.consumers:
            out = tuple(c.forward(a, p, amp) for c, p in zip(spec.consumers, args.params))
            kept = None
        else:
            out = a
            saved[args.residual_start:args.param_start] = [None] * spec.n_residuals  # a is never recomputed
            kept = a if spec.act is not None and spec.n_residuals else None
        ctx.spec, ctx.amp, ctx.out_dtype = spec, amp, out_dtype
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*saved, kept)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outs):
        spec = ctx.spec
        saved = ctx.saved_tensors
        args = _unpack(spec, saved)
        terms, residuals = args.terms, args.residuals
        kept = saved[args.end]
        needs = ctx.needs_input_grad[1:]
        if all(g is None for g in grad_outs):
            return (None,) * (1 + len(needs))
        be = backends.get(spec.backend)
        f1s = [bn_math.scale(t.var, t.gamma, s.eps) for t, s in zip(terms, spec.terms)]
        param_grads: list[Tensor | None] = []
        # one BN and no shortcut: nobody else needs dy, so neither backward sweep writes it; both
        # recompute the mask from x, which they read anyway (for S2, for dx)
        lone = len(terms) == 1 and not residuals
        if spec.consumers:
            a = _apply(be, spec, terms, f1s, residuals, ctx.out_dtype)
            g_a = None
            i = args.param_start
            for consumer, p, g in zip(spec.consumers, args.params, grad_outs):
                if g is None:
                    param_grads += [None] * len(p)
                else:
                    g_i, pg = consumer.backward(a, g, p, ctx.amp, (True, *needs[i:i + len(p)]))
                    g_a = g_i if g_a is None else g_a + g_i
                    param_grads += list(pg)
                i += len(p)
        else:
            (g_a,) = grad_outs
            a = kept
            if a is None and spec.act is not None and not lone:  # grad_stats' mask, recomputed from x
                a = _apply(be, spec, terms, f1s, residuals, ctx.out_dtype)
        if lone:
            del a
            t0 = terms[0]
            s1, s2c = be.grad_stats_x(g_a, spec.act, t0.sources, t0.mean, f1s[0], t0.beta, ctx.out_dtype)
            dy, s1s, s2cs = None, [s1], [s2c]
        else:
            dy, s1s, s2cs = be.grad_stats(g_a, a, spec.act, [t.sources for t in terms], [t.mean for t in terms])
        grads: list[Tensor | None] = []
        for k, (term, ts) in enumerate(zip(terms, spec.terms)):
            i, n_src = term.start, ts.n_sources
            need_x, need_g, need_b = any(needs[i:i + n_src]), needs[i + n_src + 2], needs[i + n_src + 3]
            dxs: list[Tensor | None] = [None] * n_src
            dgamma = dbeta = None
            if need_x:
                b = bn_math.backward_coefficient(term.var, f1s[k], s2cs[k], ts.eps) if ts.batch else None
                if lone:
                    dxs = be.input_grad_x(g_a, spec.act, term.sources, term.mean, f1s[k], term.beta, ctx.out_dtype,
                                          b, s1s[k])
                else:
                    dxs = be.input_grad(dy, term.sources, term.mean, f1s[k], b, s1s[k])
            if need_g or need_b:
                m = term.sources[0].numel() // term.sources[0].shape[1]
                dgamma, dbeta = bn_math.affine_grads(term.var, s1s[k], s2cs[k], m, ts.eps)
                dgamma = dgamma.to(term.gamma.dtype) if need_g else None
                dbeta = dbeta.to(term.beta.dtype) if need_b else None
            grads += [*dxs, None, None, dgamma, dbeta]
        for j in range(args.residual_start, args.param_start):
            grads.append(dy.to(ctx.out_dtype) if needs[j] else None)
        grads += param_grads
        return (None, *grads)


Term = tuple[tuple[Tensor, ...], Stats, nn.modules.batchnorm._BatchNorm]


def bn_apply(terms: tuple[Term, ...], residuals: tuple[Tensor, ...], act: str | None,
             consumer_layers: tuple[nn.Module | consumers.FunctionalSpec, ...] = (),
             backend: str = "reference") -> Tensor | tuple[Tensor, ...]:
    """Step 2 of restructured BN, fused with residual add, ReLU/ReLU6 and the consuming layers.

    Computes ``a = act(sum_k BN_k(x_k) + sum_j r_j)`` where ``BN_k(x) = F1_k * (x - mu_k) + beta_k``
    uses the statistics from ``bn_statistics`` (seed 002 eq. 9; the shortcut add is pattern (4),
    with a second BN term for a projection shortcut, pattern (4)-2), and ``x_k`` is the
    concatenation of the term's source feature maps along channels (ICF; never stored).

    Args:
        terms: ``(sources_k, (mean_k, var_k), bn_k)`` per BN: the feature maps (N, C_j, H, W) whose
            channel concatenation the BN normalizes, its statistics (C,) each, and the
            BatchNorm2d module that owns gamma, beta and eps.
        residuals: identity-shortcut tensors (N, C, H, W) added before the activation.
        act: None, "relu" or "relu6".
        consumer_layers: the layers fed by ``a``: ``nn.Conv2d`` or pooling modules, or functional
            pools as ``(name, args, kwargs)`` (``bnff.ops.consumers.FUNCTIONAL``). ``a`` is then
            recomputed in the backward, never stored. Empty: return ``a`` itself.
        backend: name of the sweep backend.
    Returns:
        The tuple of consumer outputs, or the (N, C, H, W) activation ``a`` when there is none.
    """
    flat: list[Tensor | None] = []
    specs = []
    for sources, (mean, var), bn in terms:
        specs.append(_TermSpec(eps=bn.eps, batch=bn_math.uses_batch_stats(bn), n_sources=len(sources)))
        flat += [*sources, mean, var, bn.weight, bn.bias]
    flat += list(residuals)
    wrapped = tuple(consumers.make(c) for c in consumer_layers)
    n_params = []
    for w in wrapped:
        p = w.params()
        flat += list(p)
        n_params.append(len(p))
    spec = _Spec(tuple(specs), len(residuals), act, wrapped, tuple(n_params), backend)
    return _ApplyConsume.apply(spec, *flat)
