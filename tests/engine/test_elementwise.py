"""The elementwise table: what it lists must compute the same values in any layout; what it must not list (softmax,
reductions, broadcasting, channel dropout) is refused."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxsurgery.capture import propagate_shapes
from fxsurgery.engine.elementwise import UNARY_MODULES, elementwise_tensor_inputs

_ARGS = {nn.Threshold: (0.1, -1.0)}


def _traced(fn, *inputs):
    """The last node of ``fn(module, *inputs)`` traced, with shapes, and the modules of the graph."""

    class One(nn.Module):
        def __init__(self, inner=None):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return fn(self, x)

    class Two(One):
        def forward(self, x, y):
            return fn(self, x, y)

    gm = fx.symbolic_trace((One if len(inputs) == 1 else Two)(getattr(fn, "module", None)))
    propagate_shapes(gm, inputs)
    node = next(n for n in reversed(gm.graph.nodes) if n.op not in ("output", "placeholder"))
    return node, dict(gm.named_modules())


def _layout_independent(f, x):
    """f on a permuted tensor, permuted back, equals f on the tensor."""
    p, inv = (0, 2, 3, 1), (0, 3, 1, 2)
    return torch.equal(f(x.permute(p)).permute(inv), f(x))


@pytest.mark.parametrize("cls", UNARY_MODULES, ids=lambda c: c.__name__)
def test_unary_modules_are_elementwise(cls):
    mod = cls(*_ARGS.get(cls, ())).eval()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)

    def fn(self, x):
        return self.inner(x)

    fn.module = mod
    node, modules = _traced(fn, x)
    assert elementwise_tensor_inputs(node, modules) == [node.args[0]]
    assert _layout_independent(mod, x)


FUNCTIONS = {
    "F.relu": lambda x: F.relu(x),
    "F.gelu": lambda x: F.gelu(x),
    "torch.sigmoid": lambda x: torch.sigmoid(x),
    "clamp": lambda x: torch.clamp(x, -0.5, 0.5),
    "method tanh": lambda x: x.tanh(),
    "F.dropout": lambda x: F.dropout(x, 0.3, False),
    "neg": lambda x: -x,
    "contiguous": lambda x: x.contiguous(),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_unary_functions_are_elementwise(name):
    f = FUNCTIONS[name]
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    node, modules = _traced(lambda self, x: f(x), x)
    assert elementwise_tensor_inputs(node, modules) == [node.args[0]]
    assert _layout_independent(f, x)


def test_binary_ops_of_same_shaped_tensors_and_scalars():
    x, y = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    node, modules = _traced(lambda self, x, y: x + y, x, y)
    assert node.target is operator.add and elementwise_tensor_inputs(node, modules) == list(node.args)
    node, modules = _traced(lambda self, x: x * 2.0, x)
    assert elementwise_tensor_inputs(node, modules) == [node.args[0]]
    node, modules = _traced(lambda self, x, y: x.add_(y), x, y)
    assert elementwise_tensor_inputs(node, modules) == list(node.args)


NOT_ELEMENTWISE = {
    "broadcast add": (lambda self, x, b: x + b, (torch.randn(2, 3, 4, 5), torch.randn(5))),
    "softmax": (lambda self, x: x.softmax(-1), (torch.randn(2, 3, 4, 5),)),
    "mean": (lambda self, x: x.mean(1), (torch.randn(2, 3, 4, 5),)),
    "tensor clamp bound": (lambda self, x, b: torch.clamp(x, b), (torch.randn(2, 3), torch.randn(2, 3))),
}


@pytest.mark.parametrize("name", sorted(NOT_ELEMENTWISE))
def test_not_elementwise(name):
    fn, inputs = NOT_ELEMENTWISE[name]
    node, modules = _traced(fn, *inputs)
    assert elementwise_tensor_inputs(node, modules) is None


def test_channel_dropout_is_not_in_the_table():
    """Dropout2d drops whole channels: in another layout it would drop other values."""
    assert nn.Dropout2d not in UNARY_MODULES and nn.Dropout in UNARY_MODULES
