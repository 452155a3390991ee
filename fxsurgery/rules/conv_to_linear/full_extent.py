"""``conv-full-extent``: a ``Conv2d`` whose kernel covers its whole input (padding 0, dilation 1; a VGG classifier
turned fully convolutional) is ``Linear(C*H*W -> O)`` on ``flatten(x, 1)`` with weight ``K.view(O, C*H*W)``; the
output is carried as ``(N, O)``. A run-time check keeps it at the traced size (the original conv would accept a
larger map)."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from fxsurgery.engine.rule import RuleContext
from fxsurgery.report import Site
from fxsurgery.rules.conv_to_linear._convert import (
    ConvMatch,
    candidate,
    check_conv,
    check_full_extent,
    full_extent_to_linear,
)

__all__ = ["FullExtent", "PATTERN"]

PATTERN = "conv-full-extent"


class FullExtent:
    pattern = PATTERN

    def claims(self, node: fx.Node, rw: RuleContext) -> str | None:
        op = candidate(node, rw)
        return op.name if op is not None and isinstance(op.module, nn.Conv2d) and not op.pointwise else None

    def match(self, node: fx.Node, rw: RuleContext) -> ConvMatch:
        m = check_conv(node, rw, str(node.target))
        check_full_extent(m)
        return m

    def apply(self, m: ConvMatch, rw: RuleContext) -> Site:
        return full_extent_to_linear(m, rw, PATTERN)
