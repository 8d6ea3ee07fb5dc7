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
* ``bn_apply(group, terms, residuals, consumers)``: step 2, ``a = act(sum_k BN_k(x_k) + sum_j r_j)``,
  handed straight to each consumer (convolutions or pools, whose input is then recomputed in the
  backward instead of stored) or returned (materialized) when a user cannot take pre-processing.

The backward of ``bn_apply`` is the fused backward of seed 002: the consumers' dgrads give dL/da
(summed over consumers), step 1 forms dy = dL/da * act'(a) with S1, S2 per BN (eq. 16, 17, 19,
20), step 2 forms dx = F1 * dy + B * x + C per BN (eq. 12), split back onto the feature maps of a
concatenation, where autograd accumulates each map's gradient from all its BNs. The same dy
feeds every BN of a residual sum and is the shortcut's gradient.

Which sweeps run, in which order, what is kept for the backward, what is recomputed and whether
dy is written are not decided here: ``bn_apply`` runs the ``bnff`` schedule of its group's plan
(``bnff.plan.schemes.bnff``), the same steps ``bnff.traffic`` prices. It runs them one by one in
Python, or, where the ``cpu`` backend covers the whole call (its own kernels, convolution
consumers, no SyncBatchNorm, not under ``torch.compile`` or a ``bnff.ops.record.Recorder``), as one
C++ call per direction: the group executor (``csrc/bnff_group.cpp``), which runs the same schedule
compiled into integers (``_Program``) with the same kernels, so its results are the Python
steps' bit for bit; it saves about 100 us of Python per group and step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bnff.ops import backends, bn_math, consumers, pointwise, record
from bnff.plan import GroupPlan, Schedule

Stats = tuple[Tensor, Tensor]


def feature_statistics(f: Tensor, bns: tuple[nn.modules.batchnorm._BatchNorm, ...],
                       backend: str = "reference", group: str = "") -> Stats | None:
    """Step 1 of the forward for one feature map: its per-channel mean and biased variance.

    One sweep over ``f`` (seed 002 eq. 1, 18: mean-variance fusion), computed once and shared by
    every BN in ``bns`` (all the BNs that normalize channels of ``f``, alone or inside a
    concatenation: ICF, seed 001 section 4). Skipped (None) when none of them uses mini-batch
    statistics (all in eval mode with running statistics).

    Args:
        f: the feature map (N, C, H, W), NCHW or channels_last; or (N, C, L), (N, C, D, H, W) (swept as
            ``bn_math.as_4d`` views them).
        bns: the BatchNorm2d modules that will use the statistics (read at call time).
        backend: name of the sweep backend.
        group: the fused group whose plan carries this statistics step (for ``bnff.ops.record``).
    Returns:
        (mean, var), each (C,) in the accumulation dtype, or None.
    Raises:
        ValueError: ``f`` is not 3-D, 4-D or 5-D.
    """
    if not any(bn_math.uses_batch_stats(bn) for bn in bns):
        return None
    # the fused pointwise convolution that produced f took them (bnff_pw; never under torch.compile,
    # whose tracing would break its graph at the lookup)
    taken = None if torch.compiler.is_compiling() else pointwise.take_stats(f)
    if taken is not None:
        return taken
    with torch.no_grad(), record.scope(group, "fp"):
        return backends.get(backend).channel_stats(bn_math.as_4d(f))


