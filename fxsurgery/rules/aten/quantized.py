"""The rules for quantized exported graphs (PT2E's ``convert_pt2e``, torchao's ``dequantize_affine``), which keep
every int8 island whole (see :mod:`.qdq`).

* ``qlinear->conv``: ``linear(dq(x), dq(W_int8), b) -> q`` on a flattened map ``(N, C, H, W)`` becomes an HxW
  ``convolution(dq(map), dq(view(W_int8, (O, C, H, W))), b) -> q``; on any other ``x`` ``(..., C)`` (a head's
  ``(N, C)``, a transformer's ``(N, S, C)``) a 1x1 convolution of its rows ``x.view(-1, C, 1, 1)``, so no permute is
  added. The output, once quantized, is viewed back to ``(..., O)`` as int8. The int8 constant is reshaped and
  dequantized after the reshape (per-channel axis 0 and per-block sizes carried over), and every view sits on the
  int8 side of a quantize or before a dequantize.
  Quantize and dequantize per tensor act element by element, so moving a view across them changes no value.
* ``qconv->linear``: ``convolution(dq(x), dq(W_int8), b) -> q`` pointwise becomes ``linear`` on channels-last rows,
  the permutes on the int8 side.

The weight is never copied or rewritten, so tied weights need no special case.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from fxsurgery.engine.emit import DialectEmitter, op_name, val_shape
from fxsurgery.engine.rule import RuleContext, Skip
from fxsurgery.report import Site
from fxsurgery.rules.aten._common import STEP, OpMatch, site_name
from fxsurgery.rules.aten.conv_to_linear import conv_parts, pointwise_match
from fxsurgery.rules.aten.linear_to_conv import VIEWS, flattened_map, linear_parts
from fxsurgery.rules.aten.qdq import PER_TENSOR, is_dequantize, island_exit, requantized, weight_dequantize

__all__ = ["QuantizedLinearToConv", "QuantizedConvToLinear", "LINEAR_PATTERN", "CONV_PATTERN"]

LINEAR_PATTERN = "qlinear->conv"
CONV_PATTERN = "qconv->linear"

_NOT_CONSTANT = (
    "quantized weight: its dequantize does not read an int8 constant with per-channel axis 0 (dynamic or "
    "per-input-channel quantization); convert with a static per-channel recipe (PT2E convert_pt2e) to rewrite it"
)


@dataclass(frozen=True)
class QuantizedMatch(OpMatch):
    """An :class:`OpMatch` whose weight is ``dq(W_int)``: the dequantize, the int constant, and the block size the
    reshaped weight is dequantized with (None: per tensor or per channel)."""

    dq: fx.Node
    w_int: fx.Node
    block: list[int] | None


class QuantizedLinearToConv:
    """A quantized Linear -> Conv2d on an exported graph: HxW for a flattened map, 1x1 otherwise."""

    pattern = LINEAR_PATTERN

    def claims(self, node: fx.Node, rw: RuleContext) -> str | None:
        parts = linear_parts(node)
        return site_name(node) if parts is not None and is_dequantize(parts[1]) else None

    def match(self, node: fx.Node, rw: RuleContext) -> QuantizedMatch | Skip:
        parts = linear_parts(node)
        assert parts is not None
        x, w, b = parts
        weight = weight_dequantize(w)
        if weight is None:
            return Skip(_NOT_CONSTANT)
        x_shape, w_shape = val_shape(x), val_shape(w)
        if x_shape is None or w_shape is None or len(x_shape) < 2:
            return Skip(f"quantized Linear on a {len(x_shape or ())}-D input: nothing to lay out as a conv")
        if any(not isinstance(d, int) for d in x_shape[1:] + w_shape):
            return Skip("symbolic size beyond the batch: the rows cannot be viewed back without it")
        flat = _flattened(x) if len(x_shape) == 2 else None
        m = flat[0] if flat is not None else x
        kernel = [w_shape[0], *(val_shape(m) or ())[1:]] if flat is not None else [w_shape[0], w_shape[1], 1, 1]
        block = _block(weight[0], kernel)
        out = [-1, *x_shape[1:-1], w_shape[0]]  # the Linear's output shape, the batch free
        return QuantizedMatch(node, site_name(node), x, w, b, (tuple(kernel), flat, out), weight[0], weight[1], block)

    def apply(self, m: QuantizedMatch, rw: RuleContext) -> Site:
        emit = DialectEmitter(rw.graph, m.node)
        kernel, flat, out = m.shapes
        if flat is not None:  # the map itself, through the same quantize/dequantize when the flatten had one
            src, q, dq = flat
            src = emit.copy(dq, {0: emit.copy(q, {0: src})}) if q is not None else src
        else:
            src = _rows(emit, m.x, kernel[1])
        weight = _weight(emit, m, list(kernel))
        y = emit.op("convolution", src, weight, m.b, *STEP)
        _close_island(emit, m.node, y, lambda v: emit.op("view_copy", v, out))
        return Site(m.name, LINEAR_PATTERN, "rewritten")


class QuantizedConvToLinear:
    """A quantized pointwise Conv2d -> Linear on channels-last rows, on an exported graph."""

    pattern = CONV_PATTERN

    def claims(self, node: fx.Node, rw: RuleContext) -> str | None:
        parts = conv_parts(node)
        return site_name(node) if parts is not None and is_dequantize(parts[1]) else None

    def match(self, node: fx.Node, rw: RuleContext) -> QuantizedMatch | Skip:
        parts = conv_parts(node)
        assert parts is not None
        weight = weight_dequantize(parts[1])
        if weight is None:
            return Skip(_NOT_CONSTANT)
        plain = pointwise_match(node)
        if isinstance(plain, Skip):
            return plain
        o, c = plain.shapes[:2]
        block = _block(weight[0], [o, c])
        return QuantizedMatch(node, plain.name, plain.x, plain.w, plain.b, plain.shapes, weight[0], weight[1], block)

    def apply(self, m: QuantizedMatch, rw: RuleContext) -> Site:
        emit = DialectEmitter(rw.graph, m.node)
        o, c, h, wd = m.shapes
        rows = _int8_side(emit, m.x, lambda v: emit.op("view_copy", emit.op("permute_copy", v, [0, 2, 3, 1]), [-1, c]))
        y = emit.op("linear", rows, _weight(emit, m, [o, c]), m.b)
        back = lambda v: emit.op("permute_copy", emit.op("view_copy", v, [-1, h, wd, o]), [0, 3, 1, 2])
        _close_island(emit, m.node, y, back)
        return Site(m.name, CONV_PATTERN, "rewritten")


def _flattened(x: fx.Node) -> tuple[fx.Node, fx.Node | None, fx.Node | None] | None:
    """``(m, q, dq)``: the map ``m`` ``(N, C, H, W)`` that ``x`` flattens, directly (``q``, ``dq`` None) or through
    a per-tensor quantize/dequantize pair after the flatten."""
    q = requantized(x)
    if q is not None:
        m = flattened_map(q.args[0]) if isinstance(q.args[0], fx.Node) else None
        return (m, q, x) if m is not None else None
    m = flattened_map(x)
    return (m, None, None) if m is not None else None


def _int8_side(emit: DialectEmitter, x: fx.Node, layout: Callable[[fx.Node], fx.Node]) -> fx.Node:
    """``x`` in a new layout: when ``x`` is a per-tensor dequantize, the layout change is made on its int8 input and
    dequantized after (the island ``dq -> op`` stays whole); else on ``x``."""
    if op_name(x.target) == PER_TENSOR[1] and isinstance(x.args[0], fx.Node):
        return emit.copy(x, {0: layout(x.args[0])})
    return layout(x)


def _rows(emit: DialectEmitter, x: fx.Node, channels: int) -> fx.Node:
    """``x`` ``(..., C)`` as rows ``(-1, C, 1, 1)``. A value of 3 or more dims is made contiguous first (its memory
    may be permuted: merged attention heads), on the float side of its quantize where the model reshaped it there
    (the merged heads), else on the int8 side."""
    rank = len(val_shape(x) or ())
    fresh = (lambda v: emit.contiguous(v)) if rank > 2 else (lambda v: v)
    q = requantized(x)
    if q is not None:
        merged = q.args[0]
        if isinstance(merged, fx.Node) and op_name(merged.target) in VIEWS:
            rows = emit.op("view_copy", fresh(merged), [-1, channels, 1, 1])
            return emit.copy(x, {0: emit.copy(q, {0: rows})})
    return _int8_side(emit, x, lambda v: _view(emit, v, [-1, channels, 1, 1], fresh))


def _view(
    emit: DialectEmitter, v: fx.Node, shape: list[int], fresh: Callable[[fx.Node], fx.Node] = lambda v: v
) -> fx.Node:
    """``v`` viewed as ``shape`` (dim 0 free): the value ``v`` was viewed from, where it has that shape already (the
    previous site's output, viewed back), else a new view (of ``fresh(v)``)."""
    src = v.args[0] if op_name(v.target) in VIEWS else None
    src_shape = val_shape(src)
    if src_shape is not None and list(src_shape[1:]) == shape[1:]:
        return src  # type: ignore[return-value]
    return emit.op("view_copy", fresh(v), shape)


def _weight(emit: DialectEmitter, m: QuantizedMatch, shape: list[int]) -> fx.Node:
    """The int constant viewed as ``shape``, dequantized after the view (per-channel axis 0 is unchanged)."""
    replace: dict[int, Any] = {0: emit.op("view_copy", m.w_int, shape)}
    if m.block is not None:
        replace[1] = m.block
    return emit.copy(m.dq, replace)


def _close_island(emit: DialectEmitter, node: fx.Node, y: fx.Node, back: Callable[[fx.Node], fx.Node]) -> None:
    """Replace ``node`` by ``y`` (its value in another layout): where ``node``'s island ends in a quantize (after
    a fused activation), that activation and quantize are applied to ``y`` and the int8 result is laid out ``back``;
    else ``y`` is laid out back in float."""
    end = island_exit(node)
    if end is None:
        node.replace_all_uses_with(back(y))
        return
    ops, q = end
    for op in (*ops, q):
        y = emit.copy(op, {0: y})
    q.replace_all_uses_with(back(y))
    for op in (q, *reversed(ops)):  # the old island's end, which only ``node`` fed (an in-place ReLU is never dead)
        emit.graph.erase_node(op)


def _block(dq: fx.Node, kernel: list[int]) -> list[int] | None:
    """For a per-block dequantize (torchao ``dequantize_affine``) of a weight ``(O, K)`` reshaped to ``kernel``: the
    block size over ``kernel`` whose blocks are the same contiguous runs of elements; None for per tensor/channel.
    Raises :class:`Skip` where no block shape covers the same runs."""
    if op_name(dq.target) != "torchao::dequantize_affine":
        return None
    block = [int(b) for b in dq.args[1]]  # type: ignore[union-attr,arg-type]
    if len(block) >= len(kernel) and all(b == 1 for b in block[len(kernel) :]):  # a 1x1 kernel's to a matrix's
        return block[: len(kernel)]
    rows, run = block[0], block[-1]
    inner = kernel[1:]  # the dims the K axis is reshaped into, outermost first
    for i in range(len(inner)):  # the run covers whole trailing dims and part of one dim
        trailing = math.prod(inner[i + 1 :])
        if run % trailing == 0 and inner[i] % (run // trailing) == 0:
            return [rows, *[1] * i, run // trailing, *inner[i + 1 :]]
    raise Skip(
        f"quantized weight with block size {block}: its blocks of {run} elements are not whole rows of the "
        f"{'x'.join(map(str, kernel[1:]))} kernel; use a block size that divides the channel count"
    )
