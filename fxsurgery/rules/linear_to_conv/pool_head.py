"""``pool->linear``: a Linear on ``x.mean([2, 3])`` becomes ``x.mean([2, 3], keepdim=True)`` and a 1x1 conv.

The mean over HxW of an ``(N, C, H, W)`` map kept as ``(N, C, 1, 1)`` is the same values; a Linear on them is a
1x1 conv with kernel ``W.view(O, C, 1, 1)``. Elementwise ops between the mean and the Linear (``mean -> Dropout ->
Linear`` in MNASNet) run on the pooled map.
"""

from __future__ import annotations

import torch.fx as fx

from fxsurgery.engine.elementwise import elementwise_tensor_inputs
from fxsurgery.engine.emit import replay
from fxsurgery.engine.layout import Layout
from fxsurgery.engine.nodes import as_linear, spatial_mean_source, static_shape
from fxsurgery.engine.rule import RuleContext, Skip
from fxsurgery.engine.weights import linear_to_conv_weight
from fxsurgery.rules.linear_to_conv._plan import ConvPlan, LinearRule, WeightMap, check_linear
from fxsurgery.rules.linear_to_conv.layouts import SPATIAL_LAYOUT, from_map

__all__ = ["PoolHead", "PATTERN", "mean_source"]

PATTERN = "pool->linear"


def mean_source(x: object, rw: RuleContext) -> tuple[fx.Node, list[tuple[fx.Node, fx.Node]]] | None:
    """``(y, ops)`` if ``x`` is ``y.mean([2, 3])`` followed by elementwise ops, first to last; None otherwise."""
    ops: list[tuple[fx.Node, fx.Node]] = []
    while isinstance(x, fx.Node):
        pooled = spatial_mean_source(x)
        if pooled is not None:
            return pooled, ops[::-1]
        inputs = elementwise_tensor_inputs(x, rw.modules)
        if not inputs or len(inputs) != 1:
            return None
        ops.append((x, inputs[0]))
        x = inputs[0]
    return None


class PoolHead(LinearRule):
    """A Linear whose input is a spatial mean (through elementwise ops)."""

    pattern = PATTERN

    def __init__(self, point: Layout = SPATIAL_LAYOUT, weight_map: WeightMap = linear_to_conv_weight) -> None:
        super().__init__(weight_map)
        self.point = point

    def claims(self, node: fx.Node, rw: RuleContext) -> str | None:
        op = as_linear(node, rw.modules)
        if op is None or not isinstance(op.input, fx.Node) or op.input in rw.alt:
            return None
        return op.name if mean_source(op.input, rw) is not None else None

    def match(self, node: fx.Node, rw: RuleContext) -> ConvPlan | Skip:
        op, in_f, out_f, x_shape = check_linear(node, rw)
        found = mean_source(op.input, rw)
        if found is None:
            return Skip("the spatial mean is no longer there")
        pooled, elementwise = found
        c = static_shape(pooled, "the pooled map")[1]
        point = self.point

        def source(rw: RuleContext) -> fx.Node:
            src = rw.graph.call_method("mean", (pooled, [2, 3]), {"keepdim": True})
            src = replay(rw.graph, elementwise, src)
            return from_map(rw.graph, src, (c, 1, 1), point)

        before = f"Linear({in_f}->{out_f}) on mean over HxW of {c} channels"
        return ConvPlan(node, op.name, op, in_f, out_f, x_shape, point, (c, 1, 1), before, source)
