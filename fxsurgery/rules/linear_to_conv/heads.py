"""Attention carried in the token layout (``token_layout=True``).

HuggingFace-style self-attention, ``Linear -> view(B, S, H, D) -> transpose(1, 2) -> scaled_dot_product_attention ->
transpose(1, 2) -> reshape(B, S, C) -> Linear``, runs on tokens carried as ``(B, C, 1, S)`` without converting them
back. Per head the values are ``(B, H, D, S)``: head_dim on the channel side, tokens on the width, as in Apple's
``ml-ane-transformers``. Each propagator below carries one step (those of decoders, RMSNorm, rotary embeddings and
grouped-query heads, are in :mod:`.decoder`); a step none carries is converted back where it starts, so the result is
always exact.

* :class:`HeadSplit`: ``view(B, S, H, D)`` of tokens carried as ``(B, C, 1, S)`` is ``(B, H, D, S)``: the channels
  are split, nothing is transposed.
* :class:`HeadPermute`: a permute or transpose of a value carried per head is the same carried value, read through
  another permutation (no op).
* :class:`SameShape`: a ``view``/``reshape`` to its own shape is the carried value.
* :class:`HeadCat`: a concatenation with a value carried per head (a KV cache's past and new keys) concatenates
  the carried values along the same dim, read through the layout.
* :class:`SplitChannels`: GPT-2's fused q/k/v, ``x.split(C, dim=-1)`` of carried tokens (Phi-3's fused gate/up
  MLP, ``x.chunk(2, dim=-1)``), splits the channels.
* :class:`ChannelAttention`: SDPA whose queries (and keys and values, or these as SDPA reads them: a static KV cache)
  are carried as ``(B, H, D, S)``
  (:func:`~fxsurgery._runtime.attention_channels`): ``scores[b,h,s,t] = scale * sum_d q[b,h,d,s] k[b,h,d,t]``, the
  mask applied (a boolean False is the lowest finite value; ``is_causal`` keeps ``t <= s``), softmax over ``t``,
  ``out[b,h,d,s] = sum_t p[b,h,s,t] v[b,h,d,t]``: the output is carried as ``(B, H, D, S)``. With ``quantize=``,
  SDPA itself on permuted views (the one op quantizers leave whole).
* :class:`ChannelMatmul`: the same attention written out (``q @ k.transpose(-2, -1)``, softmax, ``p @ v``, the
  "eager" implementation; timm's Swin): ``q @ k^T`` of queries and keys carried per head is the scores (an Einsum,
  in the original layout); ``p @ v`` with values carried per head is the output carried per head. With ``quantize=``,
  both are MatMuls of permuted operands (onnxruntime quantizes MatMul, not Einsum).
* :class:`HeadMerge`: ``reshape(B, S, H*D)`` of ``(B, S, H, D)`` carried as ``(B, H, D, S)`` is tokens
  ``(B, C, 1, S)`` again, where the output projection (a 1x1 conv) reads them.
"""

from __future__ import annotations

import functools
import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxsurgery import _runtime
from fxsurgery.capture.shapes import shape_of
from fxsurgery.engine.layout import Layout, permutation_layout, permute_dims
from fxsurgery.engine.rule import RuleContext
from fxsurgery.rules.linear_to_conv.layouts import NCHW_LAYOUT, TOKEN_LAYOUT

__all__ = [
    "HeadSplit",
    "HeadPermute",
    "SameShape",
    "HeadCat",
    "SplitChannels",
    "ChannelAttention",
    "ChannelMatmul",
    "HeadMerge",
    "heads_layout",
]

#: ``(B, S, H, D)`` (heads split, before the transpose) carried as ``(B, H, D, S)``.
_SPLIT = (0, 2, 3, 1)
#: ... and ``(B, S, K, H, D)`` (q, k and v split from a fused projection, timm's) as ``(B, K, H, D, S)``.
_SPLIT_BY_RANK = {4: _SPLIT, 5: (0, 2, 3, 4, 1)}
#: ``(B, H, S, D)`` (what SDPA reads and returns) carried as ``(B, H, D, S)``.
_PER_HEAD = (0, 1, 3, 2)
_RESHAPES = ("view", "reshape")


