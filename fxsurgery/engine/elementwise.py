"""Which graph nodes are elementwise, so they can run unchanged in another layout of the same values."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxsurgery.capture.shapes import shape_of
from fxsurgery.engine.nodes import hook_kinds

__all__ = ["elementwise_tensor_inputs", "is_number", "no_nodes", "UNARY_MODULES"]

# Modules whose output at each position depends only on the input at that position (in eval mode and, for dropout,
# in distribution in train mode). Dropout2d/3d drop whole channels and are deliberately absent.
UNARY_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Mish,
    nn.Softplus,
    nn.Hardtanh,
    nn.Identity,
    nn.Dropout,
    nn.AlphaDropout,
    nn.Tanhshrink,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Threshold,
)
_UNARY_FUNCTIONS: set[Any] = {
    torch.relu,
    torch.relu_,
    F.relu,
    F.relu_,
    F.relu6,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.mish,
    F.softplus,
    F.hardtanh,
    F.dropout,
    F.alpha_dropout,
    torch.dropout,
    torch.exp,
    torch.abs,
    torch.neg,
    operator.neg,
    torch.clamp,
    torch.clip,
    torch.square,
    torch.sqrt,
    torch.rsqrt,
    torch.erf,
    F.logsigmoid,
    F.softsign,
    F.tanhshrink,
    torch.dropout_,
    F.hardtanh_,
    torch._C._nn.silu_,
    torch._C._nn.hardswish_,  # what the export front end raises
}
_UNARY_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "exp",
    "abs",
    "neg",
    "clamp",
    "clamp_",
    "clip",
    "square",
    "sqrt",
    "rsqrt",
    "erf",
    "contiguous",
    "clone",
}
_BINARY_FUNCTIONS: set[Any] = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.imul,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float, bool)) and not isinstance(x, fx.Node)


def no_nodes(values: Any) -> bool:
    """Whether ``values`` (args, kwargs, nested) hold no graph node."""
    found: list[fx.Node] = []
    fx.map_arg(values, found.append)
    return not found


def elementwise_tensor_inputs(node: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node] | None:
    """The tensor inputs of ``node`` if it is elementwise with no broadcasting, else None.

    Such a node computes the same values whatever the layout of its inputs, as long as all of them share one
    layout; the output then has that layout too.
    """
    out_shape = shape_of(node)
    if out_shape is None:
        return None
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        if mod is None or hook_kinds(mod):
            return None  # a hooked module must see its input in its own layout
        if type(mod) in UNARY_MODULES and len(node.args) == 1 and not node.kwargs:
            return [node.args[0]] if isinstance(node.args[0], fx.Node) else None
        return None
    if (
        node.op == "call_function"
        and node.target in _UNARY_FUNCTIONS
        or (node.op == "call_method" and node.target in _UNARY_METHODS)
    ):
        if node.args and isinstance(node.args[0], fx.Node) and no_nodes((node.args[1:], node.kwargs)):
            return [node.args[0]] if shape_of(node.args[0]) == out_shape else None
        return None
    if (
        node.op == "call_function"
        and node.target in _BINARY_FUNCTIONS
        or (node.op == "call_method" and node.target in _BINARY_METHODS)
    ):
        if len(node.args) != 2 or not no_nodes(node.kwargs):
            return None
        tensors = []
        for a in node.args:
            if isinstance(a, fx.Node) and shape_of(a) == out_shape:
                tensors.append(a)
            elif not is_number(a):
                return None  # a broadcast tensor, or a value we cannot see
        return tensors or None
    return None
