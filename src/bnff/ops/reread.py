"""A convolution that rebuilds its input in its backward instead of keeping it (``bnff.plan.RereadPlan``).

Its input is made of materialized results of lone fused groups (one BN, no shortcut): taken whole,
as parts of a split, or concatenated (CSPNet: ``conv_transition(cat([xs, conv_transition_b(...)]))``,
whose ``xs`` is half of ``conv_exp``'s result). Eager autograd keeps that input (a concatenation, or
the whole result a part is a view of) for the weight gradient. ``conv_reread`` keeps instead what
the groups keep anyway, each BN input and its statistics, and in the backward recomputes each
group's result with the same apply sweep as its forward (so bit for bit the forward's; the plan's
``reread`` step, charged to the group), passes the results through the same splits and
concatenations (``rebuild``), and runs the convolution's dgrad and wgrad on that.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bnff.ops import backends, bn_math, consumers, record
from bnff.plan import GroupPlan

Term = tuple[tuple[Tensor, ...], tuple[Tensor, Tensor], nn.modules.batchnorm._BatchNorm]


@dataclass(frozen=True)
class _Leaf:
    """One group whose result the input is rebuilt from: its plan, BN eps, how many feature maps its BN
    normalizes, and the maps' spatial size (``bn_math.as_4d``)."""

    group: GroupPlan
    eps: float
    n_sources: int
    spatial: tuple[int, ...]


@dataclass(frozen=True)
class _Spec:
    name: str
    conv: consumers.Consumer
    n_params: int
    leaves: tuple[_Leaf, ...]
    rebuild: nn.Module
    backend: str
    amp: torch.dtype | None


def _result(be, leaf: _Leaf, flat: list[Tensor]) -> Tensor:
    """The group's result a = act(F1 * (x - mean) + beta) from its kept ``flat`` = (*sources, mean, var,
    gamma, beta), with the sweep its forward applied (``Backend.apply``)."""
    sources, (mean, var, gamma, beta) = flat[:leaf.n_sources], flat[leaf.n_sources:]
    maps = [bn_math.as_4d(s) for s in sources]
    out_dtype = functools.reduce(torch.promote_types, [m.dtype for m in maps])
    a = be.apply([maps], [mean], [be.scale(var, gamma, leaf.eps)], [beta], [], leaf.group.act_kind, out_dtype)
    return bn_math.from_4d(a, leaf.spatial)


class _ConvReread(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _Spec, x, *flat):
        params = flat[:spec.n_params]
        out = spec.conv.forward(x, params, spec.amp)
        ctx.spec, ctx.x_dtype = spec, x.dtype
        ctx.save_for_backward(*flat)  # the groups' BN inputs and vectors (kept by the groups anyway) and the params
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        spec: _Spec = ctx.spec
        saved = ctx.saved_tensors
        params, rest = saved[:spec.n_params], list(saved[spec.n_params:])
        be = backends.get(spec.backend)
        results = []
        for leaf in spec.leaves:
            n = leaf.n_sources + 4
            with record.scope(leaf.group.name, "bp"):  # the group's reread step
                results.append(_result(be, leaf, rest[:n]))
            rest = rest[n:]
        needs = ctx.needs_input_grad[1:]
        with record.scope(f"{spec.name}/reread", "bp"):  # the convolution's own work, as its layer's
            x = spec.rebuild(*results)
            g_x, g_params = spec.conv.backward(x, grad_out, params, spec.amp, (needs[0], *needs[1:1 + spec.n_params]))
        g_x = None if g_x is None else bn_math.as_dtype(g_x, ctx.x_dtype)
        return (None, g_x, *g_params, *([None] * (len(saved) - spec.n_params)))


def conv_reread(x: Tensor, conv: nn.Module, rebuild: nn.Module, leaves: tuple[tuple[GroupPlan, tuple[Term, ...]], ...],
                backend: str = "reference", name: str = "") -> Tensor:
    """``conv(x)``, keeping for the backward the BN inputs ``x`` is recomputed from instead of ``x``.

    Args:
        x: the convolution's input (N, C, *spatial), the value ``rebuild`` makes of the groups' results.
        conv: an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` (``bnff.ops.consumers.ConvConsumer``; under
            autocast its weight and bias are cast as eager casts them).
        rebuild: a module mapping the groups' results, in ``leaves`` order, to ``x`` (splits, their parts,
            concatenations).
        leaves: per group, its plan (``GroupPlan``: one BN, no shortcut) and its terms as ``bn_apply`` takes
            them, ``(((sources...), (mean, var), bn),)``.
        backend: the sweep backend that applied the groups in the forward.
        name: the convolution's node name (``bnff.ops.record`` scopes).
    Returns:
        ``conv(x)``.
    Raises:
        ValueError: a leaf group has more than one BN or a shortcut.
    """
    wrapped = consumers.make(conv)
    amp = consumers.autocast_dtype(x)
    params = tuple(wrapped.params(amp))
    flat: list[Tensor | None] = list(params)
    spec_leaves = []
    for group, terms in leaves:
        if len(terms) != 1 or group.residuals:
            raise ValueError(f"conv_reread rebuilds lone groups' results (one BN, no shortcut); {group.name!r} "
                             f"has {len(terms)} BNs and {len(group.residuals)} shortcuts")
        ((sources, (mean, var), bn),) = terms
        flat += [*sources, mean, var, bn.weight, bn.bias]
        spec_leaves.append(_Leaf(group, bn.eps, len(sources), tuple(sources[0].shape[2:])))
    spec = _Spec(name, wrapped, len(params), tuple(spec_leaves), rebuild, backend, amp)
    return _ConvReread.apply(spec, x, *flat)


__all__ = ["conv_reread"]
