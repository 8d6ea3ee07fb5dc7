"""Consumers: the layer that takes a BN apply step as its pre-processing (seed 002 section 2.3).

The fused operator computes ``a = act(BN(c) [+ shortcut])`` and hands ``a`` straight to its
consumer, so ``a`` is never stored for the backward pass; in the backward it is recomputed from
``c`` and the consumer's backward runs on it. A consumer therefore needs a backward that does
*not* re-run its own forward when that forward is expensive: the convolution uses
``aten.convolution_backward`` (dgrad and wgrad from the recomputed input), pooling layers are
cheap and simply re-run under autograd.
"""

from __future__ import annotations

import weakref
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnff.graph.consumers import FUNCTIONAL, conv_padding, fold_pays, unsupported_reason
from bnff.ops.bn_math import as_4d, as_dtype, from_4d


class Consumer(Protocol):
    """What the fused operator needs from the layer it feeds."""

    def params(self, amp_dtype: torch.dtype | None) -> tuple[Tensor | None, ...]:
        """The consumer's tensors that need gradients (weight, bias), in a fixed order, as its forward
        uses them under autocast to ``amp_dtype`` (None: autocast off)."""

    def forward(self, a: Tensor, params: tuple[Tensor | None, ...], amp_dtype: torch.dtype | None) -> Tensor:
        """Run the consumer on the pre-processed input ``a``."""

    def backward(self, a: Tensor, grad_out: Tensor, params: tuple[Tensor | None, ...],
                 amp_dtype: torch.dtype | None, needs: tuple[bool, ...]) -> tuple[Tensor | None, tuple[Tensor | None, ...]]:
        """Return (grad w.r.t. ``a``, grads w.r.t. ``params``); ``needs`` is (a, *params)."""


def autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype autocast runs lower-precision ops in on ``t``'s device, or None when it is off."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _cast(t: Tensor | None, amp_dtype: torch.dtype | None) -> Tensor | None:
    """``t`` as autocast hands it to a lower-precision op: floating tensors other than float64 in
    ``amp_dtype`` (a graph op, so gradients flow back to ``t`` in its own dtype), the rest as they are."""
    if t is None or amp_dtype is None or t.dtype == amp_dtype or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(amp_dtype)


_CONV_FUNCS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvConsumer:
    """A ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` fed by the apply step; its input is recomputed,
    never stored.

    Forward: ``out = conv(a, weight, bias)``. Under autocast, weight and bias come cast to the
    autocast dtype by ``params`` outside the fused operator, as eager autocast casts them (one copy
    per forward, whose gradient autograd turns back into the parameters' dtype; the backward uses
    the same copy), and ``a`` is cast likewise. Backward: dgrad and wgrad by
    ``aten.convolution_backward`` on the recomputed ``a``.
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        self.conv = conv
        self.padding = conv_padding(conv)
        self.fn = _CONV_FUNCS[len(conv.kernel_size)]
        # (has bias, stride, padding, dilation (rows, columns each), groups): how the cpu backend's
        # group executor runs a Conv2d (bnff.ops.fused); None for the others and for asymmetric padding
        self.geometry = None if self.padding is None or len(conv.kernel_size) != 2 else (
            int(conv.bias is not None), *conv.stride, *self.padding, *conv.dilation, conv.groups)

    def params(self, amp_dtype):
        return (_cast(self.conv.weight, amp_dtype), _cast(self.conv.bias, amp_dtype))

    def forward(self, a, params, amp_dtype):
        weight, bias = params
        c = self.conv
        with torch.autocast(a.device.type, enabled=False):
            return self.fn(_cast(a, amp_dtype), weight, bias, c.stride, self.padding, c.dilation, c.groups)

    def backward(self, a, grad_out, params, amp_dtype, needs):
        weight, bias = params
        c = self.conv
        a = _cast(a, amp_dtype)
        g_a, g_w, g_b = torch.ops.aten.convolution_backward(
            as_dtype(grad_out, weight.dtype), a, weight,
            None if bias is None else [bias.shape[0]], list(c.stride), list(self.padding), list(c.dilation), False,
            [0] * len(self.padding), c.groups, [needs[0], needs[1], bias is not None and needs[2]])
        g_w = None if g_w is None else as_dtype(g_w, weight.dtype)
        return g_a, (g_w, None if g_b is None else as_dtype(g_b, bias.dtype))


def _in_layout_of(g: Tensor, a: Tensor) -> Tensor:
    """``g`` with ``a``'s strides (a global average pool's backward gives NCHW, for example): converted
    once here, as the consumer's own work, rather than by every sweep that reads it."""
    return g if g.stride() == a.stride() else torch.empty_like(a, dtype=g.dtype).copy_(g)


