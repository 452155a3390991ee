"""An op-normalising view of graph nodes: rules ask "is this a Linear?", "is this a spatial mean?", not "is this a
``call_module`` of ``nn.Linear``?".

Each ``as_*`` function returns a small record of the op's operands, or None when the node is not that op. A module
call (``self.fc(x)``, also ``self.fc(input=x)``) and the functional form (``F.linear(x, w, b)``) give the same
record, so one rule serves both; a further front end (ATen graphs) adds its spellings here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxsurgery.capture.layers import is_transposed_linear
from fxsurgery.capture.shapes import shape_of

__all__ = [
    "LinearOp",
    "ConvOp",
    "as_linear",
    "as_conv",
    "as_layer_norm",
    "spatial_mean_source",
    "is_reshape",
    "first_input",
    "reader_name",
    "bind",
    "is_torchvision",
    "static_shape",
    "NoShape",
    "hook_kinds",
    "writes_in_place",
    "is_shape_read",
]

#: Linear layers whose forward is exactly ``F.linear`` (MultiheadAttention's out_proj is the second).
EXACT_LINEAR: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)

# Order-preserving reshapes that may stand between a 4-D map and the Linear that reads it flattened.
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "contiguous"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze}


class NoShape(Exception):
    """No static shape is known for a value a rule needs; the message says which."""


def static_shape(node: Any, what: str) -> tuple[int, ...]:
    """The static shape of ``node``, or :class:`NoShape` naming ``what`` it is."""
    shape = shape_of(node)
    if shape is None:
        raise NoShape(f"no static shape is known for {what} ({getattr(node, 'name', node)})")
    return shape


def reader_name(node: fx.Node) -> str:
    """Who ``node`` computes for: its module's path (``nn_module_stack``, recorded by torch.export), else its name."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = str(list(stack.values())[-1][0])
        return path.removeprefix("L['self'].") if path.startswith("L['self']") and path != "L['self']" else path
    return node.name


def first_input(node: fx.Node) -> Any:
    """The first argument of a call, positional or by keyword (``self.fc(input=x)``)."""
    return node.args[0] if node.args else next(iter(node.kwargs.values()), None)


@dataclass(frozen=True)
class LinearOp:
    """``y = x W^T + b``: an ``nn.Linear`` call (``module`` set) or ``F.linear`` (``weight``/``bias`` graph values)."""

    node: fx.Node
    input: Any
    module: Any = None  # an nn.Linear, or a transformers Conv1D (``transposed``)
    weight: Any = None
    bias: Any = None
    transposed: bool = False  # the module's weight is ``(in, out)``: ``y = x @ W + b`` (GPT-2's Conv1D)

    @property
    def module_weight(self) -> torch.Tensor:
        """The module's weight as a Linear holds it, ``(out, in)``: a transposed view for a Conv1D."""
        return self.module.weight.t() if self.transposed else self.module.weight

    @property
    def name(self) -> str:
        """The site name: the module's qualified name; for ``F.linear`` on the weight of a Linear that the graph
        never calls, outside that Linear's own forward (not a subclass traced through), where no other op reads the
        weight (timm's EVA: ``F.linear(x, self.qkv.weight, qkv_bias)``; ``nn.MultiheadAttention``'s ``out_proj``
        once exported), that Linear's: the one layer it is; else the graph node's name."""
        if self.module is not None:
            return str(self.node.target)
        weight, graph = self.weight, self.node.graph
        if not isinstance(weight, fx.Node) or weight.op != "get_attr" or not str(weight.target).endswith(".weight"):
            return self.node.name
        owner = str(weight.target).removesuffix(".weight")
        try:  # (a layer the graph does not call is held by a plain module in a traced graph)
            layer = graph.owning_module.get_submodule(owner) if graph.owning_module is not None else None
        except AttributeError:
            layer = None
        if type(layer) not in (nn.Linear, nn.Module) or reader_name(self.node) == owner:
            return self.node.name
        if graph.find_nodes(op="call_module", target=owner):
            return self.node.name
        readers = {u for n in graph.find_nodes(op="get_attr", target=weight.target) for u in n.users}  # (indexed)
        return owner if readers == {self.node} else self.node.name

    def features(self) -> tuple[int, int]:
        """``(in_features, out_features)``."""
        if self.module is not None:
            out_features, in_features = self.module_weight.shape
        else:
            out_features, in_features = static_shape(self.weight, "the weight")
        return int(in_features), int(out_features)


