"""Reshapes, pads and rolls of values carried in the token layout (``token_layout=True``): grouped-query attention's
``repeat_kv``, timm's interleaved rotary embedding, and timm's Swin (window partition and reverse, cyclic shift,
padding, patch merging) run on the carried values.

A reshape splits and merges runs of adjacent dims (:func:`groups`). On a value carried as a permutation of the
original (per head, NCHW; tokens ``(B, C, 1, S)`` read as ``(B, C, S)``) whose groups are adjacent and in order in
the carried value too, the reshape is a reshape of the carried value (no copy), carried as the groups lie there.
Where they are not, and the result is a channels-last map ``(N, H, W, C)`` or tokens ``(B, S, C)``, the carried
value is permuted once so that they are, and the result is carried as NCHW or as tokens: the one move the original
makes there too (the permute of a window partition), in place of converting back and entering again.

* :class:`Regroup`: ``view`` / ``reshape`` (sizes, or another value's ``.shape``), ``flatten``.
* :class:`Pad`: ``F.pad`` (constant) pads the carried dims its pairs name.
* :class:`Roll`: ``torch.roll(x, shifts, dims)`` rolls the carried dims.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxsurgery import _runtime
from fxsurgery.capture.shapes import shape_of
from fxsurgery.engine.nodes import is_shape_read
from fxsurgery.engine.rule import RuleContext
from fxsurgery.rules.linear_to_conv.heads import _reshape_input, heads_layout
from fxsurgery.rules.linear_to_conv.layouts import TOKEN_LAYOUT

__all__ = ["Regroup", "Pad", "Roll", "MOVES", "carry", "groups", "permutation", "permuted"]

aten = torch.ops.aten

#: The layout a moved result takes, by its rank: a channels-last map as NCHW, tokens as ``(B, C, S)``.
_TARGETS = {4: (0, 3, 1, 2), 3: (0, 2, 1)}
_TOKENS = (0, 2, 1)


def permutation(node: object, rw: RuleContext) -> tuple[int, ...] | None:
    """The permutation of the original that the value carried for ``node`` holds (``alt = x.permute(perm)``): per
    head, NCHW; tokens ``(B, C, 1, S)`` read as ``(B, C, S)``; None for any other layout. Nothing is built."""
    carried = rw.carried(node)
    if carried is None or len(shape_of(node) or ()) < 2:
        return None
    layout = carried[1]
    if layout is TOKEN_LAYOUT:
        return _TOKENS
    return layout.to_alt if layout.to_alt is not None and layout is heads_layout(layout.to_alt) else None


def permuted(node: fx.Node, rw: RuleContext) -> fx.Node:
    """The value carried for ``node`` as :func:`permutation` reads it (tokens with their unit dim squeezed): called
    once the op is carried."""
    alt, layout = rw.alt[node]
    if layout is not TOKEN_LAYOUT:
        return alt
    with rw.graph.inserting_after(alt):
        return rw.graph.call_method("squeeze", (alt, 2))


def carry(node: fx.Node, alt: fx.Node, perm: tuple[int, ...], rw: RuleContext) -> bool:
    """Carries ``node`` as ``alt = node.permute(perm)`` (3-D tokens as ``(B, C, 1, S)``); False when ``perm`` is the
    original layout itself (converting back is what the rewriter does anyway)."""
    if perm == tuple(range(len(perm))):
        return False
    if perm == _TOKENS:
        with rw.graph.inserting_after(alt):
            rw.set_alt(node, rw.graph.call_method("unsqueeze", (alt, 2)), TOKEN_LAYOUT)
        return True
    rw.set_alt(node, alt, heads_layout(perm))
    return True


def groups(before: tuple[int, ...], after: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """How a reshape from ``before`` to ``after`` splits and merges dims: ``(dims before, dims after)`` with equal
    products, in order; None when the sizes do not pair up (or a dim is empty)."""
    if 0 in before or 0 in after:
        return None
    found: list[tuple[list[int], list[int]]] = []
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
        found.append((gi, gj))
    if not found:
        return None
    found[-1][0].extend(range(i, len(before)))  # trailing unit dims
    found[-1][1].extend(range(j, len(after)))
    return found


def _in_place(found: list[tuple[list[int], list[int]]], perm: tuple[int, ...]) -> tuple[int, ...] | None:
    """The permutation the result is carried in when every group is adjacent and in order in the carried value."""
    order = []
    for gi, gj in found:
        at = [perm.index(d) for d in gi]
        if at != list(range(at[0], at[0] + len(at))):
            return None
        order.append((at[0], gj))
    return tuple(d for _, gj in sorted(order) for d in gj)


def _moved(found: list[tuple[list[int], list[int]]], perm: tuple[int, ...], rank: int) -> tuple[int, ...] | None:
    """The permutation of the carried value that puts every group adjacent and in order, such that the result is
    carried as :data:`_TARGETS` says for its rank; None when there is none (or no target for that rank)."""
    target = _TARGETS.get(rank)
    if target is None:
        return None
    of = {d: (gi, gj) for gi, gj in found for d in gj}
    order: list[int] = []
    at = 0
    while at < len(target):
        gi, gj = of[target[at]]
        if list(target[at : at + len(gj)]) != gj:
            return None  # the group's dims are not together in the target
        order += [perm.index(d) for d in gi]
        at += len(gj)
    return tuple(order)


def _reshape(node: fx.Node) -> tuple[fx.Node, Any] | None:
    """``(x, sizes)`` of ``x.view(...)`` / ``x.reshape(...)`` / ``torch.reshape`` / ``aten.view`` (sizes as given:
    a list, the values, or a shape), or ``(x, None)`` of ``x.flatten(start, end)`` (its sizes:
    :func:`_flatten_sizes`)."""
    if node.kwargs:
        return None
    x = _reshape_input(node)
    if x is not None:
        rest = node.args[1:]
        return x, rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple, fx.Node)) else rest
    first = node.args[0] if node.target in ("flatten", torch.flatten) and node.args else None
    if isinstance(first, fx.Node) and all(isinstance(d, int) for d in node.args[1:]):
        return first, None
    return None


class Regroup:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        found = _reshape(node)
        perm = permutation(found[0], rw) if found is not None else None
        before, after = shape_of(found[0]) if found else None, shape_of(node)
        split = groups(before, after) if before is not None and after is not None else None
        if found is None or perm is None or split is None or after is None:
            return False
        x, sizes = found
        shape = isinstance(sizes, fx.Node) and (is_shape_read(sizes) or sizes.target is _runtime.original_shape)
        if not shape and sizes is not None and (not isinstance(sizes, (list, tuple)) or len(sizes) != len(after)):
            return False
        new, order = _in_place(split, perm), None
        if new is None:
            order = _moved(split, perm, len(after))
            if order is None:
                return False
            new = _TARGETS[len(after)]
        alt = permuted(x, rw)
        with rw.graph.inserting_before(node):
            if shape:  # ``y.reshape(x.shape)``: its sizes one by one
                sizes = [rw.graph.call_function(operator.getitem, (sizes, i)) for i in range(len(after))]
            elif sizes is None:  # ``flatten``: the sizes of the result, read from the carried value as it goes
                sizes = _flatten_sizes(node, alt, perm, rw)
            if order is not None:
                alt = rw.graph.call_method("permute", (alt, order))
            alt = rw.graph.call_method("reshape", (alt, [sizes[d] for d in new]))
        return carry(node, alt, new, rw)


def _flatten_sizes(node: fx.Node, alt: fx.Node, perm: tuple[int, ...], rw: RuleContext) -> list[Any]:
    """The sizes of ``x.flatten(start, end)`` (constant dims: :func:`_reshape`), read from the carried value (the
    merged dim as -1), built where the graph is being built."""
    rank = len(perm)
    start: Any = node.args[1] if len(node.args) > 1 else 0
    end: Any = node.args[2] if len(node.args) > 2 else -1
    start, end = start % rank, end % rank
    shape = rw.graph.call_function(_runtime.original_shape, (alt, perm))
    kept = [rw.graph.call_function(operator.getitem, (shape, d)) for d in range(rank)]
    return kept[:start] + [-1] + kept[end + 1 :]


_PADS = (F.pad, torch.constant_pad_nd, aten.pad.default, aten.constant_pad_nd.default)
_ROLLS = (torch.roll, aten.roll.default)


#: What :class:`Regroup`, :class:`Pad` and :class:`Roll` carry, and a permute: a region may start before them.
MOVES = frozenset(
    {"view", "reshape", "permute", "contiguous", "flatten", "roll", torch.reshape, torch.permute, torch.flatten}
    | {aten.view.default, aten.reshape.default, aten.permute.default, *_PADS, *_ROLLS}
)


class Pad:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if not (node.op == "call_function" and node.target in _PADS):
            return False
        args = dict(zip(("input", "pad", "mode", "value"), node.args), **node.kwargs)
        perm = permutation(node.args[0] if len(node.args) > 1 else None, rw)  # (aten's first is ``self``)
        pad = node.args[1] if perm is not None else None
        if perm is None or args.get("mode", "constant") != "constant" or not isinstance(pad, (list, tuple)):
            return False
        if len(pad) % 2:  # (a malformed pad: left for torch to reject)
            return False
        alt, rank = permuted(node.args[0], rw), len(perm)  # type: ignore[arg-type]
        pairs = {rank - 1 - i: tuple(pad[2 * i : 2 * i + 2]) for i in range(len(pad) // 2)}  # by original dim
        new = [p for at in reversed(range(rank)) for p in pairs.get(perm[at], (0, 0))]
        with rw.graph.inserting_before(node):
            out = rw.graph.call_function(node.target, (alt, new, *node.args[2:]), dict(node.kwargs))
        return carry(node, out, perm, rw)


class Roll:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if not (
            node.op == "call_function" and node.target in _ROLLS or node.op == "call_method" and node.target == "roll"
        ):
            return False
        args = dict(zip(("input", "shifts", "dims"), node.args), **node.kwargs)
        x, dims = args.get("input"), args.get("dims")  # type: Any, Any
        perm = permutation(x, rw)
        if perm is None or set(args) != {"input", "shifts", "dims"} or not isinstance(dims, (list, tuple, int)):
            return False
        dims = [dims] if isinstance(dims, int) else dims
        if not all(isinstance(d, int) for d in dims):
            return False
        alt = permuted(x, rw)
        with rw.graph.inserting_before(node):
            out = rw.graph.call_function(torch.roll, (alt, args["shifts"], [perm.index(d % len(perm)) for d in dims]))
        return carry(node, out, perm, rw)