class RecomputeConsumer:
    """A parameter-free, cheap consumer (max-pool, average-pool; a module or a ``torch.nn.functional``
    call): its backward re-runs it under autograd on the recomputed input, so neither its input nor
    its indices are stored. Its input gradient is returned in the input's layout."""

    def __init__(self, module: Callable[[Tensor], Tensor]) -> None:
        self.module = module

    def params(self, amp_dtype):
        return ()

    def forward(self, a, params, amp_dtype):
        return self.module(a)

    def backward(self, a, grad_out, params, amp_dtype, needs):
        with torch.enable_grad():
            a = a.detach().requires_grad_(True)
            out = self.module(a)
            (g_a,) = torch.autograd.grad(out, a, grad_out)
        return _in_layout_of(g_a, a), ()


class GatedConsumer:
    """A squeeze-and-excitation in front of a layer: ``out = layer(a * gate(a))``, the (N, C, 1, 1) gate
    computed from ``a`` by ``gate`` (global average pool, two small layers, activations; Hu et al.,
    CVPR 2018). Neither the gate nor the scaled map ``a * gate`` is stored: the backward recomputes
    both from the recomputed ``a``, runs the layer's backward on the scaled map, then the gate's
    under autograd (a few (N, C) vectors), which gives dL/da = dL/ds * gate + the pool's share.

    Its parameters are the gate's (as the model holds them: under autocast its layers cast them,
    as eager does) followed by the layer's (``Consumer.params``). The gate's layers must keep no
    state and draw no random numbers (``bnff.plan.match`` admits only such).
    """

    def __init__(self, gate: nn.Module, layer: Consumer) -> None:
        self.gate, self.layer = gate, layer
        self.names = tuple(name for name, _ in gate.named_parameters())
        self._own = tuple(p for _, p in gate.named_parameters())

    def params(self, amp_dtype):
        return tuple(p for _, p in self.gate.named_parameters()) + tuple(self.layer.params(amp_dtype))

    def _owns(self, gate_params) -> bool:
        """Whether ``gate_params`` are the gate module's own parameters (the usual case)."""
        return len(gate_params) == len(self._own) and all(p is q for p, q in zip(gate_params, self._own))

    def _run_gate(self, x: Tensor, gate_params) -> Tensor:
        """``gate(x)`` with ``gate_params`` as its parameters: the module itself when they are its own
        (``torch.func.functional_call`` swaps parameters in and out at some 150 us a call), else through
        ``functional_call``."""
        if self._owns(gate_params):
            return self.gate(x)
        return torch.func.functional_call(self.gate, dict(zip(self.names, gate_params)), (x,))

    def _grad_params(self, gate_params) -> list[Tensor]:
        """The gate's parameters to differentiate by in the backward: its own (``autograd.grad`` then gives
        their gradients without accumulating them), or detached copies of other ones."""
        if self._owns(gate_params):
            return list(gate_params)
        return [p.detach().requires_grad_(True) for p in gate_params]

    @staticmethod
    def _grads(out: Tensor, first: Tensor, gate_params: list[Tensor], grad: Tensor) -> tuple:
        """(d out / d first, *d out / d gate_params) for ``grad``: None for a parameter that needs none."""
        wrt = [p for p in gate_params if p.requires_grad]
        g_first, *g = torch.autograd.grad(out, [first, *wrt], grad)
        it = iter(g)
        return (g_first, *(next(it) if p.requires_grad else None for p in gate_params))

    def _scaled(self, a: Tensor, params, amp_dtype) -> tuple[Tensor, tuple]:
        """(a * gate(a) as eager computes it, the layer's parameters)."""
        k = len(self.names)
        with torch.autocast(a.device.type, dtype=amp_dtype or torch.get_autocast_dtype(a.device.type),
                            enabled=amp_dtype is not None):
            gate = self._run_gate(a, params[:k])
            return a * gate, params[k:]

    def forward(self, a, params, amp_dtype):
        s, layer_params = self._scaled(a, params, amp_dtype)
        return self.layer.forward(s, layer_params, amp_dtype)

    def backward(self, a, grad_out, params, amp_dtype, needs):
        k = len(self.names)
        with torch.enable_grad():
            a = a.detach().requires_grad_(True)
            gate_params = self._grad_params(params[:k])
            s, layer_params = self._scaled(a, (*gate_params, *params[k:]), amp_dtype)
            g_s, layer_grads = self.layer.backward(s.detach(), grad_out, layer_params, amp_dtype, (True, *needs[1 + k:]))
            g_a, *g_gate = self._grads(s, a, gate_params, g_s)
        return _in_layout_of(g_a, a), (*g_gate, *layer_grads)