@functools.cache
def heads_layout(to_alt: tuple[int, ...]) -> Layout:
    """The layout of a 4-D value carried as ``(B, H, D, S)``: the original is ``alt.permute(inverse of to_alt)``.
    One object per permutation, so layouts compare by identity; NCHW's permutation is :data:`~.layouts.NCHW_LAYOUT`
    (a channels-last map regrouped by a reshape, as timm's Swin merges its windows back, is the conv rules' NCHW)."""
    return NCHW_LAYOUT if to_alt == NCHW_LAYOUT.to_alt else permutation_layout(f"heads{to_alt}", to_alt)


def _is_heads(layout: Layout) -> bool:
    return layout.to_alt is not None and layout is heads_layout(layout.to_alt)


def _reshape_input(node: fx.Node) -> fx.Node | None:
    """``x`` of ``x.view(...)`` / ``x.reshape(...)`` / ``torch.reshape(x, ...)``."""
    if (
        node.op == "call_method"
        and node.target in _RESHAPES
        or node.op == "call_function"
        and node.target in (torch.reshape, torch.ops.aten.view.default, torch.ops.aten.reshape.default)
    ):
        return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    return None


class HeadSplit:
    """Tokens carried as ``(B, C, 1, S)`` viewed as heads ``(B, S, H, D)`` are ``(B, H, D, S)``; viewed as
    ``(B, S, K, H, D)`` (timm's fused q/k/v, ``K`` = 3) they are ``(B, K, H, D, S)``."""

    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        x = _reshape_input(node)
        carried = rw.carried(x)
        if carried is None or carried[1] is not TOKEN_LAYOUT:
            return False
        shape, out = shape_of(x), shape_of(node)
        if shape is None or out is None or len(shape) != 3 or len(out) not in _SPLIT_BY_RANK:
            return False
        if tuple(out[:2]) != tuple(shape[:2]) or math.prod(out[2:]) != shape[2]:
            return False
        with rw.graph.inserting_before(node):
            flat = rw.graph.call_function(torch.flatten, (carried[0], 2))  # (B, C, S)
            alt = rw.graph.call_method("unflatten", (flat, 1, tuple(out[2:])))
        rw.set_alt(node, alt, heads_layout(_SPLIT_BY_RANK[len(out)]))
        return True


def _transpose_dims(node: fx.Node) -> tuple[int, ...] | None:
    """The permutation ``x.transpose(a, b)`` / ``torch.transpose(x, a, b)`` applies to a 4-D ``x``."""
    if not (
        node.op == "call_method"
        and node.target == "transpose"
        or node.op == "call_function"
        and node.target is torch.transpose
    ):
        return None
    a, b = node.args[1:3] if len(node.args) == 3 else (None, None)
    if not isinstance(a, int) or not isinstance(b, int):
        return None
    dims = [0, 1, 2, 3]
    dims[a % 4], dims[b % 4] = dims[b % 4], dims[a % 4]
    return tuple(dims)


class HeadPermute:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if not node.args or not isinstance(node.args[0], fx.Node):
            return False
        carried = rw.carried(node.args[0])
        if carried is None or not _is_heads(carried[1]):
            return False
        dims = permute_dims(node) or _transpose_dims(node)
        before = carried[1].to_alt
        assert before is not None
        if dims is None or len(dims) != len(before):
            return False
        # alt = x.permute(before) and node = x.permute(dims): alt = node.permute(r) with dims[r[i]] = before[i]
        after = tuple(dims.index(d) for d in before)
        if after == (0, 1, 2, 3):
            return False  # the node is the carried value itself: converting back is one permute either way
        rw.set_alt(node, carried[0], heads_layout(after))
        return True


class SameShape:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        x = _reshape_input(node)
        carried = rw.carried(x)
        if carried is None or not _is_heads(carried[1]) or shape_of(node) is None or shape_of(node) != shape_of(x):
            return False
        rw.set_alt(node, carried[0], carried[1])
        return True


