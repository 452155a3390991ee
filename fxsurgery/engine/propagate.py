"""Propagators every rule set can use: elementwise ops run in whatever layout their inputs share, and ``x.dim()`` of
a carried value is a constant."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx as fx

from fxsurgery.capture.shapes import shape_of
from fxsurgery.engine import provenance
from fxsurgery.engine.elementwise import elementwise_tensor_inputs

if TYPE_CHECKING:
    from fxsurgery.engine.rule import RuleContext

__all__ = ["Elementwise", "StaticRank"]


class Elementwise:
    """An elementwise op whose tensor inputs are all carried in one layout runs on them unchanged (one input may
    be converted into the layout: a residual add)."""

    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        inputs = elementwise_tensor_inputs(node, rw.modules)
        if not inputs:
            return False
        layouts = {rw.alt[i][1].name for i in inputs if i in rw.alt}
        if len(layouts) != 1:
            return False
        layout = next(rw.alt[i][1] for i in inputs if i in rw.alt)
        mapped = {i: rw.enter(i, layout, node.name) for i in inputs}
        with rw.graph.inserting_before(node):
            new = rw.graph.node_copy(node, lambda a: mapped.get(a, a))
        new.meta = provenance.of(node)
        rw.set_alt(node, new, layout)
        return True


class StaticRank:
    """``x.dim()`` of a carried value is the constant rank of its original layout, so that a rank check (ViT's
    ``torch._assert(input.dim() == 3)``) does not need the value converted back."""

    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if not (node.op == "call_method" and node.target == "dim" and len(node.args) == 1 and node.args[0] in rw.alt):
            return False
        shape = shape_of(node.args[0])
        if shape is None:
            return False
        rank = len(shape)
        for user in list(node.users):
            user.args = fx.map_arg(user.args, lambda a: rank if a is node else a)
            user.kwargs = fx.map_arg(user.kwargs, lambda a: rank if a is node else a)
        rw.graph.erase_node(node)
        return True
