"""Tracing (torch.fx) and the layer-graph classification shared by restructuring and analysis."""

from bnff.graph.kinds import Kind, NodeInfo, classify
from bnff.graph.trace import TraceError, Traced, trace

__all__ = ["Kind", "NodeInfo", "classify", "TraceError", "Traced", "trace"]
