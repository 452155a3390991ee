"""Grouped-query attention's ``repeat_kv`` in the token layout
(``k[:, :, None].expand(B, KV, n, S, D).reshape(B, H, S, D)``) on keys and values carried per head: the new dim goes
beside the kv-head dim, so the reshape merges dims that are adjacent in the carried value too (no copy of a
transposed tensor). :class:`HeadUnsqueeze`, :class:`HeadExpand`, :class:`HeadReshape`."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from fxsurgery.capture.shapes import shape_of
from fxsurgery.engine.rule import RuleContext
from fxsurgery.rules.linear_to_conv.decoder import carried_with_dims
from fxsurgery.rules.linear_to_conv.heads import heads_layout

__all__ = ["HeadUnsqueeze", "HeadExpand", "HeadReshape"]

aten = torch.ops.aten


def _per_head(node: object, rw: RuleContext) -> tuple[fx.Node, tuple[int, ...]] | None:
    """``(alt, permutation)`` of a value carried per head (a permutation layout)."""
    carried = carried_with_dims(node, rw)
    if carried is None or carried[1].to_alt is None or carried[1] is not heads_layout(carried[1].to_alt):
        return None
    return carried[0], carried[1].to_alt


def _carry(node: fx.Node, alt: fx.Node, perm: tuple[int, ...], rw: RuleContext) -> bool:
    if perm == tuple(range(len(perm))):
        return False  # the original layout itself: converting back is what the rewriter does anyway
    rw.set_alt(node, alt, heads_layout(perm))
    return True


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
        d %= len(perm) + 1
        at = perm.index(d - 1) + 1 if d else 0  # beside the dim it follows in the original
        shifted = [p + (p >= d) for p in perm]
        with rw.graph.inserting_before(node):
            new = rw.graph.call_method("unsqueeze", (alt, at))
        return _carry(node, new, tuple(shifted[:at] + [d] + shifted[at:]), rw)


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
        return _carry(node, new, perm, rw)


def _groups(before: tuple[int, ...], after: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """How a reshape from ``before`` to ``after`` splits and merges dims: ``(dims before, dims after)`` with equal
    products, in order; None when the sizes do not pair up (or a dim is empty)."""
    if 0 in before or 0 in after:
        return None
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(before) and j < len(after):
        gi, gj, pi, pj = [i], [j], before[i], after[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(before):
                gi.append(i)
                pi, i = pi * before[i], i + 1
            elif pj < pi and j < len(after):
                gj.append(j)
                pj, j = pj * after[j], j + 1
            else:
                return None
        groups.append((gi, gj))
    if not groups:
        return None
    groups[-1][0].extend(range(i, len(before)))  # trailing unit dims
    groups[-1][1].extend(range(j, len(after)))
    return groups


class HeadReshape:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if not (node.op == "call_method" and node.target in ("view", "reshape")) or node.kwargs:
            return False
        carried = _per_head(node.args[0], rw)
        before, after = shape_of(node.args[0]), shape_of(node)
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        if carried is None or before is None or after is None or len(sizes) != len(after):
            return False
        groups = _groups(before, after)
        alt, perm = carried
        if groups is None:
            return False
        order = []  # the groups as the carried value holds them: each group's dims adjacent and in order there
        for gi, gj in groups:
            at = [perm.index(d) for d in gi]
            if at != list(range(at[0], at[0] + len(at))):
                return False
            order.append((at[0], gj))
        order.sort()
        new_perm = tuple(d for _, gj in order for d in gj)
        with rw.graph.inserting_before(node):
            new = rw.graph.call_method("reshape", (alt, [sizes[d] for d in new_perm]))
        return _carry(node, new, new_perm, rw)
