"""``conv1x1-strided``: a 1x1 ``Conv2d`` with stride ``s`` (a ResNet downsample) reads only every ``s``-th pixel:
``x[:, :, ::s, ::s]``, then a ``Linear(C -> O)`` with weight ``K.view(O, C)`` as for ``conv1x1``. (Checking the
kernel size alone would be wrong here.)"""

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

__all__ = ["StridedPointwise", "PATTERN"]

PATTERN = "conv1x1-strided"


class StridedPointwise:
    pattern = PATTERN

    def claims(self, node: fx.Node, rw: Rewriter) -> str | None:
        op = candidate(node, rw)
        if op is None or not isinstance(op.module, nn.Conv2d) or not op.pointwise:
            return None
        return op.name if any(s != 1 for s in op.module.stride) else None

    def match(self, node: fx.Node, rw: Rewriter) -> ConvMatch:
        m = check_conv(node, rw, str(node.target))
        check_pointwise_padding(m)
        return m

    def apply(self, m: ConvMatch, rw: Rewriter) -> Site:
        return pointwise_to_linear(m, rw, PATTERN)
