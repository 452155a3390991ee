"""The sizes an exported graph admits: the batch dim of a program, and the checks a raised graph makes of every input
dim (static sizes, and the range of each dynamic one) in place of the export's own input guards."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

from fxsurgery import _runtime

__all__ = ["batch_is_dynamic", "lowest_batch", "guard_sizes"]


def _first_batch(ep: torch.export.ExportedProgram) -> Any:
    """Dim 0 of the program's first user input (an int, or a SymInt where it is dynamic); None where it has none."""
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in ep.graph_signature.user_inputs:
            val = node.meta.get("val")
            return val.shape[0] if isinstance(val, torch.Tensor) and val.dim() > 0 else None
    return None


def batch_is_dynamic(ep: torch.export.ExportedProgram) -> bool:
    """Whether the program's first user input has a symbolic batch."""
    return isinstance(_first_batch(ep), torch.SymInt)


def guard_sizes(graph: fx.Graph, ranges: Mapping[Any, Any], batch_one: bool) -> None:
    """In place of the export's own input guards (removed: they also pin dtypes, which the float64 proof changes),
    a check of every input dim the export kept static, and of the range of every dynamic one, with a message that
    says so. A range starting at 2 is torch.export's own 0/1 specialisation: sizes 0 and 1 are admitted where
    ``batch_one`` (the caller found the graph right at size 1, or the program came as it is), else refused."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if not inputs:
        return
    with graph.inserting_after(inputs[-1]):
        for node in reversed(inputs):
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                static = tuple((i, int(d)) for i, d in enumerate(val.shape) if not isinstance(d, torch.SymInt))
                bounds = tuple(
                    b
                    for i, d in enumerate(val.shape)
                    if isinstance(d, torch.SymInt)
                    for b in [_bounds(i, d, ranges, batch_one)]
                    if b is not None
                )
                if static or bounds:  # (the ranges only where there are some: the call reads as it did before)
                    args = (node, node.name, static, bounds) if bounds else (node, node.name, static)
                    graph.call_function(_runtime.check_exported_size, args)


def _bounds(dim: int, size: Any, ranges: Mapping[Any, Any], batch_one: bool) -> tuple | None:
    """``(dim, low, high)`` to check for a dynamic dim, or None where its range admits every size."""
    low, high = _range_of(size, ranges)
    low = 0 if low == 2 and batch_one else low
    return (dim, low, high) if low > 0 or high is not None else None


def _range_of(size: Any, ranges: Mapping[Any, Any]) -> tuple[int, int | None]:
    """``(low, high)`` of a SymInt's value range in ``ranges`` (high None: no bound; (0, None) where it has none)."""
    vr = ranges.get(size.node.expr)
    if vr is None:
        return 0, None
    low, high = float(vr.lower), float(vr.upper)  # torch's int_oo is an infinite float
    return (0 if math.isinf(low) else int(low)), (None if math.isinf(high) else int(high))


def lowest_batch(ep: torch.export.ExportedProgram) -> int:
    """The smallest size the program's range admits on its first input's batch dim (0 where it is static)."""
    batch = _first_batch(ep)
    return _range_of(batch, ep.range_constraints)[0] if isinstance(batch, torch.SymInt) else 0
