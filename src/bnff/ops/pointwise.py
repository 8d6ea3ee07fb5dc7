"""The fused pointwise convolutions at run time (the plan's ``bnff_pw`` scheme; issue 31).

A group whose plan marks it ``pointwise`` (every consumer a 1x1 convolution that takes a GEMM
prologue) runs its consumers as ``cpu.pointwise_forward``: each applies the group's BN terms,
shortcuts and activation to blocks of rows in cache and multiplies them on libxsmm's micro-kernels,
so the result a is never written, and takes its output's per-channel statistics from each block;
those are handed to the BN that normalizes the output (``feature_statistics`` takes them here
instead of sweeping the map: the plan's ``epilogue_stats`` step). The backward is ``bnff``'s, except
for a ``GroupPlan.pointwise_backward`` group (lone, its one consumer a stride-1 1x1 convolution):
``cpu.pointwise_backward`` runs that convolution's dgrad and wgrad in blocks of rows with the BN's
``grad_stats_x`` and the recompute of a inside (the plan's ``pointwise_backward`` step), then
``input_grad_x`` forms dx as under ``bnff``.

A call runs fused when all of these hold, else as ``bnff`` (the library convolutions):

* the ``cpu`` backend, not under ``torch.compile`` (which traces the sweeps);
* libxsmm found, with a GEMM kernel of the weights' dtype (``cpu.pointwise_why``);
* every feature map channels_last, one dtype; float32 weights with float32 maps, or bfloat16 weights
  (autocast's cast of float32 maps is made in the prologue); an activation the kernels compute;
* the backward: the BN input, dy and the weight channels_last / contiguous in one dtype (under
  autocast, bfloat16 maps), no SyncBatchNorm;
* ``MODE`` (environment ``BNFF_POINTWISE``): "on"; or "auto" (the default), where the fused
  convolutions and the unfused path (apply sweep, library convolution, statistics sweep; backward:
  recompute sweep, library convolution backward, ``grad_stats_x``) are timed side by side once per
  shape and direction in the process and the faster one runs from then on (as
  ``torch.backends.cudnn.benchmark`` chooses convolution algorithms), except while a
  ``bnff.ops.record.Recorder`` records (no timing then: unfused); "off": never; "libxsmm": never fused,
  but the same consumers run as libxsmm's plain convolutions (``cpu.libxsmm_conv``) between bnff's
  sweeps (the backward of a ``pointwise_backward`` group: recompute sweep, ``cpu.libxsmm_conv_backward``,
  ``grad_stats_x``): ``bnff bench``'s ``bnff_libxsmm`` variant, which tells the GEMM's gain from
  fusion's.

``choices()`` lists the decisions "auto" made.
"""

from __future__ import annotations

import os
import time

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from bnff.ops import consumers, record
from bnff.ops.backends import cpu

MODES = ("auto", "on", "off", "libxsmm")
MODE = os.environ.get("BNFF_POINTWISE", "auto")
if MODE not in MODES:
    raise ValueError(f"BNFF_POINTWISE={MODE!r}: expected one of {', '.join(MODES)}")
TIMED_RUNS = 3  # per path, after one warm-up run each; the fastest counts

_stats: WeakIdKeyDictionary = WeakIdKeyDictionary()  # output map -> (mean, var) from its epilogue
_choices: dict[tuple, bool] = {}


def choices() -> dict[tuple, bool]:
    """The "auto" decisions so far: (feature-map shapes, weight shapes, stride, dtypes, activation) ->
    whether the fused pointwise convolutions ran (they measured faster); a backward's key starts with
    "backward" and dy's shape."""
    return dict(_choices)


def take_stats(f: Tensor) -> tuple[Tensor, Tensor] | None:
    """The (mean, biased var) the fused convolution that produced ``f`` took in its epilogue, or None
    (each is handed over once)."""
    return _stats.pop(f, None)


def _kernels_may_run(spec) -> bool:
    """What both directions ask of a call first: not "off", the cpu backend, not under torch.compile,
    convolution consumers, an activation the kernels compute."""
    return (MODE != "off" and spec.backend == "cpu" and not torch.compiler.is_compiling()
            and all(isinstance(c, consumers.ConvConsumer) for c in spec.consumers)
            and cpu.act_why(spec.group.act_kind) is None)


def _eligible(spec, env, maps: list[Tensor]) -> bool:
    lay = spec.layout
    if not spec.group.pointwise or not _kernels_may_run(spec):
        return False
    if max(len(lay.terms), lay.residuals.stop - lay.residuals.start) > cpu.MAX_TERMS:
        return False
    return all(cpu.pointwise_covers(maps, env.flat[sl][0]) for sl in lay.params)


def _fused(spec, env, f1s: list[Tensor], i: int) -> Tensor:
    """Consumer ``i``'s output by the fused pointwise convolution; its statistics handed to its BN."""
    conv = spec.consumers[i].conv
    y, mean, var = cpu.pointwise_forward(env.all_sources(), env.means(), f1s, env.betas(),
                                         env.flat[spec.layout.residuals], spec.group.act_kind,
                                         env.flat[spec.layout.params[i]][0], conv.stride[0], stats=True)
    _stats[y] = (mean, var)
    return y


def _backward_eligible(spec, env, dy: Tensor | None, out_dtype: torch.dtype) -> bool:
    if dy is None or not _kernels_may_run(spec) or spec.sync[0] is not None:
        return False
    if spec.amp is not None and spec.amp != out_dtype:
        return False
    weight = env.flat[spec.layout.params[0]][0]
    xs = env.sources(0)
    return (weight.dtype == out_dtype == xs[0].dtype == dy.dtype and weight.is_contiguous()
            and cpu.pointwise_covers([*xs, dy], weight))


