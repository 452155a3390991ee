"""``chain-linear``: once a value is carried as ``(N, O, 1, 1)`` (or ``(1, O, 1, N)``, or NCHW), a following Linear
is a 1x1 conv on it with kernel ``W.view(O, K, 1, 1)``; elementwise ops between sites run on the carried value
unchanged, and one conversion at the end restores ``(N, O)``."""

from __future__ import annotations

import torch.fx as fx

from fxsurgery.engine.rule import RuleContext
from fxsurgery.rules.linear_to_conv._plan import ConvPlan, LinearRule, carried_plan, linear_input, linear_name

__all__ = ["ChainLinear", "PATTERN"]

PATTERN = "chain-linear"


class ChainLinear(LinearRule):
    """A Linear on a value already carried in a layout (after a rewritten site)."""

    pattern = PATTERN
    timing = "block"

    def claims(self, node: fx.Node, rw: RuleContext) -> str | None:
        return linear_name(node) if rw.carried(linear_input(node, rw)) is not None else None

    def match(self, node: fx.Node, rw: RuleContext) -> ConvPlan:
        return carried_plan(node, rw, linear_name(node))
