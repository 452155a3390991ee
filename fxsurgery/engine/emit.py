"""Small node builders rules share."""

from __future__ import annotations

import torch.fx as fx

from fxsurgery import _runtime

__all__ = ["guard", "replay"]


def guard(graph: fx.Graph, x: fx.Node, spatial: tuple[int, ...], site: str, original_rejects: bool) -> fx.Node:
    """Insert a run-time check that ``x`` still has the traced spatial size (:func:`~fxsurgery._runtime.
    check_spatial_size`); returns ``x`` through it."""
    return graph.call_function(_runtime.check_spatial_size, (x, spatial, site, original_rejects))


def replay(graph: fx.Graph, ops: list[tuple[fx.Node, fx.Node]], src: fx.Node) -> fx.Node:
    """Apply the elementwise ``ops`` (each with its tensor input) to ``src`` instead, in order."""
    for op, op_input in ops:
        src = graph.node_copy(op, lambda a, prev=src, old=op_input: prev if a is old else a)  # type: ignore[misc]
        src.meta = {}
    return src
