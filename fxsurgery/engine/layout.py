"""Layouts: another arrangement of the same values (a 2-D Linear output carried as ``(N, O, 1, 1)``, an NCHW map
carried channels-last as ``(N, H, W, C)``), with one way in and one way out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

__all__ = ["Layout", "permutation_layout", "permute_dims", "composes_to_identity"]


@dataclass(frozen=True)
class Layout:
    """An alternative layout: ``enter`` builds it from an original node, ``exit`` converts back (both return the
    last node they add).

    ``to_alt`` is the permutation ``enter`` applies when the layout is a pure permutation: a ``permute`` that would
    undo a conversion is then cancelled instead of added. ``dims``, when the layout only moves dims and adds unit
    ones, says which original dim each dim of the carried value holds (None: a unit dim the layout adds), so that an
    op naming dims can run on the carried value with its dims renamed.
    """

    name: str
    enter: Callable[[fx.Graph, fx.Node, str], fx.Node]
    exit: Callable[[fx.Graph, fx.Node, fx.Node], fx.Node]
    to_alt: tuple[int, ...] | None = None
    dims: tuple[int | None, ...] | None = None


def permutation_layout(name: str, to_alt: tuple[int, ...]) -> Layout:
    """A layout that carries values permuted by ``to_alt`` (e.g. NCHW as NHWC)."""
    back = tuple(to_alt.index(i) for i in range(len(to_alt)))

    def enter(graph: fx.Graph, x: fx.Node, site: str) -> fx.Node:
        return graph.call_method("permute", (x, to_alt))

    def exit(graph: fx.Graph, alt: fx.Node, orig: fx.Node) -> fx.Node:
        return graph.call_method("permute", (alt, back))

    return Layout(name, enter, exit, to_alt, to_alt)


def permute_dims(node: object) -> tuple[int, ...] | None:
    """The dims of ``node`` if it is ``x.permute(...)`` / ``torch.permute(x, ...)`` with constant dims, else None."""
    if not isinstance(node, fx.Node):
        return None
    if not (node.op == "call_method" and node.target == "permute") and not (
        node.op == "call_function" and node.target is torch.permute
    ):
        return None
    dims: Any = node.kwargs["dims"] if "dims" in node.kwargs else node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    if not dims or not all(isinstance(d, int) for d in dims) or not isinstance(node.args[0], fx.Node):
        return None
    return tuple(d % len(dims) for d in dims)


def composes_to_identity(first: tuple[int, ...], then: tuple[int, ...]) -> bool:
    """True when ``x.permute(first).permute(then)`` is ``x``."""
    return len(first) == len(then) and all(first[then[i]] == i for i in range(len(then)))