class HeadMerge:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        x = _reshape_input(node)
        carried = rw.carried(x)
        if carried is None or carried[1] is not heads_layout(_SPLIT):
            return False
        shape, out = shape_of(x), shape_of(node)
        if shape is None or out is None or len(out) != 3 or out != (shape[0], shape[1], shape[2] * shape[3]):
            return False
        with rw.graph.inserting_before(node):
            flat = rw.graph.call_function(torch.flatten, (carried[0], 1, 2))  # (B, C, S)
            rw.set_alt(node, rw.graph.call_method("unsqueeze", (flat, 2)), TOKEN_LAYOUT)
        return True


class HeadCat:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if not (node.op == "call_function" and node.target in (torch.cat, torch.ops.aten.cat.default)):
            return False
        parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(parts, (list, tuple)) or not isinstance(dim, int) or len(node.args) + len(node.kwargs) > 2:
            return False
        # (a 1-D empty tensor, an empty cache's past keys, is skipped by ``torch.cat``)
        if not all(isinstance(p, fx.Node) for p in parts):
            return False
        nodes = [p for p in parts if isinstance(p, fx.Node) and shape_of(p) != (0,)]
        layouts = {id(c[1]): c[1] for c in map(rw.carried, nodes) if c is not None}
        if len(layouts) != 1 or not all(len(shape_of(p) or ()) == 4 for p in nodes):
            return False
        layout = next(iter(layouts.values()))
        if not _is_heads(layout):
            return False
        assert layout.to_alt is not None
        with rw.graph.inserting_before(node):
            alts = [rw.enter(p, layout, node.name) for p in nodes]
            rw.set_alt(node, rw.graph.call_function(torch.cat, (alts, layout.to_alt.index(dim % 4))), layout)
        return True


_SPLITS = (
    torch.split,
    torch.chunk,
    torch.ops.aten.split.Tensor,
    torch.ops.aten.split_with_sizes.default,
    torch.ops.aten.chunk.default,
)


def _split_args(node: fx.Node) -> tuple[fx.Node, list[int], int] | None:
    """``(x, sizes, dim)`` of ``x.split(...)`` / ``x.chunk(...)`` (``torch.``, ``aten.``), the sizes of the parts
    read from the propagated shapes (the split size may be a traced value)."""
    if not (
        node.op == "call_method"
        and node.target in ("split", "chunk")
        or node.op == "call_function"
        and node.target in _SPLITS
    ):
        return None
    x, parts = node.args[0] if node.args else None, node.meta.get("val")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if not isinstance(x, fx.Node) or not isinstance(dim, int) or not isinstance(parts, (tuple, list)):
        return None
    try:
        return x, [int(p.shape[dim]) for p in parts], dim
    except (AttributeError, IndexError, TypeError):  # not tensors, or symbolic sizes
        return None


class SplitChannels:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        args = _split_args(node)
        if args is None:
            return False
        x, sizes, dim = args
        carried, shape = rw.carried(x), shape_of(x)
        if carried is None or carried[1] is not TOKEN_LAYOUT or shape is None or dim % len(shape) != 2:
            return False
        items = list(node.users)
        if not all(
            u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int) for u in items
        ):
            return False  # the tuple itself is used: it cannot be carried
        with rw.graph.inserting_before(node):
            parts = rw.graph.call_method("split", (carried[0], sizes, 1))
            rw.set_alt(node, parts, TOKEN_LAYOUT)  # only its items are read, each carried
            for u in items:
                rw.set_alt(u, rw.graph.call_function(operator.getitem, (parts, u.args[1])), TOKEN_LAYOUT)
        return True


