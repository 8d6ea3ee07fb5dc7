"""``bnff.traffic``: analytical off-chip traffic, footprint and FLOP model of CNN training.

Data flows one way: model -> ``bnff.graph.layers`` (fx trace + meta-tensor shapes) ->
``bnff.plan`` (the fusion plan: each group's steps per scheme) -> ``account`` (traffic, FLOPs) and ``footprint``
-> ``Analysis`` records. ``patterns`` reproduces seed 002 Tables 1-2; ``published`` holds the
papers' figures for ``bnff traffic --reproduce``.
"""

from bnff.traffic import patterns, published, report
from bnff.traffic.analysis import Analysis, LayerRecord, analyze, compare
from bnff.traffic.account import SCHEMES
from bnff.traffic.assumptions import SEED002, Assumptions

__all__ = ["Analysis", "Assumptions", "LayerRecord", "SCHEMES", "SEED002", "analyze", "compare"]