def bn_statistics(sources: tuple[Tensor, ...], stats: tuple[Stats | None, ...],
                  bn: nn.modules.batchnorm._BatchNorm, backend: str = "reference") -> Stats:
    """One BN's statistics, gathered from the feature maps it normalizes, and its running-stats update.

    The BN normalizes the concatenation of ``sources`` along channels (a single source without a
    concatenation). Per-channel statistics of a concatenation are those of its parts, so the
    parts' ``feature_statistics`` are concatenated, not recomputed (ICF). In training mode (or
    without running statistics) the mini-batch statistics are returned and ``running_mean`` /
    ``running_var`` / ``num_batches_tracked`` are updated exactly as PyTorch does (docs/design.md
    section 3); in eval mode with running statistics, copies of those are returned.

    Args:
        sources: the feature maps, each (N, C_j, *spatial) of the rank ``bn`` takes, with
            sum(C_j) == bn.num_features.
        stats: ``feature_statistics`` of each source (None where it was skipped).
        bn: the BatchNorm2d module (read at call time: mode, momentum, eps).
        backend: name of the backend whose ``running_update`` blends the running statistics.
    Returns:
        (mean, var), each (num_features,) in the accumulation dtype, not requiring grad.
    Raises:
        ValueError: a source has a rank ``bn`` does not take, or there is one value per channel in
            training (PyTorch's messages).
        RuntimeError: the channel count differs from ``bn.num_features``.
    """
    for s in sources:
        bn._check_input_dim(s)  # PyTorch's own message for a map of the wrong rank
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
    group = bn_math.sync_group(bn)
    if group is not None:  # SyncBatchNorm: the statistics of the mini-batch of every process
        with torch.no_grad():
            count, s, q = bn_math.all_reduce_sums(group, torch.tensor([float(m)], device=mean.device), mean * m,
                                                  (var + mean * mean) * m)
            m = int(count.item())
            g_mean = s / m
            mean, var = g_mean.to(mean.dtype), (q / m - g_mean * g_mean).clamp_min(0).to(var.dtype)
    bn_math.update_running_stats(bn, mean, var, m, backends.get(backend).running_update)
    return mean, var


@dataclass(frozen=True)
class _TermPos:
    """Where one BN's tensors sit in the flat argument list."""

    sources: slice
    mean: int
    var: int
    gamma: int
    beta: int


@dataclass(frozen=True)
class _Layout:
    """A group's flat argument list by name, and where each tensor its plan keeps comes from: fixed
    per group (and consumer parameter counts), so it is worked out once (``_layout``), not per call.

    Attributes:
        terms: per BN term, its positions.
        residuals: the shortcuts' positions.
        params: per consumer, its parameters' positions.
        kept_args: the flat positions of the tensors the plan keeps that are arguments.
        kept_made: the ``(node, role)`` of those a step produces (the result a).
        saved_params: positions of gamma, beta and the consumers' parameters, saved besides the keeps.
        free_after: per backward step, the produced tensors no later step uses.
        backward: the backward steps this operator runs (the schedule's, less the ``reread`` steps,
            which the rereading convolutions run: ``conv_reread``).
        program: the same schedule as the integers of the cpu backend's group executor (``_Program``),
            or None when it has a step that executor does not run.
        backward_pw, free_after_pw: the ``bnff_pw`` schedule's backward steps and what is free after
            each, for a ``GroupPlan.pointwise_backward`` group (else empty): run where
            ``bnff.ops.pointwise.backward_runs`` says the fused pointwise backward runs the call.
    """

    terms: tuple[_TermPos, ...]
    residuals: slice
    params: tuple[slice, ...]
    kept_args: tuple[int, ...]
    kept_made: tuple[tuple[str, str], ...]
    saved_params: tuple[int, ...]
    free_after: tuple[tuple[tuple[str, str], ...], ...]
    backward: tuple = ()
    program: "_Program | None" = None
    backward_pw: tuple = ()
    free_after_pw: tuple = ()


@dataclass(frozen=True)
class _Program:
    """A group's ``bnff`` schedule for the cpu backend's group executor (``csrc/bnff_group.cpp``, which
    documents the encoding): the flat positions of each BN term's tensors (first source, number of
    sources, mean, var, gamma, beta), of the shortcuts (first, number), and the forward's and the
    backward's steps (kind code ``cpu.STEP_CODES``, term, consumer, then whether a and g_a are free
    after it, from ``free_after``). The statistics steps run in ``feature_statistics``, not here."""

    terms: tuple[int, ...]
    residuals: tuple[int, int]
    forward: tuple[int, ...]
    backward: tuple[int, ...]


_LAYOUTS: dict[tuple[int, tuple[int, ...]], tuple[GroupPlan, _Layout]] = {}


def _layout(group: GroupPlan, n_params: tuple[int, ...]) -> _Layout:
    """The ``_Layout`` of ``group`` whose consumers take ``n_params`` parameters each (memoized by identity)."""
    hit = _LAYOUTS.get((id(group), n_params))
    if hit is None or hit[0] is not group:
        hit = _LAYOUTS[(id(group), n_params)] = (group, _make_layout(group, n_params))
    return hit[1]


