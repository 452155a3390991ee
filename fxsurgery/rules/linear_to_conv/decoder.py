"""What decoder blocks (Llama, Mistral, Qwen2, ...) add to the token layout (``token_layout=True``).

Each layout with ``dims`` says which original dim each of its dims holds (tokens ``(B, S, C)`` carried as
``(B, C, 1, S)``: ``(0, 2, None, 1)``; a value carried per head ``(B, H, D, S)``: a permutation), so an op that
names dims runs on the carried value with its dims renamed:

* :class:`Broadcast`: ``x * w`` / ``x * rsqrt(...)`` / ``q * cos`` where the shapes broadcast (RMSNorm's weight and
  statistic, rotary embeddings): carried inputs are used as they are; the others are entered into the layout (a
  lower-rank one first padded with leading unit dims, as broadcasting reads it).
* :class:`Reduce`: ``x.mean(-1, keepdim=True)`` (RMSNorm's mean square) reduces over the carried dim; one that drops
  its dims (a channels-last head's ``x.mean((1, 2))``) too, on a value carried as a permutation.
* :class:`Cast`: ``x.to(torch.float32)``, ``x.type_as(y)`` (RMSNorm's casts) cast the carried value; an alias
  (``hidden[:, slice(None)]`` before the LM head) is the carried value.
* :class:`Slice`: ``x[..., :D // 2]`` (rotate-half; ``aten.slice`` once exported) slices the carried dim.
* :class:`ShapeRead`: ``b, h, s, d = k.shape`` (``repeat_kv``) of a carried value is read from the carried value;
  ``x.dtype`` (timm's rotary embedding casts back to it) too: no layout changes it.
* :mod:`~fxsurgery.rules.linear_to_conv.decoder_heads`: grouped-query attention's ``repeat_kv`` on keys and values
  carried per head.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from fxsurgery import _runtime
from fxsurgery.capture.shapes import shape_of
from fxsurgery.engine.elementwise import elementwise_tensor_inputs, is_number, no_nodes
from fxsurgery.engine.layout import Layout
from fxsurgery.engine.nodes import is_shape_read
from fxsurgery.engine.rule import RuleContext
from fxsurgery.rules.linear_to_conv.layouts import TOKEN_LAYOUT
from fxsurgery.rules.linear_to_conv.regroup import carry, permutation, permuted

__all__ = ["Broadcast", "Reduce", "Cast", "Slice", "ShapeRead", "carried_with_dims"]

aten = torch.ops.aten

_BINARY: set[Any] = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.pow,
    torch.maximum,
    torch.minimum,
    aten.pow.Tensor_Scalar,
    aten.pow.Tensor_Tensor,
}
_BINARY_METHODS = {"add", "sub", "mul", "div", "pow"}
_CASTS: set[Any] = {
    aten.to.dtype,
    aten.to.device,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.alias.default,
    aten.detach.default,
    aten.clone.default,
    aten.type_as.default,
}
_CAST_METHODS = {"to", "float", "double", "half", "bfloat16", "type_as", "contiguous"}
_TYPE_AS = ("type_as", aten.type_as.default)


def _rank(layout: Layout) -> int:
    assert layout.dims is not None
    return sum(d is not None for d in layout.dims)


def _alt_dim(layout: Layout, dim: int) -> int:
    """Where the original ``dim`` is in a value carried in ``layout``."""
    assert layout.dims is not None
    return layout.dims.index(dim % _rank(layout))


def carried_with_dims(node: object, rw: RuleContext) -> tuple[fx.Node, Layout] | None:
    carried = rw.carried(node)
    if carried is None or carried[1].dims is None or len(shape_of(node) or ()) != _rank(carried[1]):
        return None
    return carried


def _fixed_shape(shape: tuple[int, ...], layout: Layout) -> tuple[int, ...] | None:
    """The carried shape of a constant of ``shape`` (an RMSNorm weight ``(C,)``: ``(1, C, 1, 1)`` for tokens), when
    a reshape gives it: its dims other than 1 keep their order."""
    assert layout.dims is not None
    padded = (1,) * (_rank(layout) - len(shape)) + tuple(shape)
    alt = tuple(1 if d is None else padded[d] for d in layout.dims)
    order = [d for d in layout.dims if d is not None and padded[d] != 1]
    return alt if order == sorted(order) else None


def _in_layout(value: torch.Tensor, layout: Layout, rank: int) -> torch.Tensor:
    """A constant as a value carried in ``layout`` holds it (padded to ``rank`` with leading unit dims, as
    broadcasting reads it), computed once: a rotary table ``(S, D)`` for queries carried as ``(B, H, D, S)``."""
    assert layout.dims is not None
    alt = value.reshape((1,) * (rank - value.dim()) + tuple(value.shape)).permute(
        [d for d in layout.dims if d is not None]
    )
    for at, d in enumerate(layout.dims):
        if d is None:
            alt = alt.unsqueeze(at)
    return alt.clone(memory_format=torch.contiguous_format)


class Broadcast:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if not (
            node.op == "call_function"
            and node.target in _BINARY
            or node.op == "call_method"
            and node.target in _BINARY_METHODS
        ):
            return False  # (in-place ops are left to the elementwise propagator: a broadcast write is not carried)
        if len(node.args) != 2 or node.kwargs or elementwise_tensor_inputs(node, rw.modules) is not None:
            return False  # same shapes: the elementwise propagator's
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if not all(isinstance(a, fx.Node) or is_number(a) for a in node.args):
            return False
        layouts = {id(c[1]): c[1] for c in (carried_with_dims(t, rw) for t in tensors) if c is not None}
        out = shape_of(node)
        if len(layouts) != 1 or out is None:
            return False
        layout = next(iter(layouts.values()))
        rank = _rank(layout)
        shapes = [shape_of(t) for t in tensors]
        if len(out) != rank or any(s is None or len(s) > rank for s in shapes):
            return False
        if any(rw.carried(t) is not None and carried_with_dims(t, rw) is None for t in tensors):
            return False  # carried in another layout, or with another rank
        mapped: dict[fx.Node, fx.Node] = {}
        with rw.graph.inserting_before(node):
            for t, shape in zip(tensors, shapes):
                assert shape is not None
                if t in rw.alt:
                    mapped[t] = rw.alt[t][0]
                elif t not in rw.dynamic and (fixed := _fixed_shape(shape, layout)) is not None:
                    mapped[t] = rw.graph.call_method("reshape", (t, fixed))
                elif (value := rw.constant(t)) is not None:
                    mapped[t] = rw.add_constant(_in_layout(value, layout, rank), t.name)
                elif len(shape) == rank:
                    mapped[t] = rw.enter(t, layout, node.name)
                else:  # broadcasting pads a lower rank with leading unit dims: so does the conversion
                    padded = t
                    for _ in range(rank - len(shape)):
                        padded = rw.graph.call_method("unsqueeze", (padded, 0))
                    mapped[t] = layout.enter(rw.graph, padded, node.name)
            new = rw.graph.node_copy(node, lambda a: mapped.get(a, a))
        new.meta = {}
        rw.set_alt(node, new, layout)
        return True


def _is_cast(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target in _CASTS
        or node.op == "call_method"
        and node.target in _CAST_METHODS
    )


def _same_shape_step(node: fx.Node, rw: RuleContext) -> fx.Node | None:
    """The input of a one-input op that keeps the shape (a cast, ``x ** 2``, an activation), else None."""
    inputs: list[Any] | None
    if _is_cast(node):  # (``type_as`` reads only the dtype of its other input)
        inputs = [node.args[0]] if node.target in _TYPE_AS or no_nodes((node.args[1:], node.kwargs)) else None
    elif (
        node.op == "call_function"
        and node.target in (torch.pow, aten.pow.Tensor_Scalar)
        or node.op == "call_method"
        and node.target == "pow"
    ) and len(node.args) == 2:
        inputs = [node.args[0]] if is_number(node.args[1]) and not node.kwargs else None
    else:
        inputs = elementwise_tensor_inputs(node, rw.modules)
    x = inputs[0] if inputs and len(inputs) == 1 else None
    return x if isinstance(x, fx.Node) and shape_of(x) == shape_of(node) else None


def _feeds_site(start: fx.Node, rw: RuleContext, depth: int = 12) -> bool:
    """Whether a rule's site reads ``start`` through a normalisation's ops (elementwise, broadcast, casts)."""
    frontier = [start]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users]
        if any(rw.claims(u) for u in frontier):
            return True
        frontier = [
            u
            for u in frontier
            if u.op in ("call_function", "call_method", "call_module")
            and (_same_shape_step(u, rw) is not None or u.target in _BINARY or u.target in _BINARY_METHODS)
        ]
        if not frontier:
            return False
    return False


def _copy_on(node: fx.Node, alt: fx.Node, rw: RuleContext) -> fx.Node:
    """``node`` again, after it, reading ``alt`` where it read its first input."""
    first = node.args[0]
    with rw.graph.inserting_before(node.next):
        new = rw.graph.node_copy(node, lambda a: alt if a is first else a)
    new.meta = {}
    return new


def _start_region(x: fx.Node, rw: RuleContext) -> tuple[fx.Node, Layout] | None:
    """Tokens ``(B, S, C)`` a normalisation reduces over their channels, where a site follows it: carried from the
    value the one-input ops before them start at (an embedding before its upcast), so the whole normalisation runs
    in the token layout and the residual stream enters it once."""
    if x not in rw.dynamic or len(shape_of(x) or ()) != 3:
        return None
    chain = [x]
    while (step := _same_shape_step(chain[-1], rw)) is not None and step not in rw.alt and step in rw.dynamic:
        chain.append(step)
    alt = rw.enter(chain[-1], TOKEN_LAYOUT, x.name)
    for n in reversed(chain[:-1]):
        alt = _copy_on(n, alt, rw)
        rw.set_alt(n, alt, TOKEN_LAYOUT)
    return alt, TOKEN_LAYOUT


class Reduce:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if not (
            node.op == "call_function"
            and node.target in (torch.mean, torch.sum)
            or node.op == "call_method"
            and node.target in ("mean", "sum")
        ):
            return False
        args = dict(zip(("input", "dim", "keepdim"), node.args), **node.kwargs)
        x, dim = args.get("input"), args.get("dim")
        dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (list, tuple)) else None
        if not set(args) <= {"input", "dim", "keepdim"} or not dims or not all(isinstance(d, int) for d in dims):
            return False  # all dims, or a dtype: left in its layout
        reduce = torch.mean if node.target in (torch.mean, "mean") else torch.sum
        if args.get("keepdim") is not True:
            return _dropping(node, x, dims, reduce, rw)
        carried = carried_with_dims(x, rw)
        if (
            carried is None
            and isinstance(x, fx.Node)
            and x not in rw.alt
            and dim in (-1, 2, [-1], [2])
            and _feeds_site(node, rw)
        ):
            carried = _start_region(x, rw)
        if carried is None:
            return False
        alt, layout = carried
        with rw.graph.inserting_before(node):
            rw.set_alt(node, rw.graph.call_function(reduce, (alt, [_alt_dim(layout, d) for d in dims], True)), layout)
        return True


def _dropping(node: fx.Node, x: object, dims: list[int], reduce: Any, rw: RuleContext) -> bool:
    """A reduction that drops its dims (a channels-last head's ``x.mean((1, 2))``) of a value carried as a
    permutation: the dims left keep their carried order; when that is the original's, ``node`` reads the carried
    value itself."""
    perm = permutation(x, rw)
    if perm is None or not isinstance(x, fx.Node):
        return False
    alt = permuted(x, rw)
    gone = {d % len(perm) for d in dims}
    left = tuple(p - sum(p > d for d in gone) for p in perm if p not in gone)
    at = [perm.index(d) for d in sorted(gone)]
    if left == tuple(range(len(left))):  # the result is the original's: the node reads the carried value
        node.args, node.kwargs = (alt, at), {"keepdim": False}
        return True
    with rw.graph.inserting_before(node):
        return carry(node, rw.graph.call_function(reduce, (alt, at, False)), left, rw)


class Cast:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if not _is_cast(node):
            return False
        carried = carried_with_dims(node.args[0] if node.args else None, rw)
        # ``x.type_as(other)`` reads only the dtype of ``other``: its counterpart, or itself, gives that
        other = node.args[1] if node.target in _TYPE_AS and len(node.args) == 2 and not node.kwargs else None
        rest = () if isinstance(other, fx.Node) else (node.args[1:], node.kwargs)
        found: list[fx.Node] = []
        fx.map_arg(rest, found.append)  # the dtype it casts to may be read from a value: ``x.to(dtype=y.dtype)``
        if carried is None or not all(map(_is_dtype_read, found)) or shape_of(node) != shape_of(node.args[0]):
            return False
        mapped: dict[Any, fx.Node] = {node.args[0]: carried[0]}
        if isinstance(other, fx.Node) and other in rw.alt:
            mapped[other] = rw.alt[other][0]
        with rw.graph.inserting_before(node):
            new = rw.graph.node_copy(node, lambda a: mapped.get(a, a))
        new.meta = {}
        rw.set_alt(node, new, carried[1])
        return True


def _slices(index: Any, rank: int) -> list[slice] | None:
    """``x[index]`` as one slice per dim, when ``index`` has only slices and an Ellipsis."""
    index = index if isinstance(index, tuple) else (index,)
    if sum(i is Ellipsis for i in index) > 1:
        return None
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (rank - len(index) + 1) + index[at + 1 :]
    ok = all(isinstance(i, slice) for i in index)  # (bounds may be traced sizes: ``x[:, :H, :W]``; they stay)
    return [*index, *[slice(None)] * (rank - len(index))] if ok and len(index) <= rank else None


class Slice:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
            carried = carried_with_dims(node.args[0], rw)
            slices = _slices(node.args[1], _rank(carried[1])) if carried is not None else None
            if carried is None or slices is None:
                return False
            alt, layout = carried
            assert layout.dims is not None
            index = tuple(slice(None) if d is None else slices[d] for d in layout.dims)
            with rw.graph.inserting_before(node):
                rw.set_alt(node, rw.graph.call_function(operator.getitem, (alt, index)), layout)
            return True
        if not (node.op == "call_function" and node.target is aten.slice.Tensor) or node.kwargs:
            return False
        carried = carried_with_dims(node.args[0], rw)
        rest = list(node.args[1:])
        if carried is None or not no_nodes(rest):
            return False
        alt, layout = carried
        dim = rest[0] if rest else 0
        if not isinstance(dim, int):
            return False
        with rw.graph.inserting_before(node):
            sliced = rw.graph.call_function(aten.slice.Tensor, (alt, _alt_dim(layout, dim), *rest[1:]))
        rw.set_alt(node, sliced, layout)
        return True


def _is_dtype_read(node: fx.Node) -> bool:
    """Whether ``node`` is ``x.dtype``."""
    return node.op == "call_function" and node.target is getattr and node.args[1:] == ("dtype",) and not node.kwargs


class ShapeRead:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if _is_dtype_read(node) and (carried := rw.carried(node.args[0])) is not None:
            with rw.graph.inserting_before(node):
                node.replace_all_uses_with(rw.graph.call_function(getattr, (carried[0], "dtype")))
            rw.graph.erase_node(node)
            return True
        carried = carried_with_dims(node.args[0], rw) if is_shape_read(node) else None
        if carried is None:
            return False
        with rw.graph.inserting_before(node):
            shape = rw.graph.call_function(_runtime.original_shape, (carried[0], carried[1].dims))
        node.replace_all_uses_with(shape)
        rw.graph.erase_node(node)
        return True