def _rows(t: Tensor) -> tuple[Tensor, bool] | None:
    """A dense (N, C, H, W) map as the (N, H*W, C) rows of a channels_last one (True) or the (N, C, H*W)
    columns of an NCHW one (False), as views; None for any other strides."""
    n, c, h, w = t.shape
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(n, h * w, c), True
    if t.is_contiguous():
        return t.view(n, c, h * w), False
    return None


class FoldedGateConsumer(GatedConsumer):
    """A squeeze-and-excitation in front of a 1x1 convolution (stride 1, one group; ``GroupPlan.gate_folded``),
    the gate folded into the weights per sample, as F1 is folded into the apply step:
    ``out[n] = (W * gate[n]) @ a[n] (+ bias)``, one batched matrix product (``torch.bmm``) over the rows
    (channels_last) or columns (NCHW) of ``a``, so the scaled map ``a * gate`` is never formed. Where that
    does not pay (``bnff.graph.consumers.fold_pays``: more output channels than pixels) or ``a`` is dense in
    neither layout, the scaled map is formed and the layer runs on it (``GatedConsumer``'s way).

    The global average pool is taken here, as a sum over the pixels divided by their count (ATen's
    mean of a bf16 channels_last map runs some 14x slower than its sum), and ``gate`` maps the pooled
    (N, C, 1, 1) to the gate. Backward, from the recomputed ``a`` and gate: dL/da = (W * gate[n])^T g[n]
    (one ``bmm``), the per-sample weight gradient G[n] = g[n] a[n]^T (one ``bmm``, (N, C_out, C)), from
    which dL/dW = sum_n G[n] * gate[n] and dL/dgate[n] = sum_o G[n] * W (summed in float32 at least);
    the gate's layers' backward runs under autograd on the (N, C) vectors, and the pool's share of
    dL/da, dL/dpooled / (H*W), is added to dL/da in place. Its parameters are ``GatedConsumer``'s (the
    gate's, then the convolution's); ``layer`` is a ``ConvConsumer``.
    """

    def _gate(self, a: Tensor, params, amp_dtype, grad: bool = False):
        """(pooled, gate): the pooled map, requiring grad when ``grad``, and the gate computed from it."""
        pooled = a.detach().sum((2, 3), keepdim=True) / (a.shape[2] * a.shape[3])
        if grad:
            pooled.requires_grad_(True)
        with torch.autocast(a.device.type, dtype=amp_dtype or torch.get_autocast_dtype(a.device.type),
                            enabled=amp_dtype is not None):
            return pooled, self._run_gate(pooled, params[:len(self.names)])

    def _folds(self, a: Tensor, weight: Tensor) -> tuple[Tensor, bool] | None:
        rows = _rows(a)
        return rows if rows is not None and fold_pays(a.shape[2] * a.shape[3], weight.shape[0]) else None

    def forward(self, a, params, amp_dtype):
        k = len(self.names)
        weight, bias = params[k:]
        _, gate = self._gate(a, params, amp_dtype)
        rows = self._folds(a, weight)
        if rows is None:
            return self.layer.forward(a * gate, params[k:], amp_dtype)
        x, last = rows
        n, c, h, w = a.shape
        wn = weight.view(1, -1, c) * _cast(gate, weight.dtype).view(n, 1, c)  # (N, C_out, C)
        x = _cast(x, amp_dtype)
        if last:
            out = torch.bmm(x, wn.transpose(1, 2)).view(n, h, w, -1).permute(0, 3, 1, 2)
        else:
            out = torch.bmm(wn, x).view(n, -1, h, w)
        return out if bias is None else out + bias.view(1, -1, 1, 1)

    def backward(self, a, grad_out, params, amp_dtype, needs):
        k = len(self.names)
        weight, bias = params[k:]
        n, c, h, w = a.shape
        gate_params = self._grad_params(params[:k])
        with torch.enable_grad():
            pooled, gate = self._gate(a, (*gate_params, *params[k:]), amp_dtype, grad=True)
        rows = self._folds(a, weight)
        if rows is None:  # the scaled map, as GatedConsumer
            s = a * gate.detach()
            g_s, layer_grads = self.layer.backward(s, grad_out, params[k:], amp_dtype, (True, *needs[1 + k:]))
            g_x = _in_layout_of(g_s * gate.detach(), a)
            g_gate = (g_s * a).sum((2, 3), keepdim=True, dtype=torch.promote_types(a.dtype, torch.float32))
        else:
            x, last = rows
            x = _cast(x, amp_dtype)
            g = grad_out.to(weight.dtype).contiguous(memory_format=torch.channels_last if last else torch.contiguous_format)
            g = g.permute(0, 2, 3, 1).reshape(n, h * w, -1) if last else g.view(n, -1, h * w)
            gv = _cast(gate.detach(), weight.dtype).view(n, 1, c)
            wn = weight.view(1, -1, c) * gv
            if last:
                g_x = torch.bmm(g, wn).view(n, h, w, c).permute(0, 3, 1, 2)  # channels_last (N, C, H, W)
                g_wn = torch.bmm(g.transpose(1, 2), x)
            else:
                g_x = torch.bmm(wn.transpose(1, 2), g).view(n, c, h, w)
                g_wn = torch.bmm(g, x.transpose(1, 2))
            acc = torch.promote_types(g_wn.dtype, torch.float32)  # sums over samples and output channels
            g_wn = g_wn.to(acc)  # (N, C_out, C)
            g_weight = (g_wn * gv.to(acc)).sum(0).view_as(weight).to(weight.dtype) if needs[1 + k] else None
            g_bias = None
            if bias is not None and needs[2 + k]:
                g_bias = grad_out.sum((0, 2, 3), dtype=acc).to(bias.dtype)
            layer_grads = (g_weight, g_bias)
            g_gate = (g_wn * weight.view(1, -1, c).to(acc)).sum(1).view(n, c, 1, 1)
            g_x = _in_layout_of(g_x.to(a.dtype), a)
        g_pooled, *g_gate_params = self._grads(gate, pooled, gate_params, g_gate.to(gate.dtype))
        g_x.add_((g_pooled / (h * w)).to(g_x.dtype))
        return g_x, (*g_gate_params, *layer_grads)