def _make_layout(group: GroupPlan, n_params: tuple[int, ...]) -> _Layout:
    terms, where, i = [], {}, 0
    for t in group.terms:
        n = len(t.sources)
        terms.append(_TermPos(slice(i, i + n), i + n, i + n + 1, i + n + 2, i + n + 3))
        where.update({(s, "ofmap"): i + j for j, s in enumerate(t.sources)})
        where[(t.bn, "mean")], where[(t.bn, "var")] = i + n, i + n + 1
        i += n + 4
    residuals = slice(i, i + len(group.residuals))
    where.update({(r, "ofmap"): i + j for j, r in enumerate(group.residuals)})
    i = residuals.stop
    params = []
    for n in n_params:
        params.append(slice(i, i + n))
        i += n
    sched = group.schedules["bnff"]
    # the reread steps run in the rereading convolutions' backward (conv_reread), not in this operator's
    sched = Schedule(sched.forward, tuple(s for s in sched.backward if s.kind != "reread"))
    keys = [(r.node, r.role) for r in sched.keeps]
    saved = tuple(j for tp in terms for j in (tp.gamma, tp.beta)) + tuple(j for sl in params for j in range(sl.start, sl.stop))
    free_after = _free_after(group.name, sched.backward)
    pw = group.schedules["bnff_pw"].backward if group.pointwise_backward else ()
    return _Layout(tuple(terms), residuals, tuple(params), tuple(where[k] for k in keys if k in where),
                   tuple(k for k in keys if k not in where), saved, free_after, sched.backward,
                   _program(group, tuple(terms), residuals, sched, free_after), pw, _free_after(group.name, pw))


def _program(group: GroupPlan, terms: tuple[_TermPos, ...], residuals: slice, sched, free_after: tuple) -> _Program | None:
    """``_Program`` of a group's ``bnff`` schedule, or None if a step is not one the executor runs."""
    codes = backends.cpu.STEP_CODES
    a_key, g_key = (group.name, "ofmap"), (group.name, "grad")
    fwd = [s for s in sched.forward if s.kind != "stats"]
    frees = [()] * len(fwd) + list(free_after)
    ints = []
    for s, free in zip(fwd + list(sched.backward), frees):
        if s.kind not in codes:
            return None
        ints.append((codes[s.kind], -1 if s.term is None else s.term, -1 if s.consumer is None else s.consumer,
                     int(a_key in free), int(g_key in free)))
    flat = lambda rows: tuple(i for row in rows for i in row)  # noqa: E731
    return _Program(flat((tp.sources.start, tp.sources.stop - tp.sources.start, tp.mean, tp.var, tp.gamma, tp.beta)
                         for tp in terms),
                    (residuals.start, residuals.stop - residuals.start), flat(ints[:len(fwd)]), flat(ints[len(fwd):]))


def _free_after(group: str, backward: tuple) -> tuple:
    """Per backward step, the produced tensors (a, g_a) no later step uses; a consumer's backward uses a."""
    def uses(s):
        return {(r.node, r.role) for r in s.reads} | ({(group, "ofmap")} if s.kind == "consumer_backward" else set())
    out = []
    for i in range(len(backward)):
        later = set().union(*(uses(s) for s in backward[i + 1:]))
        out.append(tuple(k for k in ((group, "ofmap"), (group, "grad")) if k not in later))
    return tuple(out)


@dataclass(frozen=True)
class _Spec:
    """One call of the fused operator: its group's plan and layout, what its BN modules say now
    (eps; whether mini-batch statistics are used, which makes B and C live), its consumers, and the
    dtype autocast gives their lower-precision ops (None: off; their parameters come cast to it)."""

    group: GroupPlan
    layout: _Layout
    eps: tuple[float, ...]
    batch: tuple[bool, ...]
    consumers: tuple[consumers.Consumer, ...]
    backend: str
    amp: torch.dtype | None
    sync: tuple = ()


