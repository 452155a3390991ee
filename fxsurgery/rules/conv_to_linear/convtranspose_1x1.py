"""``convtranspose1x1``: ``ConvTranspose2d(C, O, 1)`` with stride 1 and padding 0 computes
``y[n, o, h, w] = b[o] + sum_c K[c, o] x[n, c, h, w]`` (its kernel is stored in-by-out, ``(C, O, 1, 1)``): a
``Linear(C -> O)`` with weight ``K.view(C, O).t()``, a transposed view, applied at every pixel as for ``conv1x1``.
Strided transposed convs insert zeros between pixels and are skipped."""

from __future__ import annotations

import torch.fx as fx

from fxsurgery.engine.rule import RuleContext, Skip
from fxsurgery.report import Site
from fxsurgery.rules.conv_to_linear._convert import (
    ConvMatch,
    candidate,
    check_conv,
    check_pointwise_padding,
    pointwise_to_linear,
)

__all__ = ["ConvTranspose1x1", "PATTERN"]

PATTERN = "convtranspose1x1"


class ConvTranspose1x1:
    pattern = PATTERN

    def claims(self, node: fx.Node, rw: RuleContext) -> str | None:
        op = candidate(node, rw)
        return op.name if op is not None and op.transposed else None

    def match(self, node: fx.Node, rw: RuleContext) -> ConvMatch | Skip:
        m = check_conv(node, rw, str(node.target))
        mod = m.module
        if not m.op.pointwise:
            return Skip(f"kernel {'x'.join(map(str, mod.kernel_size))} on a transposed conv")
        check_pointwise_padding(m)
        if any(s != 1 for s in mod.stride):
            return Skip(f"stride {tuple(mod.stride)} (a transposed conv inserts zeros between pixels)")
        if any(mod.output_padding):
            return Skip(f"output_padding={tuple(mod.output_padding)}")
        return m

    def apply(self, m: ConvMatch, rw: RuleContext) -> Site:
        return pointwise_to_linear(m, rw, PATTERN)
