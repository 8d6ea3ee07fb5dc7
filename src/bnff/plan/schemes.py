"""The steps of a fused group under each execution scheme: the one place a group's policy is written.

What a group reads, writes, keeps for the backward and recomputes, per scheme (docs/design.md
section 8). Execution (``bnff.ops.fused``) runs the ``bnff`` schedule; ``bnff.traffic`` sums the
bytes and FLOPs of every schedule; the hardware models read them too.

``unfused`` (seed 002 section 1.2)
    Every member runs as a layer of its own (``eager_steps``): BN reads its input twice and writes
    once (forward 3 units, backward 5), ReLU 2 / 3, Add 3 / 0 (its backward hands dz on).
``bnff`` (sweeps around library convolutions; what ``bnff.ops`` executes)
    Forward: one statistics sweep per feature map the group owns (MVF; ICF: a map normalized by
    several BNs is swept once, by the first group), one apply sweep writing a, the consumers run.
    Kept: the BN inputs, two (C,) vectors per BN, the shortcuts when a is recomputed or the
    activation's derivative reads its input z (``bnff.activations``: SiLU, GELU, ...), a itself only
    when it is materialized with an activation whose derivative reads it and a shortcut (its mask).
    Backward: a materialized a recomputed (read x, write a) inside the backward of each convolution
    that reads it without keeping it (``GroupPlan.rereaders``; ``reread`` steps, which run when
    that convolution's backward does, before the group's own); a gradient arriving as a slice of a
    concatenation's gradient made dense once, a recomputed for the consumers' wgrads (a sweep writing it), the consumers' data
    gradients summed pairwise; then a lone BN (one BN, no shortcut) reduces S1, S2 and forms dx in
    two sweeps that read g_a and x and recompute the mask from x, writing no dy, unless its
    activation's derivative is costly (``GroupPlan.writes_dy``: SiLU, GELU, Mish); any other group
    writes dy once (it is also the shortcut's gradient) and forms dx per BN from it; that sweep reads
    the result a for the mask, or, for an activation whose derivative reads z, the shortcuts, and
    recomputes z from them and the BN inputs on the way.
``bnff_pw`` (``bnff`` with fused pointwise convolutions, issue 31)
    ``bnff``, but a group whose consumers are all 1x1 convolutions (``GroupPlan.pointwise``) applies
    a block of rows at a time in each consumer's GEMM prologue (``pointwise`` steps: a never written,
    each consumer reads the BN inputs and shortcuts instead of its ifmap, all but the first BN input
    extra), and a feature map such a convolution produces gets its statistics from that
    convolution's epilogue (``epilogue_stats``: no sweep). The backward is ``bnff``'s, except for a
    ``GroupPlan.pointwise_backward`` group: its consumer's dgrad and wgrad run in blocks of rows with
    the BN's ``grad_stats_x`` and the recompute of a inside (``pointwise_backward``: a never written, g_a
    and x not read again for S1, S2), then ``input_grad_x`` as in ``bnff``.
``fused`` (seed 002 section 2.3; PreU/PostU on the accelerator)
    Statistics, apply, mask, S1 and S2 run inside the convolutions on chip. Off chip remain: a
    consumer reading the BN inputs and shortcuts instead of its ifmap (all but the first are
    extra), a materialized result written once and its gradient's post-process (a sweep of its
    own when no user can host it), the consumers' extra data gradients, and each producer's
    pre-process reading x once to form dx (eq. 12).
"""

from __future__ import annotations

from dataclasses import replace

from bnff import activations
from bnff.names import SCHEMES
from bnff.plan.group import GroupPlan
from bnff.plan.steps import Flop, Ref, Schedule, Step