def as_linear(node: fx.Node, modules: dict[str, nn.Module]) -> LinearOp | None:
    """The Linear computed by ``node`` (any ``nn.Linear``, subclasses included: rules decide), or None."""
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        if isinstance(mod, nn.Linear) or is_transposed_linear(mod):
            return LinearOp(node, first_input(node), module=mod, transposed=not isinstance(mod, nn.Linear))
        return None
    if node.op == "call_function" and node.target is F.linear:
        args = list(node.args) + [None] * (3 - len(node.args))
        x, w, b = (node.kwargs.get(k, args[i]) for i, k in enumerate(("input", "weight", "bias")))
        return LinearOp(node, x, weight=w, bias=b)
    return None


@dataclass(frozen=True)
class ConvOp:
    """An ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.ConvTranspose2d`` call (subclasses included: rules decide)."""

    node: fx.Node
    input: Any
    module: Any

    @property
    def name(self) -> str:
        return str(self.node.target)

    @property
    def transposed(self) -> bool:
        return isinstance(self.module, nn.ConvTranspose2d)

    @property
    def pointwise(self) -> bool:
        return all(k == 1 for k in self.module.kernel_size)

    @property
    def full_extent(self) -> bool:
        """The kernel covers the whole input map (read from the propagated shape)."""
        return (shape_of(self.input) or ())[2:] == tuple(self.module.kernel_size)


def as_conv(node: fx.Node, modules: dict[str, nn.Module]) -> ConvOp | None:
    if node.op != "call_module":
        return None
    mod = modules.get(str(node.target))
    return ConvOp(node, first_input(node), mod) if isinstance(mod, CONV_TYPES) else None


def as_layer_norm(node: fx.Node, modules: dict[str, nn.Module]) -> nn.LayerNorm | None:
    """The ``nn.LayerNorm`` over the last dim that ``node`` calls on one positional input, without hooks, or None."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    mod = modules.get(str(node.target))
    if type(mod) is not nn.LayerNorm or len(mod.normalized_shape) != 1:
        return None
    return None if mod._forward_hooks or mod._forward_pre_hooks else mod


def spatial_mean_source(x: Any) -> fx.Node | None:
    """``y`` if ``x`` is ``y.mean([2, 3])`` (or ``torch.mean``) of a 4-D ``y`` without keepdim, else None."""
    if not isinstance(x, fx.Node):
        return None
    if not ((x.op == "call_method" and x.target == "mean") or (x.op == "call_function" and x.target is torch.mean)):
        return None
    if not isinstance(x.args[0], fx.Node) or len(shape_of(x.args[0]) or ()) != 4:
        return None
    dims = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim")
    keepdim = x.args[2] if len(x.args) > 2 else x.kwargs.get("keepdim", False)
    if keepdim or "dtype" in x.kwargs or not isinstance(dims, (tuple, list)):
        return None
    return x.args[0] if sorted(d % 4 for d in dims) == [2, 3] else None


def is_reshape(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An order-preserving reshape: flatten, view, reshape, squeeze, contiguous, ``nn.Flatten``."""
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS
    if node.op == "call_function":
        return node.target in _RESHAPE_FUNCTIONS
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        return isinstance(mod, nn.Flatten) and not hook_kinds(mod)  # a hook must see its output: it stays
    return False


def hook_kinds(mod: nn.Module) -> list[str]:
    """The kinds of hooks registered on ``mod`` itself."""
    return [
        label
        for label, d in (
            ("forward hooks", mod._forward_hooks),
            ("forward pre-hooks", mod._forward_pre_hooks),
            ("backward hooks", mod._backward_hooks),
            ("backward pre-hooks", mod._backward_pre_hooks),
        )
        if d
    ]


_INPLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv", "ior", "iand"}


def writes_in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` writes into its input (``relu_``, ``x += 1``, ``nn.ReLU(inplace=True)``)."""
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") or name in _INPLACE_OPERATORS or bool(node.kwargs.get("inplace"))


def is_torchvision(target: object, name: str) -> bool:
    """Whether ``target`` is torchvision's function ``name`` (torchvision itself is never imported here)."""
    module = str(getattr(target, "__module__", ""))
    return getattr(target, "__name__", None) == name and module.startswith("torchvision.")


def bind(node: fx.Node) -> dict[str, Any]:
    """A function call's arguments by parameter name (empty when they do not bind)."""
    try:
        return dict(inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return {}


def is_shape_read(node: object) -> bool:
    """Whether ``node`` is ``x.shape`` or ``x.size()``: the whole shape of ``x``."""
    return (
        isinstance(node, fx.Node)
        and not node.kwargs
        and (
            node.op == "call_function"
            and node.target is getattr
            and node.args[1:] == ("shape",)
            or node.op == "call_method"
            and node.target == "size"
            and len(node.args) == 1
        )
    )
