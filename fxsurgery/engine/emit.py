"""Small node builders rules share."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from fxsurgery import _runtime
from fxsurgery.engine import provenance
from fxsurgery.engine.nodes import writes_in_place
from fxsurgery.engine.rule import Skip

__all__ = ["guard", "replay", "check_replayable"]


def guard(
    graph: fx.Graph,
    x: fx.Node,
    spatial: tuple[int, ...],
    site: str,
    original_rejects: bool,
    features: int | None = None,
) -> fx.Node:
    """Insert a run-time check that ``x`` still has the traced spatial size (:func:`~fxsurgery._runtime.
    check_spatial_size`); returns ``x`` through it."""
    args = (x, spatial, site, original_rejects) + ((features,) if features is not None else ())
    return graph.call_function(_runtime.check_spatial_size, args)


def check_replayable(ops: list[tuple[fx.Node, fx.Node]], source: fx.Node, modules: dict[str, nn.Module]) -> None:
    """Ops that write in place may run on ``source`` instead only where nothing else can see the write: in the
    original they wrote to a reshape of it, which is a copy or a view depending on its memory layout at run time."""
    writer = next((op for op, _ in ops if writes_in_place(op, modules)), None)
    if writer is None:
        return
    first = ops[0][0]
    shared = source.op == "placeholder" or any(u is not first and not _on_path(u, first) for u in source.users)
    if shared:
        raise Skip(
            f"{writer.name} writes in place between the map and the Linear; whether the original's write "
            "reaches the map depends on its memory layout, so the rewrite is left out"
        )


def _on_path(user: fx.Node, first: fx.Node) -> bool:
    """``user`` is a reshape on the way from the map to the first op (the flatten itself)."""
    frontier = [user]
    for _ in range(8):
        if first in frontier:
            return True
        frontier = [u for n in frontier for u in n.users]
    return False


def replay(graph: fx.Graph, ops: list[tuple[fx.Node, fx.Node]], src: fx.Node) -> fx.Node:
    """Apply the elementwise ``ops`` (each with its tensor input) to ``src`` instead, in order."""
    for op, op_input in ops:
        src = graph.node_copy(op, lambda a, prev=src, old=op_input: prev if a is old else a)  # type: ignore[misc]
        src.meta = provenance.of(op)
    return src