def eager_steps(node: str, kind: str, inputs: tuple[str, ...], act: str | None = None) -> Schedule:
    """A BN, activation or add executed as a layer of its own (seed 002 section 1.2).

    Args:
        node: the layer's fx node name.
        kind: "bn", "act" or "add" (``bnff.graph.Kind`` values).
        inputs: its tensor inputs' node names (one; two for an add).
        act: an activation's kind (``bnff.activations``): its FLOPs, and whether its backward reads its
            output or its input (None: ReLU's counts, the output).
    Raises:
        ValueError: another kind.
    """
    out, g_out = Ref(node, "ofmap", node), Ref(node, "grad", node)
    if kind == "bn":
        x, g_x = Ref(inputs[0], "ofmap", node), Ref(inputs[0], "grad", node)
        stats = (Ref(inputs[0], "mean", node), Ref(inputs[0], "var", node))
        return Schedule(
            (Step("fp", "bn_stats", (x,), stats, flops=(Flop("bn_stats", x),)),
             Step("fp", "bn_apply", (x,), (out,), flops=(Flop("bn_apply", x),))),
            (Step("bp", "bn_grad_stats", (g_out, x), flops=(Flop("bn_grad_stats", x),)),
             Step("bp", "bn_input_grad", (g_out, x), (g_x,), flops=(Flop("bn_dx", x),))))
    if kind == "act":
        x, g_x = Ref(inputs[0], "ofmap", node), Ref(inputs[0], "grad", node)
        f = activations.spec(act or "relu")
        return Schedule((Step("fp", "act", (x,), (out,), flops=(Flop("pointwise", x, f.entry.flops),)),),
                        (Step("bp", "act_backward", (g_out, x if f.entry.eager_saves == "input" else out), (g_x,),
                              flops=(Flop("pointwise", x, f.entry.grad_flops),)),))
    if kind == "add":
        return Schedule((Step("fp", "add", tuple(Ref(i, "ofmap", node) for i in inputs), (out,),
                              flops=(Flop("pointwise", out),)),), ())
    raise ValueError(f"eager_steps covers BN, activation and add layers, not {kind!r}")


def unfused(g: GroupPlan) -> Schedule:
    """The group's members as layers of their own (a concatenation only a BN reads is its layer's)."""
    parts = [eager_steps(t.bn, "bn", (t.cat or t.sources[0],)) for t in g.terms]
    if g.add is not None:
        addends = tuple(t.bn for t in g.terms) + g.residuals
        parts.append(eager_steps(g.add, "add", addends))
    if g.act is not None:
        parts.append(eager_steps(g.act, "act", (g.add or (g.terms[0].bn if g.terms else g.residuals[0]),), g.act_kind))
    return Schedule(tuple(s for p in parts for s in p.forward), tuple(s for p in reversed(parts) for s in p.backward))


def _z_flops(g: GroupPlan) -> tuple[Flop, ...]:
    """The pre-activation's arithmetic: F1*(x-mu)+beta per BN element, one add per shortcut element."""
    return tuple(Flop("bn_apply", x) for x in g.xs()) + tuple(Flop("pointwise", r) for r in g.rs())


def _apply_flops(g: GroupPlan) -> tuple[Flop, ...]:
    """The apply step's arithmetic: the pre-activation, then the activation per result element (its
    count from ``bnff.activations``)."""
    return _z_flops(g) + ((Flop("pointwise", g.a(), activations.spec(g.act_kind).entry.flops),) if g.act else ())


def _mask_flops(g: GroupPlan) -> tuple[Flop, ...]:
    """dy = g_a * f'(.) per result element (the table's count)."""
    return (Flop("pointwise", g.a(), activations.spec(g.act_kind).entry.grad_flops),) if g.act else ()


def _mask_reads(g: GroupPlan) -> tuple[Ref, ...]:
    """What a backward sweep of a group with several terms or a shortcut reads for the activation's
    derivative besides g_a and the BN inputs: the result a, or the shortcuts to recompute z from."""
    return {"a": (g.a(),), "z": tuple(g.rs()), None: ()}[g.derivative_reads]


def _vectors(g: GroupPlan, *roles: str) -> tuple[Ref, ...]:
    return tuple(Ref(t.bn, role, t.bn) for t in g.terms for role in roles)


