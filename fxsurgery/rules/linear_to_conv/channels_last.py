"""``channels-last-linear``: a Linear on ``z.permute(0, 2, 3, 1)`` (a ConvNeXt block: permute, LayerNorm, Linears)
is a 1x1 conv on ``z`` in NCHW with kernel ``W.view(O, C, 1, 1)``; the LayerNorm between becomes a LayerNorm over
dim 1 (:class:`~fxsurgery.rules.linear_to_conv.layer_norm.LayerNormChannels`), and the closing
``permute(0, 3, 1, 2)`` cancels. With ``token_layout=True`` a channels-last ``(N, H, W, C)`` map that no permute
feeds (Swin, MaxViT) is carried as NCHW from here.
"""

from __future__ import annotations

import torch.fx as fx

from fxsurgery.capture.shapes import shape_of
from fxsurgery.engine.layout import permute_dims
from fxsurgery.engine.rule import RuleContext, Skip
from fxsurgery.rules.linear_to_conv._plan import (
    ConvPlan,
    LinearRule,
    carried_plan,
    linear_input,
    linear_name,
    region_plan,
)
from fxsurgery.rules.linear_to_conv.flatten_head import FlattenHead
from fxsurgery.rules.linear_to_conv.layouts import NCHW_LAYOUT

__all__ = ["ChannelsLastLinear", "PATTERN"]

PATTERN = "channels-last-linear"


class ChannelsLastLinear(LinearRule):
    """A Linear on an NCHW map permuted to channels-last, or (token layout) on a channels-last map."""

    pattern = PATTERN
    timing = "block"

    def __init__(self, token_layout: bool = False) -> None:
        super().__init__()
        self.token_layout = token_layout

    def claims(self, node: fx.Node, rw: RuleContext) -> str | None:
        x = linear_input(node, rw)
        if permute_dims(x) == (0, 2, 3, 1):
            return linear_name(node)
        if self.token_layout and rw.carried(x) is None and len(shape_of(x) or ()) == 4:
            return linear_name(node)
        return None

    def match(self, node: fx.Node, rw: RuleContext) -> ConvPlan | Skip:
        name = linear_name(node)
        if rw.carried(linear_input(node, rw)) is not None:
            return carried_plan(node, rw, name, on="on NCHW permuted to channels-last")
        if self.token_layout:
            return region_plan(node, rw, name, NCHW_LAYOUT, "a channels-last (N, H, W, C) map")
        return FlattenHead().match(node, rw)  # a permute left uncarried: the head rule says why it is skipped