def _spec(group: GroupPlan, terms: tuple, residuals: tuple, wrapped: tuple, backend: str) -> tuple[_Spec, list]:
    """The ``_Spec`` and the flat argument list of a ``bn_apply`` call."""
    flat: list[Tensor | None] = []
    for sources, (mean, var), bn in terms:
        flat += [*sources, mean, var, bn.weight, bn.bias]
    flat += list(residuals)
    amp = consumers.autocast_dtype((residuals or terms[0][0])[0])
    params = [w.params(amp) for w in wrapped]
    for p in params:
        flat += list(p)
    bns = [bn for _, _, bn in terms]
    layout = _layout(group, tuple(len(p) for p in params))
    return _Spec(group, layout, tuple(bn.eps for bn in bns), tuple(bn_math.uses_batch_stats(bn) for bn in bns),
                 wrapped, backend, amp, tuple(bn_math.sync_group(bn) for bn in bns)), flat


class _Env:
    """A call's tensors: the flat arguments by their named positions (``_Layout``), and what the steps
    produce, by plan name ``(node, role)`` (``bnff.plan.Ref``)."""

    def __init__(self, spec: _Spec, flat: list) -> None:
        self.spec, self.lay, self.flat = spec, spec.layout, flat
        self.t: dict[tuple[str, str], Tensor | None] = {}

    def sources(self, k: int) -> list[Tensor]:
        return self.flat[self.lay.terms[k].sources]

    def all_sources(self) -> list[list[Tensor]]:
        return [self.flat[tp.sources] for tp in self.lay.terms]

    def means(self) -> list[Tensor]:
        return [self.flat[tp.mean] for tp in self.lay.terms]

    def betas(self) -> list[Tensor | None]:
        return [self.flat[tp.beta] for tp in self.lay.terms]

    def f1s(self, be) -> list[Tensor]:
        return [be.scale(self.flat[tp.var], self.flat[tp.gamma], eps) for tp, eps in zip(self.lay.terms, self.spec.eps)]

    def apply(self, be, f1s: list[Tensor], out_dtype: torch.dtype) -> Tensor:
        return be.apply(self.all_sources(), self.means(), f1s, self.betas(), self.flat[self.lay.residuals],
                        self.spec.group.act_kind, out_dtype)

    def saved(self) -> list[Tensor]:
        """What the forward saves: the tensors the plan keeps (flat arguments, then produced ones), then
        gamma, beta and the consumers' parameters."""
        flat, lay = self.flat, self.lay
        return [flat[i] for i in lay.kept_args] + [self.t[k] for k in lay.kept_made] + [flat[i] for i in lay.saved_params]

    def restore(self, saved: tuple) -> None:
        """Put what ``saved`` gave back in place."""
        lay, it = self.lay, iter(saved)
        for i in lay.kept_args:
            self.flat[i] = next(it)
        for k in lay.kept_made:
            self.t[k] = next(it)
        for i in lay.saved_params:
            self.flat[i] = next(it)


def _synced(group, s1: Tensor, s2c: Tensor, sources: list[Tensor]) -> tuple[Tensor, Tensor]:
    """S1, S2 for dx: over this process's mini-batch, or, for a SyncBatchNorm (``group``), over every
    process's (their sums all-reduced with the counts, as ``nn.SyncBatchNorm``'s backward does);
    dgamma and dbeta keep this process's own sums (DDP averages them)."""
    if group is None:
        return s1, s2c
    m = sources[0].numel() // sources[0].shape[1]
    count, a, b = bn_math.all_reduce_sums(group, torch.tensor([float(m)], device=s1.device), s1 * m, s2c * m)
    total = count.item()
    return (a / total).to(s1.dtype), (b / total).to(s2c.dtype)


@dataclass(frozen=True)
class _Executor:
    """How one call runs on the cpu backend's group executor: its layout code and consumers' integers."""

    layout: int
    convs: tuple[int, ...]


