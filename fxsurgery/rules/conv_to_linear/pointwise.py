"""``conv1x1``: ``Conv2d(C, O, 1)`` with stride 1, padding 0 and groups 1 (dilation is irrelevant for a 1x1 kernel)
is a ``Linear(C -> O)`` with weight ``K.view(O, C)`` applied at every pixel, on the map carried channels-last
``(N, H, W, C)``, or on ``(N, C)`` when the map is 1x1 (flatten, Linear, view back)."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from fxsurgery.engine.rewriter import Rewriter
from fxsurgery.report import Site
from fxsurgery.rules.conv_to_linear._convert import (
    ConvMatch,
    candidate,
    check_conv,
    check_pointwise_padding,
    pointwise_to_linear,
)

__all__ = ["Pointwise", "PATTERN"]

PATTERN = "conv1x1"


class Pointwise:
    pattern = PATTERN

    def claims(self, node: fx.Node, rw: Rewriter) -> str | None:
        op = candidate(node, rw)
        if op is None or not isinstance(op.module, nn.Conv2d) or not op.pointwise:
            return None
        return op.name if all(s == 1 for s in op.module.stride) else None

    def match(self, node: fx.Node, rw: Rewriter) -> ConvMatch:
        m = check_conv(node, rw, str(node.target))
        check_pointwise_padding(m)
        return m

    def apply(self, m: ConvMatch, rw: Rewriter) -> Site:
        return pointwise_to_linear(m, rw, PATTERN)