def backward_runs(spec, env, grad_outs: tuple, out_dtype: torch.dtype) -> bool:
    """Whether the backward of this call of a ``GroupPlan.pointwise_backward`` group runs its ``bnff_pw``
    schedule (``backward`` for its ``pointwise_backward`` step), per the module docstring's conditions;
    "auto" times both once per shape."""
    dy = grad_outs[0]
    if not _backward_eligible(spec, env, dy, out_dtype) or (MODE == "auto" and record.active()):
        return False
    if MODE != "auto":
        return True
    key = ("backward", tuple(dy.shape), *_key(spec, env, env.sources(0), out_dtype))
    if key not in _choices:
        _choices[key] = _backward_faster(spec, env, dy, out_dtype)
    return _choices[key]


def backward(spec, env, f1s: list[Tensor], dy: Tensor, wgrad: bool) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """The plan's ``pointwise_backward`` step: (g_a, the consumer's weight gradient or None, S1, S2c) by
    ``cpu.pointwise_backward``."""
    tp, weight, act = spec.layout.terms[0], env.flat[spec.layout.params[0]][0], spec.group.act_kind
    if MODE == "libxsmm":  # unfused: the recompute sweep, libxsmm's dgrad and wgrad, grad_stats_x
        g, dw = cpu.libxsmm_conv_backward(env.apply(cpu, f1s, dy.dtype), dy, weight, wgrad)
        return (g, dw, *cpu.grad_stats_x(g, act, env.sources(0), env.flat[tp.mean], f1s[0], env.flat[tp.beta], dy.dtype))
    return cpu.pointwise_backward(env.sources(0), env.flat[tp.mean], f1s[0], env.flat[tp.beta], act, dy, weight, wgrad)


def _backward_faster(spec, env, dy: Tensor, out_dtype: torch.dtype) -> bool:
    """"auto": whether ``backward`` beats the steps it replaces (recompute sweep, library convolution
    backward, ``grad_stats_x``) at this call's shapes, timed side by side."""
    f1s, tp, params = env.f1s(cpu), spec.layout.terms[0], env.flat[spec.layout.params[0]]

    def unfused():
        a = env.apply(cpu, f1s, out_dtype)
        g, _ = spec.consumers[0].backward(a, dy, params, spec.amp, (True, True, *([False] * (len(params) - 1))))
        cpu.grad_stats_x(g, spec.group.act_kind, env.sources(0), env.flat[tp.mean], f1s[0], env.flat[tp.beta], out_dtype)
    return fastest(lambda: backward(spec, env, f1s, dy, True)) < fastest(unfused)


def fastest(run, runs: int = TIMED_RUNS, warmup: int = 1) -> float:
    """The shortest wall time, in seconds, of ``runs`` calls of ``run()`` after ``warmup`` untimed ones
    (how "auto" and ``bnff bench``'s conv floor pick the faster of two implementations)."""
    for _ in range(warmup):
        run()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def _key(spec, env, maps: list[Tensor], out_dtype: torch.dtype) -> tuple:
    """What an "auto" decision depends on: shapes, strides, dtypes, activation, number of BN terms."""
    lay = spec.layout
    return (tuple(tuple(m.shape) for m in maps), tuple(tuple(env.flat[sl][0].shape) for sl in lay.params),
            tuple(c.conv.stride[0] for c in spec.consumers), out_dtype,
            tuple(env.flat[sl][0].dtype for sl in lay.params), spec.group.act_kind, len(lay.terms))


def _faster(spec, env, f1s: list[Tensor], out_dtype: torch.dtype) -> bool:
    """"auto": whether the fused convolutions beat the unfused path (apply sweep, library convolutions,
    statistics sweeps) at this call's shapes, timed side by side."""
    lay = spec.layout

    def unfused():
        a = env.apply(cpu, f1s, out_dtype)
        for i, c in enumerate(spec.consumers):
            cpu.channel_stats(c.forward(a, env.flat[lay.params[i]], spec.amp))

    def fused():
        for i in range(len(spec.consumers)):
            take_stats(_fused(spec, env, f1s, i))
    return fastest(fused) < fastest(unfused)


def forward(spec, env, maps: list[Tensor], out_dtype: torch.dtype) -> list[Tensor] | None:
    """The consumers' outputs by the fused pointwise convolutions, in consumer order (the plan's
    ``pointwise`` steps), or None when this call runs as ``bnff`` (module docstring)."""
    if not _eligible(spec, env, maps) or (MODE == "auto" and record.active()):
        return None
    key = _key(spec, env, maps, out_dtype) if MODE == "auto" else None
    if _choices.get(key) is False:
        return None
    f1s = env.f1s(cpu)
    if MODE == "libxsmm":  # unfused, on libxsmm's convolutions; the statistics by the usual sweeps
        a = env.apply(cpu, f1s, out_dtype)
        return [cpu.libxsmm_conv(a, env.flat[sl][0], c.conv.stride[0]) for c, sl in zip(spec.consumers, spec.layout.params)]
    if key is not None and key not in _choices:
        _choices[key] = _faster(spec, env, f1s, out_dtype)
        if not _choices[key]:
            return None
    outs = []
    for step in spec.group.schedules["bnff_pw"].forward:
        if step.kind == "pointwise":
            with record.consumer(spec.group.name, step.consumer, "fp"):
                outs.append(_fused(spec, env, f1s, step.consumer))
    return outs


__all__ = ["MODE", "MODES", "backward", "backward_runs", "choices", "fastest", "forward", "take_stats"]
