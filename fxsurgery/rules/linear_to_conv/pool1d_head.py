"""``pool1d->linear``: a Linear on ``x.mean(-1)`` of an ``(N, C, L)`` sequence (the head of a Conv1d stack: audio,
sensors, text CNNs) becomes ``x.mean(-1, keepdim=True)`` viewed as ``(N, C, 1, 1)`` and a 1x1 conv.

The mean over L kept as ``(N, C, 1)`` is the same values; with one more unit dim it is a pooled map, and a Linear on
it a 1x1 conv with kernel ``W.view(O, C, 1, 1)``. (Written as the example of docs/writing-a-rule.md: one module, one
line in the rule set, one test.)
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxsurgery.capture.shapes import shape_of
from fxsurgery.engine.layout import Layout
from fxsurgery.engine.nodes import as_linear
from fxsurgery.engine.rule import RuleContext, Skip
from fxsurgery.rules.linear_to_conv._plan import ConvPlan, LinearRule, check_linear
from fxsurgery.rules.linear_to_conv.layouts import SPATIAL_LAYOUT, from_map

__all__ = ["Pool1dHead", "PATTERN", "sequence_mean_source"]

PATTERN = "pool1d->linear"


def sequence_mean_source(x: object) -> fx.Node | None:
    """``y`` if ``x`` is ``y.mean(-1)`` (``y.mean(2)``, ``y.mean([2])``, ``torch.mean``) of a 3-D ``y``, without
    keepdim or dtype; else None."""
    if not isinstance(x, fx.Node) or x.op not in ("call_method", "call_function"):
        return None
    if x.target not in ("mean", torch.mean) or not isinstance(x.args[0], fx.Node):
        return None
    if len(shape_of(x.args[0]) or ()) != 3 or x.kwargs.get("keepdim") or "dtype" in x.kwargs or len(x.args) > 2:
        return None
    dims = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim")
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    return x.args[0] if [d % 3 for d in dims if isinstance(d, int)] == [2] and len(dims) == 1 else None


class Pool1dHead(LinearRule):
    """A Linear whose input is the mean over the length of an ``(N, C, L)`` sequence."""

    pattern = PATTERN

    def __init__(self, point: Layout = SPATIAL_LAYOUT) -> None:
        super().__init__()
        self.point = point

    def claims(self, node: fx.Node, rw: RuleContext) -> str | None:
        op = as_linear(node, rw.modules)
        if op is None or op.input in rw.alt or sequence_mean_source(op.input) is None:
            return None
        return op.name

    def match(self, node: fx.Node, rw: RuleContext) -> ConvPlan | Skip:
        op, in_f, out_f, x_shape = check_linear(node, rw)
        sequence = sequence_mean_source(op.input)
        if sequence is None:
            return Skip("the mean over the sequence is no longer there")
        c, point = in_f, self.point

        def source(rw: RuleContext) -> fx.Node:
            pooled = rw.graph.call_method("mean", (sequence, [2]), {"keepdim": True})
            return from_map(rw.graph, rw.graph.call_method("unsqueeze", (pooled, -1)), (c, 1, 1), point)

        before = f"Linear({in_f}->{out_f}) on the mean over L of {c} channels"
        return ConvPlan(node, op.name, op, in_f, out_f, x_shape, point, (c, 1, 1), before, source)
