"""Linear -> Conv2d.

Rules (found by graph pattern and propagated shapes, never by layer names):

* ``flatten->linear``: ``Linear(C*H*W -> O)`` fed by an order-preserving reshape of a 4-D map ``Y (N, C, H, W)``
  (``torch.flatten(x, 1)``, ``x.flatten(1)``, ``nn.Flatten()``, ``x.view(x.size(0), -1)``,
  ``x.reshape(x.shape[0], -1)``, ``x.view(-1, K)``, ``x.squeeze(-1).squeeze(-1)``, possibly after
  ``.contiguous()``) becomes ``Conv2d(C, O, kernel_size=(H, W))`` on ``Y`` with kernel ``W.view(O, C, H, W)``. If ``Y``
  is itself ``Z.permute(0, a, b, c)`` (a channels-last flatten), the convolution reads ``Z`` and the kernel is the
  permuted view ``W.view(O, *Y.shape[1:]).permute(...)``. A run-time check keeps the rewritten model rejecting
  feature-map sizes that the original rejects.
* ``pool->linear``: ``Linear`` fed by ``x.mean([2, 3])`` becomes ``x.mean([2, 3], keepdim=True)`` + 1x1 conv.
* ``chain-linear``: once a value is carried as ``(N, O, 1, 1)``, elementwise ops run on it unchanged and a following
  Linear becomes a 1x1 conv; one flatten at the end restores ``(N, O)``.

Functional ``F.linear(x, w, b)`` sites become ``F.conv2d(x, w.view(...), b)``, so the parameter keeps its 2-D shape.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxsurgery import _runtime
from fxsurgery.errors import InputError
from fxsurgery.result import Site
from fxsurgery.rules._engine import (
    Layout,
    Rewriter,
    Skip,
    guard,
    module_skip_reason,
    permutation_layout,
    permute_dims,
    static_shape,
)
from fxsurgery.rules._ops import elementwise_tensor_inputs
from fxsurgery.tracing import shape_of
from fxsurgery.weights import linear_to_conv_weight

__all__ = ["LinearToConv", "POINT_LAYOUT", "SPATIAL_LAYOUT", "BATCH_LAYOUTS"]

_EXACT = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _enter_point(graph: fx.Graph, x: fx.Node, site: str) -> fx.Node:
    return graph.call_method("reshape", (x, (-1, static_shape(x, "a chained value")[1], 1, 1)))


def _exit_point(graph: fx.Graph, alt: fx.Node, orig: fx.Node) -> fx.Node:
    return graph.call_function(torch.flatten, (alt, 1))


#: ``(N, O)`` values carried as ``(N, O, 1, 1)``: the batch stays the batch; each conv is N small products.
POINT_LAYOUT = Layout("(N,C,1,1)", _enter_point, _exit_point)


def _enter_spatial(graph: fx.Graph, x: fx.Node, site: str) -> fx.Node:
    k = static_shape(x, "a chained value")[1]
    return graph.call_method("reshape", (graph.call_method("t", (x,)), (1, k, 1, -1)))


def _exit_spatial(graph: fx.Graph, alt: fx.Node, orig: fx.Node) -> fx.Node:
    return graph.call_method("t", (graph.call_method("flatten", (alt, 0, 2)),))


#: ``(N, O)`` values carried as ``(1, O, 1, N)``: the batch on the width axis, so each conv is one matrix product.
SPATIAL_LAYOUT = Layout("(1,C,1,N)", _enter_spatial, _exit_spatial)
BATCH_LAYOUTS = {"spatial": SPATIAL_LAYOUT, "batch": POINT_LAYOUT}
#: Channels-last ``(N, H, W, O)`` values carried as NCHW ``(N, O, H, W)``.
NCHW_LAYOUT = permutation_layout("NCHW", (0, 3, 1, 2))
_CONV_LAYOUTS = (POINT_LAYOUT, SPATIAL_LAYOUT, NCHW_LAYOUT)

# Order-preserving reshapes that may stand between a 4-D map and the Linear that reads it flattened.
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "contiguous"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze}


def _is_reshape(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS
    if node.op == "call_function":
        return node.target in _RESHAPE_FUNCTIONS
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), nn.Flatten)
    return False


def _check_batch_safe(node: fx.Node) -> None:
    """Reject reshapes that only flatten correctly at the traced batch size."""
    if node.target == "squeeze" or node.target is torch.squeeze:
        if len(node.args) < 2 and "dim" not in node.kwargs:
            raise Skip(f"{node.name}: squeeze() without dims also drops a batch of size 1")
    if node.target in ("view", "reshape") or node.target is torch.reshape:
        shape = node.args[1:] if node.op == "call_method" else node.args[1:2]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        first = shape[0] if shape else None
        if isinstance(first, int) and first != -1:
            raise Skip(f"{node.name}: the reshape hard-codes the batch size ({first}); use x.size(0) or -1")


def _flatten_source(x: fx.Node, rw: Rewriter) -> tuple[fx.Node, list[tuple[fx.Node, fx.Node]]] | None:
    """The 4-D node whose flatten is ``x``, walking back through order-preserving reshapes, and the elementwise ops
    met on the way (``flatten -> Dropout -> Linear``) with their tensor input, first to last; None if there is none.

    Elementwise ops commute with a reshape, so they can run on the 4-D map instead.
    """
    n = static_shape(x, "the Linear input")[0]
    cur, ops = x, []
    while isinstance(cur, fx.Node):
        if _is_reshape(cur, rw.modules) and isinstance(cur.args[0], fx.Node):
            _check_batch_safe(cur)
            if static_shape(cur, "a reshape")[0] != n:
                raise Skip(f"{cur.name} moves the batch axis (dim 0 is not {n})")
            cur = cur.args[0]
            shape = static_shape(cur, "a reshape input")
            if shape[0] != n:
                raise Skip(f"{cur.name} moves the batch axis (dim 0 is not {n})")
            if len(shape) == 4:
                return cur, ops[::-1]
        elif (inputs := elementwise_tensor_inputs(cur, rw.modules)) and len(inputs) == 1:
            ops.append((cur, inputs[0]))
            cur = inputs[0]
        else:
            return None
    return None


def _mean_source(x: fx.Node, rw: Rewriter) -> tuple[fx.Node, list[tuple[fx.Node, fx.Node]]] | None:
    """``(y, ops)`` if ``x`` is ``y.mean([2, 3])`` followed by elementwise ops (``mean -> Dropout -> Linear`` in
    MNASNet), first to last; None otherwise."""
    ops = []
    while (pooled := _spatial_mean_source(x)) is None:
        inputs = elementwise_tensor_inputs(x, rw.modules)
        if not inputs or len(inputs) != 1:
            return None
        ops.append((x, inputs[0]))
        x = inputs[0]
    return pooled, ops[::-1]


def _replay(graph: fx.Graph, ops: list[tuple[fx.Node, fx.Node]], src: fx.Node) -> fx.Node:
    """Apply the elementwise ``ops`` (each with its tensor input) to ``src`` instead, in order."""
    for op, op_input in ops:
        src = graph.node_copy(op, lambda a, prev=src, old=op_input: prev if a is old else a)
        src.meta = {}
    return src


def _spatial_mean_source(x: fx.Node) -> fx.Node | None:
    """``y`` if ``x`` is ``y.mean([2, 3])`` (or ``torch.mean``) of a 4-D ``y`` without keepdim, else None."""
    if not ((x.op == "call_method" and x.target == "mean") or (x.op == "call_function" and x.target is torch.mean)):
        return None
    if not isinstance(x.args[0], fx.Node) or len(shape_of(x.args[0]) or ()) != 4:
        return None
    dims = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim")
    keepdim = x.args[2] if len(x.args) > 2 else x.kwargs.get("keepdim", False)
    if keepdim or "dtype" in x.kwargs or not isinstance(dims, (tuple, list)):
        return None
    return x.args[0] if sorted(d % 4 for d in dims) == [2, 3] else None


class LinearToConv:
    """Rewrite Linear layers that read flattened or pooled 4-D maps (and their chains) as Conv2d."""

    pattern_names = ("flatten->linear", "pool->linear", "chain-linear", "channels-last-linear")

    def __init__(self, batch_layout: str = "spatial") -> None:
        if batch_layout not in BATCH_LAYOUTS:
            raise InputError(f"batch_layout must be one of {sorted(BATCH_LAYOUTS)}, got {batch_layout!r}")
        self.point = BATCH_LAYOUTS[batch_layout]

    def _from_map(self, graph: fx.Graph, y: fx.Node, feature: tuple[int, ...]) -> fx.Node:
        """A 4-D ``(N, C, H, W)`` map in the point layout: as is, or ``(1, C, H, N*W)`` with the images side by side."""
        if self.point is POINT_LAYOUT:
            return y
        if feature[1:] == (1, 1):
            # a pooled map: a 2-D transpose of (N, C); onnxruntime runs a 4-D permute of (N, C, 1, 1) far slower
            flat = graph.call_method("t", (graph.call_method("flatten", (y, 1)),))
            return graph.call_method("reshape", (flat, (1, feature[0], 1, -1)))
        side_by_side = graph.call_method("permute", (y, (1, 2, 0, 3)))
        return graph.call_method("reshape", (side_by_side, (1, feature[0], feature[1], -1)))

    def is_candidate(self, node: fx.Node, rw: Rewriter) -> bool:
        if node.op == "call_module":
            return isinstance(rw.modules.get(str(node.target)), nn.Linear)
        return node.op == "call_function" and node.target is F.linear

    def propagate(self, node: fx.Node, rw: Rewriter) -> bool:
        """``z.permute(0, 2, 3, 1)`` is ``z`` in NCHW (no conversion needed); a ``LayerNorm`` over the channels of
        a value carried with its channels on dim 1 becomes :func:`~fxsurgery._runtime.layer_norm_channels`."""
        if permute_dims(node) == (0, 2, 3, 1) and len(shape_of(node.args[0]) or ()) == 4:
            if _reaches_linear(node, rw, self):
                rw.seed(node, node.args[0], NCHW_LAYOUT)  # type: ignore[arg-type]
                return True
            return False
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or node.args[0] not in rw.alt:
            return False
        mod = rw.modules.get(str(node.target))
        alt, layout = rw.alt[node.args[0]]  # type: ignore[index]
        if type(mod) is not nn.LayerNorm or len(mod.normalized_shape) != 1 or layout not in _CONV_LAYOUTS:
            return False
        if mod._forward_hooks or mod._forward_pre_hooks:
            return False
        with rw.graph.inserting_before(node):
            w = rw.graph.get_attr(f"{node.target}.weight") if mod.weight is not None else None
            b = rw.graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
            rw.set_alt(node, rw.graph.call_function(_runtime.layer_norm_channels, (alt, w, b, mod.eps)), layout)
        return True

    def describe(self, node: fx.Node, rw: Rewriter) -> tuple[str, str]:
        name = str(node.target) if node.op == "call_module" else node.name
        return name, self._pattern(node, rw)

    def _pattern(self, node: fx.Node, rw: Rewriter) -> str:
        x = node.args[0] if node.args else node.kwargs.get("input")
        if permute_dims(x) == (0, 2, 3, 1):
            return "channels-last-linear"
        if x in rw.alt:
            return "chain-linear"
        if isinstance(x, fx.Node) and _mean_source(x, rw) is not None:
            return "pool->linear"
        return "flatten->linear"

    def apply(self, node: fx.Node, rw: Rewriter) -> Site:
        name, pattern = self.describe(node, rw)
        functional = node.op == "call_function"
        if functional:
            args = list(node.args) + [None] * (3 - len(node.args))
            x, w, b = (node.kwargs.get(k, args[i]) for i, k in enumerate(("input", "weight", "bias")))
            mod = None
        else:
            mod = rw.modules[name]
            reason = module_skip_reason(name, mod, _EXACT, rw)
            if reason:
                raise Skip(reason)
            x, w, b = node.args[0], None, None
        if not isinstance(x, fx.Node):
            raise Skip("the input is not a graph value")
        if functional and not isinstance(w, fx.Node):
            raise Skip("the weight is not a graph value")
        x_shape = static_shape(x, "the Linear input")
        out_features, in_features = static_shape(w, "the weight") if functional else mod.weight.shape  # type: ignore[union-attr]

        order: tuple[int, ...] | None = None
        layout = self.point
        if x in rw.alt:  # after a rewritten site, or on z.permute(0, 2, 3, 1), which is z in NCHW
            src, layout, feature = rw.alt[x][0], rw.alt[x][1], (in_features, 1, 1)
            if layout not in _CONV_LAYOUTS:
                raise Skip(f"the input is carried in layout {layout.name}")
            before = f"Linear({in_features}->{out_features}) " + (
                "on NCHW permuted to channels-last" if pattern == "channels-last-linear"
                else f"on a value already carried as {layout.name}"
            )  # fmt: skip
        elif (found_mean := _mean_source(x, rw)) is not None:
            pooled, elementwise = found_mean
            c = static_shape(pooled, "the pooled map")[1]
            feature = (c, 1, 1)
            with rw.graph.inserting_before(node):
                src = rw.graph.call_method("mean", (pooled, [2, 3]), {"keepdim": True})
                src = _replay(rw.graph, elementwise, src)
                src = self._from_map(rw.graph, src, feature)
            before = f"Linear({in_features}->{out_features}) on mean over HxW of {c} channels"
        else:
            if len(x_shape) == 4:
                raise Skip("input is a 4-D channels-last (N, H, W, C) tensor that is not a permute of an NCHW map "
                           "(Swin/MaxViT-style blocks would need a token layout)")  # fmt: skip
            if len(x_shape) != 2:
                kind = "(N, S, C) tokens" if len(x_shape) == 3 else f"{len(x_shape)}-D"
                raise Skip(f"input is {kind}, not a flattened or pooled 4-D feature map")
            found = _flatten_source(x, rw)
            if found is None:
                raise Skip(f"input ({x.name}) is not a flattened or pooled 4-D feature map")
            y, elementwise = found
            y_shape = static_shape(y, "the flattened map")
            dims = permute_dims(y)
            if dims is not None and len(dims) == 4 and dims[0] == 0:
                order = tuple(d - 1 for d in dims[1:])
                y = y.args[0]
                y_shape = static_shape(y, "the permuted map")
            feature = tuple(y_shape[1:])
            with rw.graph.inserting_before(node):
                src = guard(rw.graph, y, (feature[1], feature[2]), name, original_rejects=True)
                src = _replay(rw.graph, elementwise, src)  # on the map, before the flatten they followed
                src = self._from_map(rw.graph, src, feature)
            size = "x".join(map(str, feature))
            before = f"Linear({in_features}->{out_features}) on flatten({size}{' permuted' if order else ''})"
        if math.prod(feature) != in_features:
            raise Skip(f"in_features={in_features} does not match the {feature} map")

        kernel = (feature[1], feature[2])
        with rw.graph.inserting_before(node):
            if functional:
                w4 = rw.graph.call_method("view", (w, (out_features, *(feature[d] for d in (order or (0, 1, 2))))))
                if order:
                    w4 = rw.graph.call_method("permute", (w4, (0, *(1 + order.index(d) for d in range(3)))))
                conv = rw.graph.call_function(F.conv2d, (src, w4, b, kernel))
            else:
                rw.new_modules[name] = _conv_from_linear(mod, feature, order)  # type: ignore[arg-type]
                conv = rw.graph.call_module(name, (src,))
        rw.set_alt(node, conv, layout)
        after = f"Conv2d({feature[0]}, {out_features}, kernel={kernel[0]}x{kernel[1]}) {layout.name}"
        # the map the conv reads: NCHW of the channels-last input (N, H, W, K), or (N, C, H, W) of the flatten
        reads = (x_shape[0], in_features, *x_shape[1:3]) if layout is NCHW_LAYOUT else (x_shape[0], *feature)
        return Site(name, pattern, "rewritten", before=before, after=after, input_shape=tuple(reads))


def _reaches_linear(start: fx.Node, rw: Rewriter, rule: LinearToConv, depth: int = 16) -> bool:
    """Whether a Linear reads ``start`` through elementwise ops and LayerNorms only (so carrying it as NCHW pays)."""
    frontier = [start]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if rule.is_candidate(u, rw) and (u.args[:1] or (None,))[0] is n:
                    return True
                is_norm = u.op == "call_module" and type(rw.modules.get(str(u.target))) is nn.LayerNorm
                if is_norm or elementwise_tensor_inputs(u, rw.modules):
                    nxt.append(u)
        if not nxt:
            return False
        frontier = nxt
    return False


def _conv_from_linear(lin: nn.Linear, feature: tuple[int, ...], order: tuple[int, ...] | None) -> nn.Conv2d:
    weight = linear_to_conv_weight(lin.weight.detach(), feature, order)
    kernel = (feature[1], feature[2])  # stride = kernel: with the batch side by side, one window per image
    conv = nn.Conv2d(feature[0], lin.out_features, kernel, stride=kernel, bias=lin.bias is not None, device="meta",
                     dtype=lin.weight.dtype)  # fmt: skip
    conv.weight = nn.Parameter(weight, requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        conv.bias = lin.bias
    conv.train(lin.training)
    return conv
