"""What every conv -> Linear rule shares: the checks on the conv itself, and the two rewrites.

* Pointwise: a ``Conv2d(C, O, 1)`` computes ``y[n, o, h, w] = b[o] + sum_c K[o, c] x[n, c, h, w]``: a
  ``Linear(C -> O)`` with weight ``K.view(O, C)`` at every pixel, on the map carried channels-last (or as ``(N, C)``
  when it is 1x1). Consecutive pointwise convs and the elementwise ops between them share one permute in and out.
  With stride ``s`` it reads only every ``s``-th pixel: ``x[:, :, ::s, ::s]`` first.
* Full extent: a conv whose kernel covers its whole input (padding 0, dilation 1) is ``Linear(C*H*W -> O)`` on
  ``flatten(x, 1)`` with weight ``K.view(O, C*H*W)``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxsurgery.engine.emit import guard
from fxsurgery.engine.nodes import CONV_TYPES, ConvOp, as_conv, static_shape
from fxsurgery.engine.rule import Match, RuleContext, Skip, module_skip_reason
from fxsurgery.engine.weights import conv_to_linear_weight, conv_transpose_to_linear_weight
from fxsurgery.report import Site
from fxsurgery.rules.conv_to_linear.layouts import CHANNELS_LAST, FLAT_LAYOUT

__all__ = [
    "ConvMatch",
    "PointwiseRule",
    "candidate",
    "check_conv",
    "pointwise_to_linear",
    "full_extent_to_linear",
    "linear_from_conv",
]


@dataclass(frozen=True)
class ConvMatch(Match):
    """A conv to rewrite: the module, its input and the input's static shape."""

    op: ConvOp
    x: fx.Node
    shape: tuple[int, ...]

    @property
    def module(self) -> Any:
        return self.op.module


def candidate(node: fx.Node, rw: RuleContext) -> ConvOp | None:
    """A conv that is a Linear in disguise: a pointwise kernel, or a kernel as large as its input."""
    op = as_conv(node, rw.modules)
    return op if op is not None and (op.pointwise or op.full_extent) else None


def padding_of(mod: Any) -> tuple[int, ...] | str:
    """The padding as numbers; ``"valid"``/``"same"`` are zero on a pointwise kernel."""
    pointwise = all(k == 1 for k in mod.kernel_size)
    return (0,) * len(mod.kernel_size) if mod.padding in ("valid", "same") and pointwise else mod.padding


def check_conv(node: fx.Node, rw: RuleContext, name: str) -> ConvMatch:
    """The checks every conv site shares; :class:`Skip` when the layer itself cannot be replaced."""
    op = as_conv(node, rw.modules)
    assert op is not None
    mod = op.module
    exact = (type(mod),) if type(mod) in CONV_TYPES else (next(t for t in CONV_TYPES if isinstance(mod, t)),)
    reason = module_skip_reason(name, mod, exact, rw)
    if reason:
        raise Skip(reason)
    if not isinstance(node.args[0] if node.args else None, fx.Node) or len(node.args) != 1 or node.kwargs:
        raise Skip("called with extra arguments (output_size?)")
    x = node.args[0]
    assert isinstance(x, fx.Node)
    shape = static_shape(x, "the conv input")
    if len(shape) != mod.weight.dim():
        raise Skip(f"unbatched {len(shape)}-D input")
    padding = padding_of(mod)
    if isinstance(padding, str):
        raise Skip(f"padding={padding!r} on a {'x'.join(map(str, mod.kernel_size))} kernel")
    if mod.groups != 1:
        raise Skip(f"groups={mod.groups}")
    return ConvMatch(node, name, op, x, shape)


def check_pointwise_padding(m: ConvMatch) -> None:
    padding = padding_of(m.module)
    if any(padding):
        raise Skip(f"padding={tuple(padding)} (a padded 1x1 conv adds a border of bias-only outputs)")


def check_full_extent(m: ConvMatch) -> None:
    """Skip unless the kernel covers the whole unpadded input, without dilation."""
    mod, spatial = m.module, m.shape[2:]
    kernel, padding = tuple(mod.kernel_size), padding_of(mod)
    if kernel == tuple(spatial) and not any(padding):
        if any(d != 1 for d in mod.dilation):
            raise Skip(f"dilation={tuple(mod.dilation)}")
        return
    k, s = "x".join(map(str, kernel)), "x".join(map(str, spatial))
    extra = f" with padding={tuple(padding)}" if any(padding) else ""
    raise Skip(f"kernel {k}{extra} is neither pointwise nor the full {s} input")


