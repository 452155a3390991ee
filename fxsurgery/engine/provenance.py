"""Where each node a pass adds comes from: it carries the ``nn_module_stack`` and ``stack_trace`` of the node it
replaces (as ExecuTorch's passes keep them), so that debuggers, profilers and exporters that read them on the
original graph read them on the rewritten one too, and ``fxsurgery_replaces`` names that node."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.fx as fx

__all__ = ["KEYS", "REPLACES", "of", "inherit", "recording", "from_neighbours"]

#: The metadata a new node takes from the node it replaces.
KEYS = ("nn_module_stack", "stack_trace")
#: The name of the node it replaces (the original's, in the graph before the pass).
REPLACES = "fxsurgery_replaces"


def of(node: fx.Node) -> dict[str, Any]:
    """The metadata a node added in place of ``node`` carries."""
    return {**{k: node.meta[k] for k in KEYS if k in node.meta}, REPLACES: node.meta.get(REPLACES, node.name)}


def inherit(nodes: list[fx.Node], origin: fx.Node) -> None:
    """``origin``'s metadata onto each of ``nodes`` that has none of its own yet; the list is emptied."""
    for node in nodes:
        if REPLACES not in node.meta:
            node.meta.update(of(origin))
    nodes.clear()


@contextmanager
def recording(graph: fx.Graph) -> Iterator[list[fx.Node]]:
    """The nodes created in ``graph`` while the block runs (every creation goes through ``create_node``)."""
    created: list[fx.Node] = []
    create = graph.create_node

    def create_node(*args: Any, **kwargs: Any) -> fx.Node:
        node = create(*args, **kwargs)
        created.append(node)
        return node

    graph.create_node = create_node  # type: ignore[method-assign]
    try:
        yield created
    finally:
        del graph.create_node


def from_neighbours(nodes: list[fx.Node], original: set[fx.Node]) -> None:
    """Nodes added where no one node is replaced (a layout's exit before an outside reader): the metadata of the
    nearest original node they read from, else of the first original node that reads them."""
    for node in nodes:
        if REPLACES in node.meta or node._erased:
            continue
        near = _nearest(node, original, "inputs") or _nearest(node, original, "users")
        if near is not None:
            node.meta.update(of(near))
    nodes.clear()


def _nearest(start: fx.Node, original: set[fx.Node], direction: str) -> fx.Node | None:
    """The first node, breadth first from ``start`` along its inputs or its users, that is original or has a
    provenance of its own."""
    frontier, seen = [start], {start}
    while frontier:
        found = [n for n in frontier if n in original or REPLACES in n.meta]
        if found:
            return found[0]
        step = [m for n in frontier for m in (n.all_input_nodes if direction == "inputs" else n.users)]
        frontier = [m for m in dict.fromkeys(step) if m not in seen]
        seen.update(frontier)
    return None