def _executor(spec: _Spec, flat: tuple, maps: list[Tensor], out_dtype: torch.dtype) -> _Executor | None:
    """The group executor's terms for this call, or None when the Python steps run it: the executor
    runs only the cpu backend's own sweeps (``cpu.group_layout`` covers the maps), convolution consumers
    whose input and parameters are already in the convolution's dtype (no cast to make), no
    SyncBatchNorm, and neither under ``torch.compile`` (which traces the Python steps) nor while a
    ``bnff.ops.record.Recorder`` attributes operators to steps."""
    lay = spec.layout
    if lay.program is None or spec.backend != "cpu" or record.active() or torch.compiler.is_compiling():
        return None
    if any(s is not None for s in spec.sync) or (spec.amp is not None and spec.amp != out_dtype):
        return None
    if backends.cpu.act_why(spec.group.act_kind) is not None:
        return None
    convs = []
    for w, sl in zip(spec.consumers, lay.params):
        geometry = getattr(w, "geometry", None)
        if geometry is None or any(p is not None and p.dtype != out_dtype for p in flat[sl]):
            return None
        convs += [sl.start, *geometry]
    layout = backends.cpu.group_layout(maps, [flat[tp.mean] for tp in lay.terms], out_dtype, len(lay.terms),
                                       lay.residuals.stop - lay.residuals.start)
    return None if layout is None else _Executor(layout, tuple(convs))


