"""What every Linear -> conv rule shares: the checks on the Linear itself, and the emission of the conv.

A rule's ``match`` returns a :class:`ConvPlan`: the map the conv reads (``feature = (C, H, W)``, flattened in
``order``), the layout of its output, and a ``source`` that builds the conv's input in the graph. ``apply`` is
:func:`emit_conv` for every Linear pattern. The maths: ``Linear(C*H*W -> O)`` on ``flatten(Y)`` is
``Conv2d(C, O, (H, W))`` on ``Y`` with kernel ``W.view(O, C, H, W)`` (:func:`~fxsurgery.engine.weights.
linear_to_conv_weight`), evaluated at its single output position; on a value carried with its features on dim 1
(``(N, K, 1, 1)``, ``(B, C, 1, S)``, NCHW) it is a 1x1 conv.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
import torch.nn.functional as F

from fxsurgery.engine.layers import conv_viewing_linear
from fxsurgery.engine.layout import Layout
from fxsurgery.engine.nodes import EXACT_LINEAR, LinearOp, as_linear, static_shape
from fxsurgery.engine.rule import Match, RuleContext, Skip, module_skip_reason, weight_skip_reason
from fxsurgery.engine.weights import linear_to_conv_weight
from fxsurgery.report import Site
from fxsurgery.rules.linear_to_conv.layouts import NCHW_LAYOUT, TOKEN_LAYOUT, conv_layout, tokens_of_rows

__all__ = [
    "ConvPlan",
    "LinearRule",
    "linear_input",
    "linear_name",
    "check_linear",
    "carried_plan",
    "region_plan",
    "emit_conv",
]

WeightMap = Callable[..., Any]


@dataclass(frozen=True)
class ConvPlan(Match):
    """A Linear to rewrite as a conv on the map ``feature`` (``(C, H, W)``), its output carried in ``layout``."""

    op: LinearOp
    in_features: int
    out_features: int
    x_shape: tuple[int, ...]
    layout: Layout
    feature: tuple[int, int, int]
    before: str
    source: Callable[[RuleContext], fx.Node]
    order: tuple[int, ...] | None = None


def linear_name(node: fx.Node) -> str:
    """The site name of a Linear call: :attr:`~fxsurgery.engine.nodes.LinearOp.name`."""
    op = as_linear(node, {}) if node.op == "call_function" else None
    return op.name if op is not None else str(node.target) if node.op == "call_module" else node.name


def linear_input(node: fx.Node, rw: RuleContext) -> Any:
    """The input of the Linear ``node`` computes, or None when ``node`` is no Linear."""
    op = as_linear(node, rw.modules)
    return None if op is None else op.input


def check_linear(node: fx.Node, rw: RuleContext) -> tuple[LinearOp, int, int, tuple[int, ...]]:
    """The Linear at ``node``, its ``(in_features, out_features)`` and input shape; :class:`Skip` when the layer
    itself cannot be replaced (hooks, subclass, shared, tied, parametrized, no static shapes)."""
    op = as_linear(node, rw.modules)
    if op is None:
        raise Skip("not a Linear")
    if op.module is not None:
        reason = module_skip_reason(op.name, op.module, (type(op.module),) if op.transposed else EXACT_LINEAR, rw)
        if reason:
            raise Skip(reason)
    if not isinstance(op.input, fx.Node):
        raise Skip("the input is not a graph value")
    if op.module is None and not isinstance(op.weight, fx.Node):
        raise Skip("the weight is not a graph value")
    reason = weight_skip_reason(op.weight, rw, node) if op.module is None else None
    if reason:
        raise Skip(reason)
    x_shape = static_shape(op.input, "the Linear input")
    in_features, out_features = op.features()
    return op, in_features, out_features, x_shape


def carried_plan(node: fx.Node, rw: RuleContext, name: str, on: str | None = None) -> ConvPlan:
    """A Linear on a value already carried in a conv layout: a 1x1 conv on the counterpart. ``on`` describes the
    input for the report (default: the layout it is carried in)."""
    op, in_f, out_f, x_shape = check_linear(node, rw)
    alt, layout = rw.alt[op.input]
    if not conv_layout(layout):
        raise Skip(f"the input is carried in layout {layout.name}")
    before = f"Linear({in_f}->{out_f}) {on or f'on a value already carried as {layout.name}'}"
    return ConvPlan(node, name, op, in_f, out_f, x_shape, layout, (in_f, 1, 1), before, lambda rw: alt)


def region_plan(node: fx.Node, rw: RuleContext, name: str, layout: Layout, on: str) -> ConvPlan:
    """A Linear on a value not yet carried (token layout): the value enters ``layout`` here."""
    op, in_f, out_f, x_shape = check_linear(node, rw)
    x = op.input
    return ConvPlan(
        node,
        name,
        op,
        in_f,
        out_f,
        x_shape,
        layout,
        (in_f, 1, 1),
        f"Linear({in_f}->{out_f}) on {on}",
        lambda rw: rw.enter(x, layout, name),
    )


def emit_conv(plan: ConvPlan, rw: RuleContext, pattern: str, weight_map: WeightMap = linear_to_conv_weight) -> Site:
    """Replace the planned Linear by its conv (a module viewing the Linear's weight, or ``F.conv2d`` on a view of a
    functional weight) and carry its output in the plan's layout."""
    op, feature, order = plan.op, plan.feature, plan.order
    if math.prod(feature) != plan.in_features:
        raise Skip(f"in_features={plan.in_features} does not match the {feature} map")
    kernel = (feature[1], feature[2])
    with rw.graph.inserting_before(plan.node):
        src = plan.source(rw)
        if op.module is None:
            flat = tuple(feature[d] for d in (order or (0, 1, 2)))
            w4 = rw.graph.call_method("view", (op.weight, (plan.out_features, *flat)))
            if order:
                w4 = rw.graph.call_method("permute", (w4, (0, *(1 + order.index(d) for d in range(3)))))
            conv = rw.graph.call_function(F.conv2d, (src, w4, op.bias, kernel))
        else:
            lin = op.module
            rw.new_modules[plan.name] = conv_viewing_linear(
                op.module_weight, lin.bias, lin.training, feature, order, weight_map=weight_map
            )
            conv = rw.graph.call_module(plan.name, (src,))
    rw.set_alt(plan.node, conv, plan.layout)
    after = f"Conv2d({feature[0]}, {plan.out_features}, kernel={kernel[0]}x{kernel[1]}) {plan.layout.name}"
    x_shape = plan.x_shape
    # the map the conv reads: NCHW of a channels-last input (N, H, W, K), tokens (B, S, K) as they come, or
    # (N, C, H, W) of a flatten
    reads = (
        (x_shape[0], plan.in_features, *x_shape[1:3])
        if plan.layout is NCHW_LAYOUT
        else tuple(x_shape)
        if plan.layout is TOKEN_LAYOUT or tokens_of_rows(plan.layout)
        else (x_shape[0], *feature)
    )
    return Site(plan.name, pattern, "rewritten", before=plan.before, after=after, input_shape=tuple(reads))


class LinearRule:
    """Base of the Linear rules: ``apply`` is :func:`emit_conv`; a subclass says which Linears it ``claims`` and
    how it ``match``es them. ``weight_map`` maps a Linear weight to the conv kernel (a view)."""

    pattern = ""

    def __init__(self, weight_map: WeightMap = linear_to_conv_weight) -> None:
        self.weight_map = weight_map

    def apply(self, plan: ConvPlan, rw: RuleContext) -> Site:
        return emit_conv(plan, rw, self.pattern, self.weight_map)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
