"""``conv->linear`` on an exported graph: ``convolution(x, W, b)`` with a 1x1 kernel, stride 1, no padding, one group,
on ``x`` ``(N, C, H, W)`` is ``addmm(b, permute(x).view(N*H*W, C), permute(W.view(O, C), [1, 0]))`` viewed as
``(N, H, W, O)`` and permuted back."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from fxsurgery.engine.emit import DialectEmitter, op_name, val_shape
from fxsurgery.engine.rule import RuleContext, Skip
from fxsurgery.report import Site
from fxsurgery.rules.aten._common import STEP, OpMatch, site_name

__all__ = ["ConvToLinear", "PATTERN"]

PATTERN = "conv->linear"


def conv_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, Any, tuple[Any, ...]] | None:
    """``(x, W, b, (stride, padding, dilation, transposed, output_padding, groups))`` of a convolution."""
    if op_name(node.target) not in ("aten::convolution", "aten::conv2d"):
        return None
    args = list(node.args) + [None] * 9
    x, w, b = args[:3]
    if not isinstance(x, fx.Node) or not isinstance(w, fx.Node):
        return None
    step: tuple[Any, ...] = tuple(args[3:9])
    if op_name(node.target) == "aten::conv2d":
        step = (args[3] or [1, 1], args[4] or [0, 0], args[5] or [1, 1], False, [0, 0], args[6] or 1)
    return x, w, b, step


def pointwise_match(node: fx.Node) -> OpMatch | Skip:
    """The operands of a plain pointwise convolution ``node`` with shapes ``(O, C, H, W)``, or why it is not one."""
    parts = conv_parts(node)
    assert parts is not None
    x, w, b, step = parts
    x_shape, w_shape = val_shape(x), val_shape(w)
    if x_shape is None or w_shape is None or len(x_shape) != 4 or len(w_shape) != 4:
        return Skip("not a 2-D convolution on an (N, C, H, W) map")
    if tuple(w_shape[2:]) != (1, 1):
        return Skip(f"kernel {w_shape[2]}x{w_shape[3]} is not pointwise")
    if not _plain(step):
        return Skip("stride, padding, dilation, groups or a transposed conv: not a plain pointwise conv")
    if any(not isinstance(d, int) for d in x_shape[1:]):
        return Skip("symbolic channels or spatial size")
    return OpMatch(node, site_name(node), x, w, b, (w_shape[0], w_shape[1], x_shape[2], x_shape[3]))


def _plain(step: tuple[Any, ...]) -> bool:
    as_lists = [list(s) if isinstance(s, (list, tuple)) else s for s in step]
    return as_lists == [list(s) if isinstance(s, (list, tuple)) else s for s in STEP]


class ConvToLinear:
    """Pointwise Conv2d -> Linear (``addmm`` on channels-last rows) on an exported graph."""

    pattern = PATTERN

    def claims(self, node: fx.Node, rw: RuleContext) -> str | None:
        return site_name(node) if conv_parts(node) is not None else None

    def match(self, node: fx.Node, rw: RuleContext) -> OpMatch | Skip:
        parts = conv_parts(node)
        assert parts is not None
        if parts[1].op not in ("placeholder", "get_attr"):
            return Skip("the weight is computed in the graph, not a parameter")
        return pointwise_match(node)

    def apply(self, m: OpMatch, rw: RuleContext) -> Site:
        emit = DialectEmitter(rw.graph, m.node)
        o, c, h, wd = m.shapes
        rows = emit.op("view_copy", emit.op("permute_copy", m.x, [0, 2, 3, 1]), [-1, c])
        wt = emit.op("permute_copy", emit.op("view_copy", m.w, [o, c]), [1, 0])
        y = emit.op("addmm", m.b, rows, wt) if m.b is not None else emit.op("mm", rows, wt)
        y = emit.op("permute_copy", emit.op("view_copy", y, [-1, h, wd, o]), [0, 3, 1, 2])
        m.node.replace_all_uses_with(y)
        return Site(m.name, PATTERN, "rewritten")
