"""``token-linear`` (``token_layout=True``): a Linear on tokens ``(B, S, C)`` is a 1x1 conv on ``(B, C, 1, S)`` with
kernel ``W.view(O, C, 1, 1)``. The tokens enter the layout once, at the LayerNorm that starts a block
(:class:`~fxsurgery.rules.linear_to_conv.layer_norm.LayerNormChannels`), or here when no LayerNorm precedes."""

from __future__ import annotations

import torch.fx as fx

from fxsurgery.capture.shapes import shape_of
from fxsurgery.engine.rule import RuleContext
from fxsurgery.rules.linear_to_conv._plan import (
    ConvPlan,
    LinearRule,
    carried_plan,
    linear_input,
    linear_name,
    region_plan,
)
from fxsurgery.rules.linear_to_conv.layouts import TOKEN_LAYOUT, tokens_of_rows

__all__ = ["TokenLinear", "PATTERN"]

PATTERN = "token-linear"


class TokenLinear(LinearRule):
    """A Linear on tokens carried as ``(B, C, 1, S)``, or (token layout) on ``(B, S, C)`` tokens not yet carried."""

    pattern = PATTERN
    timing = "block"

    def __init__(self, token_layout: bool = False) -> None:
        super().__init__()
        self.token_layout = token_layout

    def claims(self, node: fx.Node, rw: RuleContext) -> str | None:
        x = linear_input(node, rw)
        carried = rw.carried(x)
        if carried is not None:
            return linear_name(node) if carried[1] is TOKEN_LAYOUT or tokens_of_rows(carried[1]) else None
        return linear_name(node) if self.token_layout and len(shape_of(x) or ()) == 3 else None

    def match(self, node: fx.Node, rw: RuleContext) -> ConvPlan:
        name = linear_name(node)
        if rw.carried(linear_input(node, rw)) is not None:
            return carried_plan(node, rw, name)
        return region_plan(node, rw, name, TOKEN_LAYOUT, "(B, S, C) tokens")