_SDPA = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class ChannelAttention:
    def __init__(self, sdpa: bool = False) -> None:
        self.sdpa = sdpa  # quantize=: SDPA itself on permuted views

    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if not (node.op == "call_function" and node.target is F.scaled_dot_product_attention):
            return False
        args = dict(zip(_SDPA, node.args), **node.kwargs)
        layout = heads_layout(_PER_HEAD)
        qkv = [args.get(k) for k in _SDPA[:3]]
        if not all(isinstance(t, fx.Node) for t in qkv):
            return False
        if not any((rw.carried(t) or (None, None))[1] is layout for t in qkv):
            return False  # nothing here is carried per head
        if args.get("dropout_p", 0.0) != 0.0 or args.get("enable_gqa", False):
            return False  # random (training) or grouped-query attention: left in its layout
        shapes = [shape_of(t) for t in qkv]
        if any(s is None or len(s) != 4 for s in shapes) or len({s[:2] for s in shapes if s}) != 1:
            return False
        mask = args.get("attn_mask")
        if isinstance(mask, fx.Node):
            mask = rw.exit_of(mask)
        q, k, v = qkv
        assert isinstance(q, fx.Node) and isinstance(k, fx.Node) and isinstance(v, fx.Node)
        # keys and values not carried per head (a static KV cache's buffers) are read in their own layout
        own = [(rw.carried(t) or (None, None))[1] is not layout for t in (k, v)]
        with rw.graph.inserting_before(node):
            q, k, v = (
                rw.enter(q, layout, node.name),
                *(rw.exit_of(t) if o else rw.enter(t, layout, node.name) for t, o in zip((k, v), own)),
            )
            out = rw.graph.call_function(
                _runtime.attention_channels,
                (
                    q,
                    k,
                    v,
                    mask,
                    bool(args.get("is_causal", False)),
                    args.get("scale"),
                    *("bhtd" if o else "bhdt" for o in own),
                    self.sdpa,
                ),
            )
        rw.set_alt(node, out, layout)
        return True


def _as_is(graph: fx.Graph, x: fx.Node, site: str) -> fx.Node:
    return x


#: A value replaced by a node that computes it in its own layout (the scores ``q @ k^T``): no conversion either way.
_SAME = Layout("same", _as_is, lambda graph, alt, orig: alt)


def _key_transposed(node: object, rw: RuleContext) -> fx.Node | None:
    """The per-head alt ``(B, H, D, T)`` of ``k`` when ``node`` is ``k.transpose(-2, -1)`` of keys carried per
    head."""
    if not isinstance(node, fx.Node) or _transpose_dims(node) != (0, 1, 3, 2) and permute_dims(node) != (0, 1, 3, 2):
        return None
    carried = rw.carried(node.args[0])
    return carried[0] if carried is not None and carried[1] is heads_layout(_PER_HEAD) else None


_MATMULS = (torch.matmul, operator.matmul, torch.ops.aten.matmul.default)  # (``q @ k`` is ``operator.matmul``)


class ChannelMatmul:
    def __init__(self, matmul: bool = False) -> None:
        self.matmul = matmul  # quantize=: matrix products of permuted operands, not Einsums

    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if not (node.op == "call_function" and node.target in _MATMULS and len(node.args) == 2) or node.kwargs:
            return False
        a, b = node.args
        shapes = [shape_of(a), shape_of(b)]
        if any(s is None or len(s) != 4 for s in shapes) or not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            return False
        per_head = heads_layout(_PER_HEAD)
        left, key = rw.carried(a), _key_transposed(b, rw)
        with rw.graph.inserting_before(node):
            if left is not None and left[1] is per_head and key is not None:  # scores = q @ k^T
                scores = (
                    rw.graph.call_function(torch.matmul, (rw.graph.call_function(_runtime.swap_last, (left[0],)), key))
                    if self.matmul
                    else rw.graph.call_function(torch.einsum, ("bhds,bhdt->bhst", left[0], key))
                )
                rw.set_alt(node, scores, _SAME)
                return True
            right = rw.carried(b)
            if right is not None and right[1] is per_head:  # out = p @ v, carried per head
                p = rw.exit_of(a)
                out = (
                    rw.graph.call_function(torch.matmul, (right[0], rw.graph.call_function(_runtime.swap_last, (p,))))
                    if self.matmul
                    else rw.graph.call_function(torch.einsum, ("bhst,bhdt->bhds", p, right[0]))
                )
                rw.set_alt(node, out, per_head)
                return True
        return False
