"""Shapes without activations: ``node.meta["val"]`` from fake-tensor propagation, and :func:`shape_of`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

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
    attrs = [(m, k, v) for m in module.modules() for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                if b.shape == v.shape:
                    b.copy_(v)
        for m, k, v in attrs:
            setattr(m, k, v)


def propagate_shapes(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    """Record ``node.meta["val"]`` (a fake tensor, or a Python value) for every node of ``gm``.

    Fake tensors carry shape, dtype and device without data, so this costs no FLOPs. Leaf modules that cannot run on
    fake tensors fall back to one real run on clones of the inputs.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

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
