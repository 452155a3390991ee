"""timm's attention in the token layout: q, k and v split from one fused projection by a 5-D reshape, a permute and
an ``unbind`` (``qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)``), carried per head.

The reshape is :class:`~fxsurgery.rules.linear_to_conv.heads.HeadSplit`'s (``(B, 3, H, D, N)``, a view of the
carried tokens), the permute :class:`~fxsurgery.rules.linear_to_conv.heads.HeadPermute`'s; here
:class:`HeadUnbind`: item ``i`` of ``unbind(d)`` of a value carried per head is a ``select`` of its counterpart,
carried per head with one dim less: q, k and v as ``(B, H, D, N)``, which the attention reads as it is.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxsurgery.engine.rule import RuleContext
from fxsurgery.rules.linear_to_conv.heads import _is_heads, heads_layout

__all__ = ["HeadUnbind"]


def _unbind(node: object) -> tuple[fx.Node, int] | None:
    """``(x, dim)`` of ``x.unbind(dim)`` / ``torch.unbind(x, dim)``."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if not (node.op == "call_method" and node.target == "unbind") and node.target not in (
        torch.unbind,
        torch.ops.aten.unbind.int,
    ):
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return (node.args[0], dim) if isinstance(dim, int) else None


class HeadUnbind:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int)):
            return False
        found = _unbind(node.args[0])
        carried = rw.carried(found[0]) if found else None
        if found is None or carried is None or not _is_heads(carried[1]):
            return False
        to_alt = carried[1].to_alt
        assert to_alt is not None
        dim = found[1] % len(to_alt)
        at = to_alt.index(dim)  # where the unbound dim is in the carried value
        rest = tuple(d - (d > dim) for d in to_alt if d != dim)
        with rw.graph.inserting_before(node):
            alt = rw.graph.call_function(torch.select, (carried[0], at, node.args[1]))
        rw.set_alt(node, alt, heads_layout(rest))
        return True
