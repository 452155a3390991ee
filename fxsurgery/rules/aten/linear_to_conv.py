"""``linear->conv`` on an exported graph: ``linear(x, W, b)`` (or its decomposition ``addmm(b, x, permute(W, [1, 0]))``)
on ``x = view(m, (N, C*H*W))`` of a map ``m`` ``(N, C, H, W)`` is ``convolution(m, W.view(O, C, H, W), b)`` viewed as
``(N, O)``; on any other 2-D ``x`` ``(N, C)`` it is a 1x1 convolution of ``x.view(N, C, 1, 1)``."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from fxsurgery.engine.emit import DialectEmitter, op_name, val_shape
from fxsurgery.engine.rule import RuleContext, Skip
from fxsurgery.report import Site
from fxsurgery.rules.aten._common import STEP, OpMatch, site_name

__all__ = ["LinearToConv", "PATTERN", "VIEWS", "flattened_map", "linear_parts"]

PATTERN = "linear->conv"
VIEWS = ("aten::view", "aten::view_copy", "aten::reshape", "aten::flatten", "aten::_unsafe_view")


def linear_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, Any] | None:
    """``(x, W, b)`` of ``linear(x, W, b)``, ``addmm(b, x, permute(W, [1, 0]))`` or ``mm(x, permute(W, [1, 0]))``."""
    name = op_name(node.target)
    if name == "aten::linear":
        x, w, b = (list(node.args) + [None])[:3]
        return (x, w, b) if isinstance(x, fx.Node) and isinstance(w, fx.Node) else None
    if name in ("aten::addmm", "aten::mm") and not node.kwargs:
        b, x, wt = (None, *node.args) if name == "aten::mm" else node.args
        if not isinstance(wt, fx.Node) or not isinstance(x, fx.Node) or not isinstance(wt.args[0], fx.Node):
            return None
        transposed = op_name(wt.target) == "aten::t" or (
            op_name(wt.target) in ("aten::permute", "aten::permute_copy") and list(wt.args[1]) == [1, 0]  # type: ignore[arg-type]
        )
        if transposed:
            return x, wt.args[0], b
    return None


def flattened_map(x: fx.Node) -> fx.Node | None:
    """``m`` when ``x`` is ``m`` ``(N, C, H, W)`` viewed as ``(N, C*H*W)``."""
    if op_name(x.target) not in VIEWS:
        return None
    m, shape, out = x.args[0], val_shape(x.args[0]), val_shape(x)
    if not isinstance(m, fx.Node) or shape is None or out is None or len(shape) != 4 or len(out) != 2:
        return None
    return m if out[0] == shape[0] and out[1] == shape[1] * shape[2] * shape[3] else None


class LinearToConv:
    """Linear -> Conv2d on an exported graph: HxW for a flattened map, 1x1 otherwise."""

    pattern = PATTERN

    def claims(self, node: fx.Node, rw: RuleContext) -> str | None:
        return site_name(node) if linear_parts(node) is not None else None

    def match(self, node: fx.Node, rw: RuleContext) -> OpMatch | Skip:
        parts = linear_parts(node)
        assert parts is not None
        x, w, b = parts
        x_shape, w_shape = val_shape(x), val_shape(w)
        if w.op not in ("placeholder", "get_attr"):
            return Skip("the weight is computed in the graph, not a parameter")
        if x_shape is None or w_shape is None or len(x_shape) != 2 or len(w_shape) != 2:
            return Skip(f"input is {len(x_shape or ())}-D; only (N, C) inputs are rewritten by this pass")
        if any(not isinstance(d, int) for d in x_shape[1:] + w_shape):
            return Skip("symbolic channel count")
        m = flattened_map(x)
        kernel = [w_shape[0], *(val_shape(m) or ())[1:]] if m is not None else [w_shape[0], w_shape[1], 1, 1]
        return OpMatch(node, site_name(node), m if m is not None else x, w, b, (tuple(kernel), m is not None))

    def apply(self, m: OpMatch, rw: RuleContext) -> Site:
        emit = DialectEmitter(rw.graph, m.node)
        kernel, flattened = m.shapes
        src = m.x if flattened else emit.op("view_copy", m.x, [-1, kernel[1], 1, 1])
        y = emit.op("convolution", src, emit.op("view_copy", m.w, list(kernel)), m.b, *STEP)
        m.node.replace_all_uses_with(emit.op("view_copy", y, [-1, kernel[0]]))
        return Site(m.name, PATTERN, "rewritten")
