"""Grouped-query attention's ``repeat_kv`` in the token layout
(``k[:, :, None].expand(B, KV, n, S, D).reshape(B, H, S, D)``) on keys and values carried per head: the new dim goes
beside the kv-head dim, so the reshape (:class:`~.regroup.Regroup`) merges dims that are adjacent in the carried value
too (no copy of a transposed tensor). :class:`HeadUnsqueeze`, :class:`HeadExpand`; :class:`HeadStack` the same for a
stack (timm's interleaved rotary embedding, ``torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)``: the
pairs go beside head_dim, and the reshape merges them back into it)."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from fxsurgery.engine.rule import RuleContext
from fxsurgery.rules.linear_to_conv.decoder import carried_with_dims
from fxsurgery.rules.linear_to_conv.heads import heads_layout
from fxsurgery.rules.linear_to_conv.regroup import carry

__all__ = ["HeadUnsqueeze", "HeadExpand", "HeadStack"]

aten = torch.ops.aten


def _per_head(node: object, rw: RuleContext) -> tuple[fx.Node, tuple[int, ...]] | None:
    """``(alt, permutation)`` of a value carried per head (a permutation layout)."""
    carried = carried_with_dims(node, rw)
    if carried is None or carried[1].to_alt is None or carried[1] is not heads_layout(carried[1].to_alt):
        return None
    return carried[0], carried[1].to_alt


def _unsqueezed_dim(node: fx.Node) -> Any:
    """``d`` of ``x.unsqueeze(d)``, or of ``x[:, :, None]`` (full slices and one None)."""
    if node.op == "call_method" and node.target == "unsqueeze" and len(node.args) == 2 and not node.kwargs:
        return node.args[1]
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
        index = node.args[1]
        full = [i is None or isinstance(i, slice) and (i.start, i.stop, i.step) == (None, None, None) for i in index]
        if all(full) and sum(i is None for i in index) == 1:
            return index.index(None)
    return None


class HeadUnsqueeze:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        d = _unsqueezed_dim(node)
        carried = _per_head(node.args[0], rw) if d is not None else None
        if carried is None or not isinstance(d, int):
            return False
        alt, perm = carried
        at, new_perm = _new_dim(perm, d)
        with rw.graph.inserting_before(node):
            new = rw.graph.call_method("unsqueeze", (alt, at))
        return carry(node, new, new_perm, rw)


def _new_dim(perm: tuple[int, ...], d: int) -> tuple[int, tuple[int, ...]]:
    """Where a dim inserted at ``d`` of the original goes in a value carried as ``perm`` (beside the dim it follows
    in the original), and the permutation with it."""
    d %= len(perm) + 1
    at = perm.index(d - 1) + 1 if d else 0
    shifted = [p + (p >= d) for p in perm]
    return at, tuple(shifted[:at] + [d] + shifted[at:])


class HeadStack:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if not (node.op == "call_function" and node.target in (torch.stack, aten.stack.default)):
            return False
        parts = node.args[0] if node.args else None
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(parts, (list, tuple)) or not isinstance(d, int) or len(node.args) + len(node.kwargs) > 2:
            return False
        carried = [_per_head(p, rw) for p in parts]
        perms = {c[1] for c in carried if c is not None}
        if not parts or None in carried or len(perms) != 1:
            return False  # every part carried, all alike
        at, new_perm = _new_dim(perms.pop(), d)
        with rw.graph.inserting_before(node):
            new = rw.graph.call_function(torch.stack, ([c[0] for c in carried if c is not None], at))
        return carry(node, new, new_perm, rw)


class HeadExpand:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if not (node.op == "call_method" and node.target == "expand") or node.kwargs:
            return False
        carried = _per_head(node.args[0], rw)
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        if carried is None or len(sizes) != len(carried[1]):
            return False
        alt, perm = carried
        with rw.graph.inserting_before(node):
            new = rw.graph.call_method("expand", (alt, [sizes[p] for p in perm]))
        return carry(node, new, perm, rw)