class _ApplyConsume(torch.autograd.Function):
    """Fused BN apply (+ add + activation) [+ consumers]: runs its group's ``bnff`` schedule, step by
    step here or, where it covers the call, as one call of the cpu backend's group executor; or, where
    ``bnff.ops.pointwise`` runs the call's consumers as fused pointwise convolutions, the forward of
    its ``bnff_pw`` schedule, and, where it runs the consumer's backward so, that schedule's backward
    (step by step here; each direction decides for itself)."""

    @staticmethod
    def forward(ctx, spec: _Spec, *flat):
        g, lay, sched = spec.group, spec.layout, spec.group.schedules["bnff"]
        be = backends.get(spec.backend)
        env = _Env(spec, list(flat))
        maps = [x for srcs in env.all_sources() for x in srcs] + env.flat[lay.residuals]
        out_dtype = functools.reduce(torch.promote_types, [m.dtype for m in maps])
        ex = _executor(spec, flat, maps, out_dtype)
        outs = pointwise.forward(spec, env, maps, out_dtype)  # the bnff_pw scheme's steps, where they run
        if outs is None and ex is not None:
            a, *outs = be.group_forward(env.flat, lay.program.terms, lay.program.residuals, ex.convs,
                                        lay.program.forward, g.act_kind, list(spec.eps), out_dtype, ex.layout)
            env.t[(g.name, "ofmap")] = a
        elif outs is None:
            f1s = env.f1s(be)
            outs = []
            for step in sched.forward:
                if step.kind == "apply":
                    env.t[(g.name, "ofmap")] = a = env.apply(be, f1s, out_dtype)
                elif step.kind == "consume":
                    with record.consumer(g.name, step.consumer, "fp"):
                        outs.append(spec.consumers[step.consumer].forward(a, flat[lay.params[step.consumer]], spec.amp))
                # the "stats" steps run in feature_statistics, right after each producer
        ctx.spec, ctx.out_dtype, ctx.n, ctx.executor = spec, out_dtype, len(flat), ex
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*env.saved())
        return tuple(outs) if g.per_consumer else a

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outs):
        with record.scope(ctx.spec.group.name, "bp"):
            return _ApplyConsume._backward(ctx, grad_outs)

    @staticmethod
    def _backward(ctx, grad_outs: tuple) -> tuple:
        spec: _Spec = ctx.spec
        g, lay, sched = spec.group, spec.layout, spec.group.schedules["bnff"]
        needs = ctx.needs_input_grad[1:]
        if all(o is None for o in grad_outs):
            return (None,) * (1 + ctx.n)
        env = _Env(spec, [None] * ctx.n)
        env.restore(ctx.saved_tensors)
        be = backends.get(spec.backend)
        a_key, g_key, dy_key = (g.name, "ofmap"), (g.name, "grad"), (g.name, "dy")
        if not g.per_consumer and g.grad_slice:
            env.t[g_key] = grad_outs[0]  # the plan's grad_layout step makes it dense
        elif not g.per_consumer:
            # a gradient a user's backward hands over non-dense (a mean's expanded view) is made dense
            # as that user's own work: the traffic model charges its backward for writing it
            with record.user(g.name, "bp"):
                env.t[g_key] = be.dense_like(grad_outs[0], env.sources(0)[0] if lay.terms else grad_outs[0])
        ex: _Executor | None = ctx.executor
        steps, frees = lay.backward, lay.free_after
        if lay.backward_pw and pointwise.backward_runs(spec, env, grad_outs, ctx.out_dtype):
            steps, frees, ex = lay.backward_pw, lay.free_after_pw, None  # the bnff_pw schedule's backward
        if ex is not None:
            p = lay.program
            g_outs = list(grad_outs) if g.per_consumer else [env.t[g_key]]
            grads = be.group_backward(env.flat, env.t.get(a_key), g_outs, p.terms, p.residuals, ex.convs, p.backward, g.act_kind, list(spec.eps),
                                      list(spec.batch), list(needs), g.per_consumer, ctx.out_dtype, ex.layout)
            return (None, *grads)
        f1s = env.f1s(be)
        grads: list[Tensor | None] = [None] * ctx.n
        dgrads: dict[int, Tensor] = {}
        s1s: list[Tensor | None] = [None] * len(lay.terms)
        s2cs: list[Tensor | None] = [None] * len(lay.terms)
        s1d: list[Tensor | None] = [None] * len(lay.terms)  # what dx uses: the same, or summed over
        s2d: list[Tensor | None] = [None] * len(lay.terms)  # the processes of a SyncBatchNorm
        vecs: list[tuple | None] = [None] * len(lay.terms)  # per term (B, dgamma, dbeta), once its sums are known

        def sums_known(j: int) -> None:
            s1d[j], s2d[j] = _synced(spec.sync[j], s1s[j], s2cs[j], env.sources(j))
            x0 = env.flat[lay.terms[j].sources.start]
            vecs[j] = be.backward_vectors(env.flat[lay.terms[j].var], f1s[j], s1s[j], s2cs[j], s2d[j],
                                          x0.numel() // x0.shape[1], spec.eps[j], spec.batch[j])
        for i, step in enumerate(steps):
            k, kind = step.term, step.kind
            if kind == "pointwise_backward":
                c, sl = step.consumer, lay.params[step.consumer]
                with record.consumer(g.name, c, "bp"):
                    env.t[g_key], dw, s1s[k], s2cs[k] = pointwise.backward(spec, env, f1s, grad_outs[c], needs[sl.start])
                grads[sl.start] = dw
                sums_known(k)
            elif kind == "recompute":
                env.t[a_key] = env.apply(be, f1s, ctx.out_dtype)
            elif kind == "grad_layout":
                env.t[g_key] = be.dense_like(env.t[g_key], env.sources(0)[0] if lay.terms else env.t[a_key])
            elif kind == "consumer_backward":
                c, sl = step.consumer, lay.params[step.consumer]
                if grad_outs[c] is not None:
                    with record.consumer(g.name, c, "bp"):
                        g_c, pg = spec.consumers[c].backward(env.t[a_key], grad_outs[c], env.flat[sl], spec.amp,
                                                             (True, *needs[sl]))
                    grads[sl] = list(pg)
                    if env.t.get(g_key) is None:
                        env.t[g_key] = g_c
                    else:
                        dgrads[c] = g_c
            elif kind == "grad_add":
                g_c = dgrads.pop(step.consumer, None)
                if g_c is not None:
                    env.t[g_key] = env.t[g_key] + g_c
            elif kind == "grad_stats_x":
                s1s[k], s2cs[k] = be.grad_stats_x(env.t[g_key], g.act_kind, env.sources(k), env.flat[lay.terms[k].mean],
                                                  f1s[k], env.flat[lay.terms[k].beta], ctx.out_dtype)
                sums_known(k)
            elif kind == "grad_stats":
                env.t[dy_key], s1s, s2cs = be.grad_stats(env.t[g_key], env.t.get(a_key), g.act_kind, env.all_sources(),
                                                         env.means(), f1s, env.betas(), env.flat[lay.residuals])
                for j in range(len(lay.terms)):
                    sums_known(j)
            elif kind in ("input_grad", "input_grad_x") and any(needs[lay.terms[k].sources]):
                tp, b = lay.terms[k], vecs[k][0]
                if kind == "input_grad_x":
                    grads[tp.sources] = be.input_grad_x(env.t[g_key], g.act_kind, env.sources(k), env.flat[tp.mean],
                                                        f1s[k], env.flat[tp.beta], ctx.out_dtype, b, s1d[k])
                else:
                    grads[tp.sources] = be.input_grad(env.t[dy_key], env.sources(k), env.flat[tp.mean], f1s[k], b, s1d[k])
            for key in frees[i]:
                env.t.pop(key, None)
        for k, tp in enumerate(lay.terms):
            if needs[tp.gamma] or needs[tp.beta]:
                _, dgamma, dbeta = vecs[k]
                grads[tp.gamma] = bn_math.as_dtype(dgamma, env.flat[tp.gamma].dtype) if needs[tp.gamma] else None
                grads[tp.beta] = bn_math.as_dtype(dbeta, env.flat[tp.beta].dtype) if needs[tp.beta] else None
        for j in range(lay.residuals.start, lay.residuals.stop):
            grads[j] = bn_math.as_dtype(env.t[dy_key], ctx.out_dtype) if needs[j] else None
        return (None, *grads)


Term = tuple[tuple[Tensor, ...], Stats, nn.modules.batchnorm._BatchNorm]


def bn_apply(group: GroupPlan, terms: tuple[Term, ...], residuals: tuple[Tensor, ...],
             consumer_layers: tuple[nn.Module | consumers.FunctionalSpec, ...] = (),
             backend: str = "reference") -> Tensor | tuple[Tensor, ...]:
    """Step 2 of restructured BN, fused with residual add, ReLU/ReLU6 and the consuming layers.

    Computes ``a = act(sum_k BN_k(x_k) + sum_j r_j)`` where ``BN_k(x) = F1_k * (x - mu_k) + beta_k``
    uses the statistics from ``bn_statistics`` (seed 002 eq. 9; the shortcut add is pattern (4),
    with a second BN term for a projection shortcut, pattern (4)-2), and ``x_k`` is the
    concatenation of the term's source feature maps along channels (ICF; never stored).

    The steps it runs, forward and backward, and what it keeps are the ``bnff`` schedule of
    ``group`` (``bnff.plan.schemes.bnff``); nothing here decides them.

    Args:
        group: the group's plan (``bnff.plan.GroupPlan``): its terms, shortcuts, activation and
            consumers in the order of the arguments below, and its schedules.
        terms: ``(sources_k, (mean_k, var_k), bn_k)`` per BN: the feature maps (N, C_j, H, W) (or
            (N, C_j, L), (N, C_j, D, H, W), with ``BatchNorm1d`` / ``BatchNorm3d``) whose
            channel concatenation the BN normalizes, its statistics (C,) each, and the
            BatchNorm2d module that owns gamma, beta and eps.
        residuals: identity-shortcut tensors (N, C, H, W) added before the activation.
        consumer_layers: the layers fed by ``a``: ``nn.Conv2d`` or pooling modules, or functional
            pools as ``(name, args, kwargs)`` (``bnff.graph.consumers.FUNCTIONAL``). ``a`` is then
            recomputed in the backward, never stored. Empty: return ``a`` itself.
        backend: name of the sweep backend.
    Returns:
        The tuple of consumer outputs, or the (N, C, H, W) activation ``a`` when there is none.
    """
    wrapped = tuple(consumers.make(c) for c in consumer_layers)
    first = (residuals or terms[0][0])[0]
    spatial = tuple(first.shape[2:])
    if len(spatial) != 2:  # 1-D and 3-D maps run as the 4-D views the sweeps take (bn_math.as_4d)
        terms = tuple((tuple(bn_math.as_4d(x) for x in xs), st, bn) for xs, st, bn in terms)
        residuals = tuple(bn_math.as_4d(r) for r in residuals)
        wrapped = tuple(consumers.NativeShape(w, spatial) for w in wrapped)
    spec, flat = _spec(group, terms, residuals, wrapped, backend)
    with record.scope(group.name, "fp"):
        out = _ApplyConsume.apply(spec, *flat)
    return out if group.per_consumer or len(spatial) == 2 else bn_math.from_4d(out, spatial)