def linear_from_conv(conv: Any) -> nn.Linear:
    """A Linear whose weight is a view of ``conv``'s kernel and whose bias is ``conv``'s own."""
    if isinstance(conv, nn.ConvTranspose2d):
        weight = conv_transpose_to_linear_weight(conv.weight.detach())
    else:
        weight = conv_to_linear_weight(conv.weight.detach())
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=conv.bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        lin.bias = conv.bias
    lin.train(conv.training)
    return lin


def _pointwise_source(m: ConvMatch, rw: RuleContext, layout: Any, stride: tuple[int, ...]) -> fx.Node:
    if not any(s != 1 for s in stride) or layout is FLAT_LAYOUT:
        return rw.enter(m.x, layout, m.name)
    carried = rw.carried(m.x)
    if carried is not None and carried[1] is layout:  # slice channels-last: N, *spatial, C
        index = (slice(None), *(slice(None, None, s) for s in stride), slice(None))
        return rw.graph.call_function(operator.getitem, (carried[0], index))
    index = (slice(None), slice(None), *(slice(None, None, s) for s in stride))
    return rw.enter(rw.graph.call_function(operator.getitem, (rw.exit_of(m.x), index)), layout, m.name)


def pointwise_to_linear(m: ConvMatch, rw: RuleContext, pattern: str) -> Site:
    """A pointwise conv (any stride) as a Linear on the map carried channels-last, or on ``(N, C)`` at 1x1."""
    mod, shape = m.module, m.shape
    stride = tuple(mod.stride)
    strided = any(s != 1 for s in stride)
    out_spatial = tuple(math.ceil(d / s) for d, s in zip(shape[2:], stride))
    carried = rw.carried(m.x)
    if carried is not None:
        layout = carried[1]
    elif len(shape) == 4 and all(d == 1 for d in out_spatial) and not strided:
        layout = FLAT_LAYOUT
    else:
        layout = CHANNELS_LAST[len(shape)]
    with rw.graph.inserting_before(m.node):
        src = _pointwise_source(m, rw, layout, stride)
        rw.new_modules[m.name] = linear_from_conv(mod)
        lin = rw.graph.call_module(m.name, (src,))
    rw.set_alt(m.node, lin, layout)
    kind = "ConvTranspose2d" if m.op.transposed else type(mod).__name__
    spatial = "x".join(map(str, shape[2:]))
    step = f" stride {'x'.join(map(str, stride))}," if strided else ""
    where = "(N, C)" if layout is FLAT_LAYOUT else "channels-last"
    return Site(
        m.name,
        pattern,
        "rewritten",
        before=f"{kind}({shape[1]}, {mod.out_channels}, 1){step} on {spatial}",
        after=f"{'slice + ' if strided else ''}Linear({shape[1]}->{mod.out_channels}) {where}",
        input_shape=tuple(shape),
    )


def full_extent_to_linear(m: ConvMatch, rw: RuleContext, pattern: str) -> Site:
    """A conv whose kernel covers its input as ``flatten`` + Linear, the output carried as ``(N, O)``."""
    mod, shape = m.module, m.shape
    with rw.graph.inserting_before(m.node):
        checked = guard(rw.graph, rw.exit_of(m.x), tuple(shape[2:]), m.name, original_rejects=False)
        flat = rw.graph.call_function(torch.flatten, (checked, 1))
        rw.new_modules[m.name] = linear_from_conv(mod)
        lin = rw.graph.call_module(m.name, (flat,))
    if len(shape) == 4:
        rw.set_alt(m.node, lin, FLAT_LAYOUT)
    else:
        with rw.graph.inserting_after(lin):
            back = rw.graph.call_method("unsqueeze", (lin, -1))
        m.node.replace_all_uses_with(back)
        rw.graph.erase_node(m.node)
    spatial = "x".join(map(str, shape[2:]))
    before = f"{type(mod).__name__}({shape[1]}, {mod.out_channels}, kernel={spatial}) on {spatial}"
    after = f"flatten + Linear({math.prod(shape[1:])}->{mod.out_channels})"
    return Site(m.name, pattern, "rewritten", before=before, after=after, input_shape=tuple(shape))


class PointwiseRule:
    """Base of the two pointwise Conv2d rules: they differ only in whether the stride is 1 (``strided``)."""

    pattern = ""
    strided = False

    def claims(self, node: fx.Node, rw: RuleContext) -> str | None:
        op = candidate(node, rw)
        if op is None or not isinstance(op.module, nn.Conv2d) or not op.pointwise:
            return None
        return op.name if any(s != 1 for s in op.module.stride) == self.strided else None

    def match(self, node: fx.Node, rw: RuleContext) -> ConvMatch:
        m = check_conv(node, rw, str(node.target))
        check_pointwise_padding(m)
        return m

    def apply(self, m: ConvMatch, rw: RuleContext) -> Site:
        return pointwise_to_linear(m, rw, self.pattern)
