"""``flatten->linear``: a Linear on a flattened 4-D feature map becomes an HxW convolution on the map.

``Linear(C*H*W -> O)`` fed by an order-preserving reshape of ``Y (N, C, H, W)`` (``torch.flatten(x, 1)``,
``x.flatten(1)``, ``nn.Flatten()``, ``x.view(x.size(0), -1)``, ``x.reshape(x.shape[0], -1)``, ``x.view(-1, K)``,
``x.squeeze(-1).squeeze(-1)``, after ``.contiguous()``) computes
``y[n, o] = b[o] + sum_{c,h,w} W[o, c*H*W + h*W + w] * Y[n, c, h, w]``: exactly ``Conv2d(C, O, (H, W))`` with kernel
``W.view(O, C, H, W)`` at its single output position. If ``Y`` is ``Z.permute(0, a, b, c)`` (a channels-last
flatten), the conv reads ``Z`` and the kernel is the permuted view ``W.view(O, *Y.shape[1:]).permute(...)``.
Elementwise ops between the flatten and the Linear (``flatten -> Dropout -> Linear``) run on the map instead. A
run-time check keeps the rewritten model rejecting feature-map sizes that the original rejects. This rule is the
last of its set: it claims every Linear no other rule claimed, and says why the rest are skipped.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from fxsurgery.engine.elementwise import elementwise_tensor_inputs
from fxsurgery.engine.emit import check_replayable, guard, replay
from fxsurgery.engine.layout import Layout, permute_dims
from fxsurgery.engine.nodes import as_linear, hook_kinds, is_reshape, is_shape_read, static_shape
from fxsurgery.engine.rule import RuleContext, Skip
from fxsurgery.engine.weights import linear_to_conv_weight
from fxsurgery.rules.linear_to_conv._plan import ConvPlan, LinearRule, WeightMap, check_linear
from fxsurgery.rules.linear_to_conv.layouts import SPATIAL_LAYOUT, from_map

__all__ = ["FlattenHead", "PATTERN", "flatten_source"]

PATTERN = "flatten->linear"


def _check_batch_safe(node: fx.Node) -> None:
    """Reject reshapes that only flatten correctly at the traced batch size."""
    squeeze = node.target == "squeeze" or node.target is torch.squeeze
    if squeeze and len(node.args) < 2 and "dim" not in node.kwargs:
        raise Skip(f"{node.name}: squeeze() without dims also drops a batch of size 1")
    if node.target in ("view", "reshape") or node.target is torch.reshape:
        shape = node.args[1:] if node.op == "call_method" else node.args[1:2]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        first = shape[0] if shape else None
        if isinstance(first, int) and first != -1:
            raise Skip(f"{node.name}: the reshape hard-codes the batch size ({first}); use x.size(0) or -1")
        if isinstance(first, fx.Node) and not _reads_batch_size(first):
            raise Skip(
                f"{node.name}: the reshape's first dim is computed ({first.name}), not read as the batch size "
                "(x.size(0)) or -1: at another batch size it need not keep the samples apart"
            )


def _reads_batch_size(node: fx.Node) -> bool:
    """``x.size(0)``, ``x.shape[0]`` (fx) or ``aten.sym_size.int(x, 0)`` (torch.export): a read of some tensor's dim 0,
    not a value computed from it (MultiheadAttention's ``view(bsz * tgt_len, embed_dim)`` equals the batch size when
    both are 1)."""
    if node.op == "call_method" and node.target == "size":
        return node.args[1:2] == (0,) or bool(node.kwargs.get("dim") == 0)
    if node.op == "call_function" and node.target is torch.ops.aten.sym_size.int:
        return node.args[1:2] == (0,)
    if node.op == "call_function" and node.target is operator.getitem and node.args[1:2] == (0,):
        return is_shape_read(node.args[0])
    return False


def flatten_source(x: fx.Node, rw: RuleContext) -> tuple[fx.Node, list[tuple[fx.Node, fx.Node]]] | None:
    """The 4-D node whose flatten is ``x``, walking back through order-preserving reshapes, and the elementwise ops
    met on the way with their tensor input, first to last; None if there is none."""
    n = static_shape(x, "the Linear input")[0]
    cur: Any = x
    ops: list[tuple[fx.Node, fx.Node]] = []
    while isinstance(cur, fx.Node):
        if cur.op == "call_module" and hook_kinds(rw.modules[str(cur.target)]):
            raise Skip(f"{cur.target} has hooks that must see what they saw before; left as it is")
        if is_reshape(cur, rw.modules) and isinstance(cur.args[0], fx.Node):
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


class FlattenHead(LinearRule):
    """Every Linear no earlier rule claimed: rewritten when it reads a flattened 4-D map, else skipped with why."""

    pattern = PATTERN

    def __init__(self, point: Layout = SPATIAL_LAYOUT, weight_map: WeightMap = linear_to_conv_weight) -> None:
        super().__init__(weight_map)
        self.point = point

    def claims(self, node: fx.Node, rw: RuleContext) -> str | None:
        op = as_linear(node, rw.modules)
        return None if op is None else op.name

    def match(self, node: fx.Node, rw: RuleContext) -> ConvPlan | Skip:
        op, in_f, out_f, x_shape = check_linear(node, rw)
        if len(x_shape) == 4:
            return Skip(
                "input is a 4-D channels-last (N, H, W, C) tensor that is not a permute of an NCHW map "
                "(Swin/MaxViT-style blocks: pass token_layout=True to carry it as NCHW)"
            )
        if len(x_shape) == 3:
            return Skip(
                "input is (B, S, C) tokens, not a flattened or pooled 4-D feature map (pass "
                "token_layout=True to carry tokens as (B, C, 1, S))"
            )
        if len(x_shape) != 2:
            return Skip(f"input is {len(x_shape)}-D, not a flattened or pooled 4-D feature map")
        found = flatten_source(op.input, rw)
        if found is None:
            return Skip(f"input ({op.input.name}) is not a flattened or pooled 4-D feature map")
        y, elementwise = found
        check_replayable(elementwise, y, rw.modules)
        y_shape = static_shape(y, "the flattened map")
        order = None
        dims = permute_dims(y)
        # a flatten of a permuted map reads the map before the permute; but a permute to NCHW of a channels-last
        # value (timm's LayerNorm2d: permute(0, 2, 3, 1), LayerNorm, permute(0, 3, 1, 2)) *is* the map
        if dims is not None and len(dims) == 4 and dims[0] == 0 and dims != (0, 3, 1, 2):
            order = tuple(d - 1 for d in dims[1:])
            y = y.args[0]  # type: ignore[assignment]
            y_shape = static_shape(y, "the permuted map")
        c, h, w = y_shape[1:]
        name, point = op.name, self.point

        def source(rw: RuleContext) -> fx.Node:
            src = guard(rw.graph, y, (h, w), name, original_rejects=True, features=in_f)
            src = replay(rw.graph, elementwise, src)  # on the map, before the flatten they followed
            return from_map(rw.graph, src, (c, h, w), point)

        before = f"Linear({in_f}->{out_f}) on flatten({c}x{h}x{w}{' permuted' if order else ''})"
        return ConvPlan(node, name, op, in_f, out_f, x_shape, point, (c, h, w), before, source, order)
