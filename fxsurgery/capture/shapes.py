"""Shapes without activations: ``node.meta["val"]`` from meta-device (or fake-tensor) propagation; :func:`shape_of`."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxsurgery.capture.copies import tensor_attributes
from fxsurgery.errors import TraceError, one_line

__all__ = ["propagate_shapes", "shape_of"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _frozen_buffers(module: nn.Module) -> Iterator[None]:
    """Restore every buffer and tensor attribute after the block: shape propagation runs train-mode code that updates
    statistics, and hooks that assign tensors."""
    saved = [(b, b.detach().clone()) for b in module.buffers() if b.device.type != "meta"]
    # Tensors held as plain attributes (old-style weight_norm recomputes ``weight`` in a pre-hook) would be left as
    # fake tensors: put the real ones back.
    attrs = tensor_attributes(module)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                if b.shape == v.shape and not torch.equal(b, v):  # (a buffer expanded from one row cannot be written)
                    b.copy_(v)
        for m, k, v in attrs:
            setattr(m, k, v)


def propagate_shapes(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    """Record ``node.meta["val"]`` (a meta or fake tensor, or a Python value) for every node of ``gm``.

    First on the meta device (a copy of the module tree whose parameters and buffers are meta tensors: shapes and
    dtypes without data, no FLOPs, and C++ shape functions: 4-6x faster than fake tensors, ResNet-50 0.1 s against
    0.5 s); where that fails (a tensor kept as a plain attribute, a data-dependent op), on fake tensors; leaf modules
    that cannot run on fake tensors fall back to one real run on clones of the inputs.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    try:
        _meta_prop(gm, inputs)
        return
    except Exception as meta_error:
        log.info("meta-device shape propagation failed (%s); using fake tensors", one_line(meta_error))
    with _frozen_buffers(gm), torch.no_grad():
        try:
            FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
            return
        except Exception as fake_error:  # fall back to real values below
            log.info("fake shape propagation failed (%s); running the example inputs for real", fake_error)
        try:
            _RealProp(gm).run(*[t.clone() for t in inputs])
        except Exception as e:
            raise TraceError(
                f"the traced model fails on the example inputs: {one_line(e)}; check the input shapes and dtypes"
            ) from e


class _MetaProp(fx.Interpreter):
    """Runs ``gm``'s graph on meta copies of the modules and tensors it reads (made on first use, tied weights
    tied through the shared ``memo``): the user's modules never run."""

    def __init__(self, gm: fx.GraphModule, memo: dict[int, Any]) -> None:
        super().__init__(gm)
        self.memo = memo
        self.shadows: dict[str, Any] = {}

    def fetch_attr(self, target: str) -> Any:
        if target not in self.shadows:
            value = super().fetch_attr(target)
            if isinstance(value, nn.Module):
                value = _meta_module(value, self.memo)
            elif isinstance(value, torch.Tensor):
                value = self.memo.get(id(value), value)
            self.shadows[target] = value
        return self.shadows[target]

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            if result.device.type != "meta":  # a real tensor made or kept in forward: not a shape-only run
                raise TypeError(f"{n.name} computed a {result.device.type} tensor")
            n.meta["val"] = result
        elif isinstance(result, (int, float, bool, torch.Size, tuple, list)):
            n.meta["val"] = result
        return result


def _meta_module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """A shallow copy of ``module`` (and of its submodules) holding the meta tensors of ``memo``: attributes are
    shared, the parameter, buffer and submodule tables are the copy's own (a deep copy costs 10x more)."""
    if id(module) not in memo:
        shadow = copy.copy(module)
        shadow._parameters = {k: memo.get(id(v), v) for k, v in module._parameters.items()}
        shadow._buffers = {k: memo.get(id(v), v) for k, v in module._buffers.items()}
        shadow._modules = {k: v if v is None else _meta_module(v, memo) for k, v in module._modules.items()}
        for k, v in vars(module).items():
            if isinstance(v, torch.Tensor):
                setattr(shadow, k, memo.get(id(v), v))
        memo[id(module)] = shadow
    return memo[id(module)]


def _meta_prop(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    """Run ``gm``'s graph with meta parameters, buffers and inputs, meta the default device (tensors made in
    forward)."""
    held = (*gm.parameters(), *gm.buffers(), *(v for _, _, v in tensor_attributes(gm)))
    # on several devices it would run on meta, not where the model runs: fake tensors tell
    if len({t.device for t in (*held, *(t for t in inputs if isinstance(t, torch.Tensor)))}) > 1:
        raise TypeError("the model's tensors and the inputs are on several devices")
    memo: dict[int, Any] = {}
    for t in held:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    meta_inputs = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs]
    with torch.device("meta"), torch.no_grad():
        _MetaProp(gm, memo).run(*meta_inputs)


class _RealProp(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["val"] = torch.empty_like(result, device="meta")
        elif isinstance(result, (int, float, bool, torch.Size, tuple, list)):
            n.meta["val"] = result
        return result


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The static shape recorded for ``node``, or None when it is not a tensor node."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(d) for d in val.shape)
        except TypeError:  # symbolic sizes
            return None
    return None
