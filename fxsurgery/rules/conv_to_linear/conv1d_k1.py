"""``conv1d-k1``: ``Conv1d(C, O, 1)`` is a ``Linear(C -> O)`` with weight ``K.view(O, C)`` over ``(N, L, C)`` (the
sequence carried channels-last); a ``Conv1d`` whose kernel covers its whole input is a Linear on the flattened
input, as for ``conv-full-extent``."""

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
    check_pointwise_padding,
    full_extent_to_linear,
    pointwise_to_linear,
)

__all__ = ["Conv1dK1", "PATTERN"]

PATTERN = "conv1d-k1"


class Conv1dK1:
    pattern = PATTERN

    def claims(self, node: fx.Node, rw: RuleContext) -> str | None:
        op = candidate(node, rw)
        return op.name if op is not None and isinstance(op.module, nn.Conv1d) else None

    def match(self, node: fx.Node, rw: RuleContext) -> ConvMatch:
        m = check_conv(node, rw, str(node.target))
        if m.op.pointwise:
            check_pointwise_padding(m)
        else:
            check_full_extent(m)
        return m

    def apply(self, m: ConvMatch, rw: RuleContext) -> Site:
        if m.op.pointwise:
            return pointwise_to_linear(m, rw, PATTERN)
        return full_extent_to_linear(m, rw, PATTERN)