def _keeps(g: GroupPlan) -> tuple[Ref, ...]:
    """What both fused schemes keep: each BN input, mean and var per BN, the shortcuts when a or z is
    recomputed, a itself when it is materialized with an activation whose derivative reads it and a
    shortcut."""
    return (tuple(g.xs()) + _vectors(g, "mean", "var") + (tuple(g.rs()) if g.keeps_shortcuts else ())
            + ((g.a(),) if g.keeps_result else ()))


def _owned(g: GroupPlan) -> list[tuple[int, Ref]]:
    """(term, feature map) for the maps whose statistics this group carries."""
    return [(k, g.x(k, s)) for k, t in enumerate(g.terms) for s in t.sources if s in g.owns]


def _dx(g: GroupPlan, k: int) -> tuple[Ref, ...]:
    return tuple(Ref(s, "grad", g.terms[k].bn) for s in g.terms[k].sources)


def bnff(g: GroupPlan) -> Schedule:
    """The sweeps ``bnff.ops`` executes around library convolutions (module docstring)."""
    a, g_a, inputs = g.a(), g.g_a(), tuple(g.xs() + g.rs())
    fp = [Step("fp", "stats", (x,), (Ref(x.node, "mean", x.charge), Ref(x.node, "var", x.charge)),
               flops=(Flop("bn_stats", x),), term=k) for k, x in _owned(g)]
    fp.append(Step("fp", "apply", inputs, (a,), keeps=_keeps(g), flops=_apply_flops(g)))
    fp += [Step("fp", "consume", consumer=i) for i in range(len(g.consumers))]
    bp = [Step("bp", "reread", inputs, (a,), recomputes=(a,), flops=_apply_flops(g), consumer=i)
          for i in range(len(g.rereaders))]
    bp += [Step("bp", "grad_layout", (g_a,), (g_a,))] if g.grad_slice else []
    if g.per_consumer:
        bp.append(Step("bp", "recompute", inputs, (a,), recomputes=(a,), flops=_apply_flops(g)))
    bp += [Step("bp", "consumer_backward", consumer=i) for i in range(len(g.consumers))]
    bp += [Step("bp", "grad_add", (g_a, Ref(g.name, "dgrad", g.name)), (g_a,), flops=(Flop("pointwise", a),), consumer=i)
           for i in range(1, len(g.consumers))]
    if not g.writes_dy:
        x = tuple(g.xs(0))
        again = {"a": (a,), "z": (g.z(),), None: ()}[g.derivative_reads]
        remask = tuple(Flop("bn_apply", r) for r in x) + _mask_flops(g) if g.act else ()
        bp.append(Step("bp", "grad_stats_x", (g_a, *x), _vectors(g, "s1", "s2"), recomputes=again,
                       flops=tuple(Flop("bn_grad_stats", r) for r in x) + remask, term=0))
        bp.append(Step("bp", "input_grad_x", (g_a, *x), _dx(g, 0), recomputes=again,
                       flops=tuple(Flop("bn_dx", r) for r in x) + remask, term=0))
    else:
        z = g.derivative_reads == "z"
        bp.append(Step("bp", "grad_stats", (g_a, *_mask_reads(g), *g.xs()), (g.dy(), *_vectors(g, "s1", "s2")),
                       recomputes=(g.z(),) if z else (),
                       flops=tuple(Flop("bn_grad_stats", x) for x in g.xs()) + (_z_flops(g) if z else ()) + _mask_flops(g)))
        bp += [Step("bp", "input_grad", (g.dy(), *g.xs(k)), _dx(g, k), flops=tuple(Flop("bn_dx", x) for x in g.xs(k)),
                    term=k) for k in range(len(g.terms))]
    return Schedule(tuple(fp), tuple(bp))