class NativeShape:
    """A consumer of (N, C, L) or (N, C, D, H, W) maps (``Conv1d``, ``Conv3d``) behind the fused operator,
    which runs on their 4-D views (``bn_math.as_4d``): ``a`` goes to ``inner`` in its own shape and its
    gradient comes back as the view."""

    def __init__(self, inner: Consumer, spatial: tuple[int, ...]) -> None:
        self.inner, self.spatial = inner, spatial

    def params(self, amp_dtype):
        return self.inner.params(amp_dtype)

    def forward(self, a, params, amp_dtype):
        return self.inner.forward(from_4d(a, self.spatial), params, amp_dtype)

    def backward(self, a, grad_out, params, amp_dtype, needs):
        g_a, grads = self.inner.backward(from_4d(a, self.spatial), grad_out, params, amp_dtype, needs)
        return as_4d(g_a), grads


FunctionalSpec = tuple[str, tuple, dict]
GatedSpec = tuple[nn.Module, "nn.Module | FunctionalSpec", bool]


_MADE: "weakref.WeakKeyDictionary[nn.Module, Consumer]" = weakref.WeakKeyDictionary()


def make(module: nn.Module | FunctionalSpec | GatedSpec) -> Consumer:
    """The consumer wrapper for ``module``, for a functional pool given as ``(name, args, kwargs)``
    (``name`` in ``FUNCTIONAL``; ``args`` follow the input tensor), or for a layer behind a
    squeeze-and-excitation gate given as ``(gate, layer, folded)`` (``GatedConsumer``; with ``folded``, a
    1x1 convolution ``layer`` whose weights take the gate: ``FoldedGateConsumer``). A module's wrapper is
    made once and reused (the fused operator asks for it on every call).

    Raises:
        TypeError: ``module`` is not a supported consumer (see ``unsupported_reason``).
    """
    key = module[0] if isinstance(module, tuple) and isinstance(module[0], nn.Module) else module
    if isinstance(key, nn.Module):
        made = _MADE.get(key)
        if made is None:
            made = _MADE[key] = _make(module)
        return made
    return _make(module)


def _make(module: nn.Module | FunctionalSpec | GatedSpec) -> Consumer:
    if isinstance(module, tuple) and isinstance(module[0], nn.Module):
        return (FoldedGateConsumer if module[2] else GatedConsumer)(module[0], make(module[1]))
    if isinstance(module, tuple):
        name, args, kwargs = module
        if name not in FUNCTIONAL:
            raise TypeError(f"functional consumer {name!r} is not one of {sorted(FUNCTIONAL)}")
        fn = FUNCTIONAL[name]
        return RecomputeConsumer(lambda a: fn(a, *args, **kwargs))
    reason = unsupported_reason(module)
    if reason is not None:
        raise TypeError(reason)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return ConvConsumer(module)
    return RecomputeConsumer(module)
