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

import inspect
import math
import operator

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
    feeds_candidate,
    guard,
    module_skip_reason,
    permutation_layout,
    permute_dims,
    static_shape,
)
from fxsurgery.rules._ops import elementwise_tensor_inputs
from fxsurgery.layers import ConvSelfAttention, conv_viewing_linear
from fxsurgery.tracing import shape_of

__all__ = ["LinearToConv", "POINT_LAYOUT", "SPATIAL_LAYOUT", "TOKEN_LAYOUT", "BATCH_LAYOUTS"]

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


def _enter_tokens(graph: fx.Graph, x: fx.Node, site: str) -> fx.Node:
    return graph.call_method("unsqueeze", (graph.call_method("transpose", (x, 1, 2)), 2))


def _exit_tokens(graph: fx.Graph, alt: fx.Node, orig: fx.Node) -> fx.Node:
    return graph.call_method("transpose", (graph.call_method("squeeze", (alt, 2)), 1, 2))


#: Tokens ``(B, S, C)`` carried as ``(B, C, 1, S)`` (opt-in, ``token_layout=True``): every Linear on them is a 1x1
#: conv, and self-attention runs per head on ``(B, heads, head_dim, S)``.
TOKEN_LAYOUT = Layout("(B,C,1,S)", _enter_tokens, _exit_tokens)
_CONV_LAYOUTS = (POINT_LAYOUT, SPATIAL_LAYOUT, NCHW_LAYOUT, TOKEN_LAYOUT)

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

    pattern_names = ("flatten->linear", "pool->linear", "chain-linear", "channels-last-linear", "token-linear",
                     "self-attention")  # fmt: skip

    def __init__(self, batch_layout: str = "spatial", token_layout: bool = False) -> None:
        if batch_layout not in BATCH_LAYOUTS:
            raise InputError(f"batch_layout must be one of {sorted(BATCH_LAYOUTS)}, got {batch_layout!r}")
        if not isinstance(token_layout, bool):
            raise InputError(f"token_layout must be True or False, got {token_layout!r}")
        self.point = BATCH_LAYOUTS[batch_layout]
        self.tokens = token_layout

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
            mod = rw.modules.get(str(node.target))
            return isinstance(mod, nn.Linear) or (self.tokens and isinstance(mod, nn.MultiheadAttention))
        if node.op != "call_function":
            return False
        return node.target is F.linear or (self.tokens and _is_torchvision(node.target, "shifted_window_attention"))

    def _region_layout(self, x: fx.Node) -> Layout | None:
        """With ``token_layout``, the layout that carries a value not yet in one: tokens ``(B, S, C)`` as
        ``(B, C, 1, S)``, a channels-last ``(N, H, W, C)`` map as NCHW; else None."""
        rank = len(shape_of(x) or ())
        return {3: TOKEN_LAYOUT, 4: NCHW_LAYOUT}.get(rank) if self.tokens else None

    def propagate(self, node: fx.Node, rw: Rewriter) -> bool:
        """``z.permute(0, 2, 3, 1)`` is ``z`` in NCHW (no conversion needed); a ``LayerNorm`` over the channels of
        a value carried with its channels on dim 1 becomes :func:`~fxsurgery._runtime.layer_norm_channels`."""
        if permute_dims(node) == (0, 2, 3, 1) and len(shape_of(node.args[0]) or ()) == 4:
            if feeds_candidate(node, rw, self, through=(nn.LayerNorm,)):
                rw.seed(node, node.args[0], NCHW_LAYOUT)  # type: ignore[arg-type]
                return True
            return False
        if _select_token(node, rw):
            return True
        if _is_torchvision(node.target, "stochastic_depth") and node.args and node.args[0] in rw.alt:
            # per-sample (or whole-batch) scaling: layout-independent while dim 0 stays the batch
            alt, layout = rw.alt[node.args[0]]  # type: ignore[index]
            if layout not in (NCHW_LAYOUT, TOKEN_LAYOUT):
                return False
            with rw.graph.inserting_before(node):
                new = rw.graph.node_copy(node, lambda a: alt if a is node.args[0] else a)
            new.meta = {}
            rw.set_alt(node, new, layout)
            return True
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return False
        mod = rw.modules.get(str(node.target))
        if type(mod) is not nn.LayerNorm or len(mod.normalized_shape) != 1:
            return False
        if mod._forward_hooks or mod._forward_pre_hooks:
            return False
        x = node.args[0]
        if x in rw.alt:
            alt, layout = rw.alt[x]
            if layout not in _CONV_LAYOUTS:
                return False
        else:
            # token layout: a LayerNorm that feeds a Linear or an attention is where a region starts
            region = self._region_layout(x)
            if region is None or not feeds_candidate(node, rw, self, through=(nn.LayerNorm,)):
                return False
            alt, layout = rw.enter(x, region, node.name), region
        with rw.graph.inserting_before(node):
            w = rw.graph.get_attr(f"{node.target}.weight") if mod.weight is not None else None
            b = rw.graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
            rw.set_alt(node, rw.graph.call_function(_runtime.layer_norm_channels, (alt, w, b, mod.eps)), layout)
        return True

    def describe(self, node: fx.Node, rw: Rewriter) -> tuple[str, str]:
        if _is_torchvision(node.target, "shifted_window_attention"):
            # named after its qkv Linear: ``exclude=["...attn.qkv"]`` keeps the whole window attention
            weight = _bind(node).get("qkv_weight")
            owner = str(weight.target).rsplit(".", 1)[0] if isinstance(weight, fx.Node) else node.name
            return owner, "window-attention"
        name = str(node.target) if node.op == "call_module" else node.name
        return name, self._pattern(node, rw)

    def _pattern(self, node: fx.Node, rw: Rewriter) -> str:
        if node.op == "call_module" and isinstance(rw.modules.get(str(node.target)), nn.MultiheadAttention):
            return "self-attention"
        x = node.args[0] if node.args else node.kwargs.get("input")
        if permute_dims(x) == (0, 2, 3, 1):
            return "channels-last-linear"
        if x in rw.alt:
            return "token-linear" if rw.alt[x][1] is TOKEN_LAYOUT else "chain-linear"
        if isinstance(x, fx.Node) and self._region_layout(x) is TOKEN_LAYOUT:
            return "token-linear"
        if isinstance(x, fx.Node) and self._region_layout(x) is NCHW_LAYOUT:
            return "channels-last-linear"
        if isinstance(x, fx.Node) and _mean_source(x, rw) is not None:
            return "pool->linear"
        return "flatten->linear"

    def apply(self, node: fx.Node, rw: Rewriter) -> Site:
        name, pattern = self.describe(node, rw)
        if pattern == "self-attention":
            return self._apply_attention(node, rw, name)
        if pattern == "window-attention":
            return self._apply_window_attention(node, rw, name)
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
        elif (layout := self._region_layout(x) or self.point) is not self.point:
            src, feature = rw.enter(x, layout, name), (in_features, 1, 1)
            before = f"Linear({in_features}->{out_features}) on " + (
                "(B, S, C) tokens" if layout is TOKEN_LAYOUT else "a channels-last (N, H, W, C) map")
        else:
            if len(x_shape) == 4:
                raise Skip("input is a 4-D channels-last (N, H, W, C) tensor that is not a permute of an NCHW map "
                           "(Swin/MaxViT-style blocks: pass token_layout=True to carry it as NCHW)")  # fmt: skip
            if len(x_shape) != 2:
                if len(x_shape) == 3:
                    raise Skip("input is (B, S, C) tokens, not a flattened or pooled 4-D feature map (pass "
                               "token_layout=True to carry tokens as (B, C, 1, S))")  # fmt: skip
                raise Skip(f"input is {len(x_shape)}-D, not a flattened or pooled 4-D feature map")
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
                lin: nn.Linear = mod  # type: ignore[assignment]
                rw.new_modules[name] = conv_viewing_linear(lin.weight, lin.bias, lin.training, feature, order)
                conv = rw.graph.call_module(name, (src,))
        rw.set_alt(node, conv, layout)
        after = f"Conv2d({feature[0]}, {out_features}, kernel={kernel[0]}x{kernel[1]}) {layout.name}"
        # the map the conv reads: NCHW of the channels-last input (N, H, W, K), tokens (B, S, K) as they come, or
        # (N, C, H, W) of the flatten
        reads = ((x_shape[0], in_features, *x_shape[1:3]) if layout is NCHW_LAYOUT
                 else tuple(x_shape) if layout is TOKEN_LAYOUT else (x_shape[0], *feature))  # fmt: skip
        return Site(name, pattern, "rewritten", before=before, after=after, input_shape=tuple(reads))


    def _apply_attention(self, node: fx.Node, rw: Rewriter, name: str) -> Site:
        """``mha(x, x, x)`` self-attention on ``(B, S, C)`` tokens -> :class:`~fxsurgery.layers.ConvSelfAttention`
        on ``(B, C, 1, S)``."""
        mod = rw.modules[name]
        reason = module_skip_reason(name, mod, (nn.MultiheadAttention,), rw)
        if reason:
            raise Skip(reason)
        args = dict(zip(("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                         "average_attn_weights", "is_causal"), node.args), **node.kwargs)  # fmt: skip
        x = args.get("query")
        if not isinstance(x, fx.Node) or args.get("key") is not x or args.get("value") is not x:
            raise Skip("not self-attention (query, key and value are not one tensor)")
        if any(args.get(k) is not None for k in ("key_padding_mask", "attn_mask")) or args.get("is_causal"):
            raise Skip("called with an attention mask; only unmasked self-attention is rewritten")
        if not mod.batch_first:
            raise Skip("batch_first=False: tokens are (S, B, C); only batch_first=True attention is rewritten")
        if not mod._qkv_same_embed_dim or mod.in_proj_weight is None:
            raise Skip("separate q/k/v projection weights (kdim/vdim differ from embed_dim)")
        if mod.bias_k is not None or mod.add_zero_attn:
            raise Skip("add_bias_kv / add_zero_attn attention is not rewritten")
        items = [u.args[1] if u.op == "call_function" and u.target is operator.getitem else None for u in node.users]
        if any(i != 0 and (i != 1 or u.users) for i, u in zip(items, node.users)):
            raise Skip("the attention weights it returns are used")  # (``x, _ = mha(...)`` leaves item 1 unused)
        x_shape = static_shape(x, "the attention input")
        if len(x_shape) != 3:
            raise Skip(f"input is {len(x_shape)}-D, not (B, S, C) tokens")
        if x in rw.alt and rw.alt[x][1] is not TOKEN_LAYOUT:
            raise Skip(f"the input is carried in layout {rw.alt[x][1].name}")
        src = rw.enter(x, TOKEN_LAYOUT, name)
        rw.new_modules[name] = ConvSelfAttention(mod)
        with rw.graph.inserting_before(node):
            out = rw.graph.call_module(name, (src,))
        rw.set_alt(node, out, TOKEN_LAYOUT)  # a tuple whose only used item is carried: the call goes away
        for u in node.users:  # (after the call, so that its items are removed before it)
            rw.set_alt(u, out, TOKEN_LAYOUT)
        c, h = mod.embed_dim, mod.num_heads
        rw.sites.append(Site(f"{name}.out_proj", "token-linear", "rewritten", before=f"Linear({c}->{c}) (output "
                             "projection, inside MultiheadAttention)", after=f"Conv2d({c}, {c}, kernel=1x1) "
                             f"{TOKEN_LAYOUT.name}", input_shape=tuple(x_shape)))  # fmt: skip
        return Site(name, "self-attention", "rewritten", before=f"MultiheadAttention({c}, {h} heads) on (B, S, C)",
                    after=f"ConvSelfAttention: q/k/v Conv2d({c}, {3 * c}, kernel=1x1) and out_proj Conv2d 1x1 on "
                    f"{TOKEN_LAYOUT.name}", input_shape=tuple(x_shape))  # fmt: skip


    def _apply_window_attention(self, node: fx.Node, rw: Rewriter, name: str) -> Site:
        """torchvision's ``shifted_window_attention`` on ``(B, H, W, C)`` -> :func:`~fxsurgery._runtime.
        window_attention_nchw` on NCHW, with the ``qkv`` and ``proj`` Linears as 1x1 Conv2d layers."""
        args = _bind(node)
        x = args.get("input")
        linears = {}
        for role in ("qkv", "proj"):
            w, b = args.get(f"{role}_weight"), args.get(f"{role}_bias")
            if not (isinstance(w, fx.Node) and w.op == "get_attr" and str(w.target).endswith(".weight")):
                raise Skip(f"the {role} weight is not a Linear's weight")
            owner = str(w.target)[: -len(".weight")]
            # the GraphModule keeps a Linear read only through get_attr as a plain Module holding its parameters
            mod = rw.modules.get(owner)
            weight = getattr(mod, "weight", None)
            if not isinstance(weight, nn.Parameter) or weight.dim() != 2 or type(mod) not in (nn.Module, *_EXACT):
                raise Skip(f"the {role} weight is not a Linear's weight")
            if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr" and b.target == f"{owner}.bias"):
                raise Skip(f"the {role} bias is not the same Linear's bias")
            for pname, p in mod.named_parameters(recurse=False):  # type: ignore[union-attr]
                if [o for o in rw.param_owners.get(id(p), []) if o != f"{owner}.{pname}"]:
                    raise Skip(f"{owner}.{pname} is shared with another module (tied weights)")
            linears[role] = (owner, mod)
        if not isinstance(x, fx.Node) or len(static_shape(x, "the attention input")) != 4:
            raise Skip("the input is not a 4-D (B, H, W, C) map")
        if x in rw.alt and rw.alt[x][1] is not NCHW_LAYOUT:
            raise Skip(f"the input is carried in layout {rw.alt[x][1].name}")
        src = rw.enter(x, NCHW_LAYOUT, name)
        c = static_shape(x, "the attention input")[3]
        for owner, mod in linears.values():
            bias = getattr(mod, "bias", None)
            rw.new_modules[owner] = conv_viewing_linear(mod.weight, bias, mod.training)  # type: ignore[arg-type]
        with rw.graph.inserting_before(node):
            new = rw.graph.call_function(_runtime.window_attention_nchw, (src, *node.args[1:]), dict(node.kwargs))
        rw.set_alt(node, new, NCHW_LAYOUT)
        (qkv_name, qkv), (proj_name, proj) = linears["qkv"], linears["proj"]
        shape = tuple(static_shape(x, "the attention input"))
        o_qkv, o_proj = qkv.weight.shape[0], proj.weight.shape[0]
        rw.sites.append(Site(proj_name, "window-attention", "rewritten", before=f"Linear({c}->{o_proj}) (window "
                             "attention output projection)", after=f"Conv2d({c}, {o_proj}, kernel=1x1) on windows as "
                             "(B*nW, C, 1, S)", input_shape=shape))  # fmt: skip
        return Site(qkv_name, "window-attention", "rewritten", before=f"Linear({c}->{o_qkv}) in "
                    "shifted_window_attention on (B, H, W, C)", after=f"Conv2d({c}, {o_qkv}, kernel=1x1) in "
                    "window_attention_nchw on NCHW", input_shape=shape)  # fmt: skip


def _is_torchvision(target: object, name: str) -> bool:
    """Whether ``target`` is torchvision's function ``name`` (torchvision itself is never imported here)."""
    module = str(getattr(target, "__module__", ""))
    return getattr(target, "__name__", None) == name and module.startswith("torchvision.")


def _bind(node: fx.Node) -> dict[str, object]:
    """The call's arguments by parameter name (empty when they do not bind)."""
    try:
        return dict(inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return {}


def _select_token(node: fx.Node, rw: Rewriter) -> bool:
    """``x[:, i]`` of tokens carried as ``(B, C, 1, S)`` (ViT's class token) reads ``alt[:, :, 0, i]``: no conversion of
    the whole sequence back. The result is an ordinary ``(B, C)`` value. True when ``node`` was rewritten."""
    if not (node.op == "call_function" and node.target is operator.getitem and node.args[0] in rw.alt):
        return False
    alt, layout = rw.alt[node.args[0]]  # type: ignore[index]
    index = node.args[1]
    if layout is not TOKEN_LAYOUT or not isinstance(index, tuple) or len(index) != 2:
        return False
    if index[0] != slice(None) or not isinstance(index[1], int) or isinstance(index[1], bool):
        return False
    node.args = (alt, (slice(None), slice(None), 0, index[1]))
    return True