def bnff_pw(g: GroupPlan) -> Schedule:
    """``bnff`` with the fused pointwise convolutions' prologues and epilogues (module docstring)."""
    base = bnff(g)
    inputs = tuple(g.xs() + g.rs())
    beyond = inputs[len(g.terms[0].sources) if g.terms else 1:]
    fp = []
    for s in base.forward:
        if s.kind == "stats" and s.reads[0].node in g.stats_in_producer:
            fp.append(replace(s, kind="epilogue_stats", reads=()))
        elif g.pointwise and s.kind == "apply":
            fp += [Step("fp", "pointwise", beyond, keeps=s.keeps if i == 0 else (), flops=s.flops, consumer=i)
                   for i in range(len(g.consumers))]
        elif not (g.pointwise and s.kind == "consume"):
            fp.append(s)
    if not g.pointwise_backward:
        return Schedule(tuple(fp), base.backward)
    by_kind = {s.kind: s for s in base.backward}  # lone, one consumer: recompute, consumer_backward, grad_stats_x, input_grad_x
    stats = by_kind["grad_stats_x"]
    bp = (Step("bp", "pointwise_backward", (), stats.writes, recomputes=(g.a(),),
               flops=by_kind["recompute"].flops + stats.flops, term=0, consumer=0), by_kind["input_grad_x"])
    return Schedule(tuple(fp), bp)


def fused(g: GroupPlan) -> Schedule:
    """Pre- and post-processing inside the convolutions (module docstring)."""
    a, inputs = g.a(), tuple(g.xs() + g.rs())
    fp = []
    if _owned(g):  # the producers' post-process, on chip
        fp.append(Step("fp", "stats", flops=tuple(Flop("bn_stats", x) for _, x in _owned(g))))
    # the first BN's input (all its feature maps: a concatenation's parts) is the consumer's ifmap;
    # the other BN inputs and the shortcuts are read besides it
    beyond = tuple(inputs[len(g.terms[0].sources) if g.terms else 1:])
    extra = beyond if g.per_consumer or g.host else inputs
    for i in range(max(1, len(g.consumers))):
        fp.append(Step("fp", "apply", extra, () if g.per_consumer else (a,), keeps=_keeps(g) if i == 0 else (),
                       flops=_apply_flops(g), consumer=i if g.per_consumer else None))
    # a rereader reads the BN inputs (the result's shape: lone groups) for its wgrad in place of a
    bp = [Step("bp", "reread", beyond, recomputes=(a,), flops=_apply_flops(g), consumer=i) for i in range(len(g.rereaders))]
    if g.per_consumer:  # each wgrad reads the inputs instead of the result, the consumers' dL/da summed
        bp += [Step("bp", "recompute", beyond, recomputes=(a,), flops=_apply_flops(g), consumer=i)
               for i in range(len(g.consumers))]
        bp += [Step("bp", "grad_add", (Ref(g.name, "dgrad", g.name),), consumer=i) for i in range(1, len(g.consumers))]
        bp.append(Step("bp", "grad_stats", flops=tuple(Flop("bn_grad_stats", x) for x in g.xs()) + _mask_flops(g)))
    else:  # S2 needs x; a user hosting the post-process reads the kept result for its wgrad anyway
        z = tuple(g.rs()) if g.derivative_reads == "z" else ()  # a host reads the shortcuts for z too
        own = z if g.host else (g.g_a(), *_mask_reads(g))
        bp.append(Step("bp", "grad_stats", tuple(g.xs()) + own, () if g.host else (g.dy(),),
                       flops=tuple(Flop("bn_grad_stats", x) for x in g.xs()) + _mask_flops(g)))
    owned = {x for _, x in _owned(g)}
    bp += [Step("bp", "input_grad", tuple(x for x in g.xs(k) if x in owned), flops=tuple(Flop("bn_dx", x) for x in g.xs(k)),
                term=k) for k in range(len(g.terms))]
    return Schedule(tuple(fp), tuple(bp))


BUILDERS = {"unfused": unfused, "bnff": bnff, "bnff_pw": bnff_pw, "fused": fused}


__all__ = ["BUILDERS", "SCHEMES", "bnff", "bnff_pw", "eager_steps", "fused", "unfused"]
