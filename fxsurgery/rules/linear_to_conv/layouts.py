"""The layouts Linear -> conv carries values in."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxsurgery import _runtime
from fxsurgery.capture.shapes import shape_of
from fxsurgery.engine.layout import Layout, permutation_layout
from fxsurgery.engine.nodes import static_shape

__all__ = [
    "POINT_LAYOUT",
    "SPATIAL_LAYOUT",
    "BATCH_LAYOUTS",
    "NCHW_LAYOUT",
    "TOKEN_LAYOUT",
    "CONV_LAYOUTS",
    "conv_layout",
    "rows_of_tokens",
    "tokens_of_rows",
    "region_layout",
    "from_map",
]


def _enter_point(graph: fx.Graph, x: fx.Node, site: str) -> fx.Node:
    return graph.call_method("reshape", (x, (-1, static_shape(x, "a chained value")[1], 1, 1)))


def _exit_point(graph: fx.Graph, alt: fx.Node, orig: fx.Node) -> fx.Node:
    return graph.call_function(torch.flatten, (alt, 1))


#: ``(N, O)`` values carried as ``(N, O, 1, 1)``: the batch stays the batch; each conv is N small products.
POINT_LAYOUT = Layout("(N,C,1,1)", _enter_point, _exit_point)


def _enter_spatial(graph: fx.Graph, x: fx.Node, site: str) -> fx.Node:
    return graph.call_function(_runtime.batch_to_width, (x, static_shape(x, "a chained value")[1]))


def _exit_spatial(graph: fx.Graph, alt: fx.Node, orig: fx.Node) -> fx.Node:
    return graph.call_function(_runtime.batch_from_width, (alt,))


#: ``(N, O)`` values carried as ``(1, O, 1, N)``: the batch on the width axis, so each conv is one matrix product.
SPATIAL_LAYOUT = Layout("(1,C,1,N)", _enter_spatial, _exit_spatial)
BATCH_LAYOUTS = {"spatial": SPATIAL_LAYOUT, "batch": POINT_LAYOUT}
#: Channels-last ``(N, H, W, O)`` values carried as NCHW ``(N, O, H, W)``.
NCHW_LAYOUT = permutation_layout("NCHW", (0, 3, 1, 2))


def _enter_tokens(graph: fx.Graph, x: fx.Node, site: str) -> fx.Node:
    return graph.call_method("unsqueeze", (graph.call_method("transpose", (x, 1, 2)), 2))


def _exit_tokens(graph: fx.Graph, alt: fx.Node, orig: fx.Node) -> fx.Node:
    return graph.call_method("transpose", (graph.call_method("squeeze", (alt, 2)), 1, 2))


#: Tokens ``(B, S, C)`` carried as ``(B, C, 1, S)`` (opt-in, ``token_layout=True``): every Linear on them is a 1x1
#: conv, and self-attention runs per head on ``(B, heads, head_dim, S)``.
TOKEN_LAYOUT = Layout("(B,C,1,S)", _enter_tokens, _exit_tokens, dims=(0, 2, None, 1))
#: Layouts in which a Linear on the carried value is a 1x1 conv (and those of :func:`rows_of_tokens`).
CONV_LAYOUTS = (POINT_LAYOUT, SPATIAL_LAYOUT, NCHW_LAYOUT, TOKEN_LAYOUT)

#: Each layout of :func:`rows_of_tokens`, and the (batch, sequence) its rows come from; and the reverse, by name.
_ROWS: dict[Layout, tuple[Any, int]] = {}
_BY_SIZES: dict[tuple[str, int], Layout] = {}


def rows_of_tokens(batch: Any, sequence: int) -> Layout:
    """Tokens flattened to rows ``(B*S, C)`` (OPT's ``x.reshape(-1, C)`` before its MLP), carried as the tokens
    ``(B, C, 1, S)`` they came from: the same layout for every value of one ``(B, S)``."""
    key = (str(batch), sequence)
    if key in _BY_SIZES:
        return _BY_SIZES[key]

    def enter(graph: fx.Graph, x: fx.Node, site: str) -> fx.Node:
        return _enter_tokens(graph, graph.call_method("unflatten", (x, 0, (-1, sequence))), site)

    def exit(graph: fx.Graph, alt: fx.Node, orig: fx.Node) -> fx.Node:
        return graph.call_method("flatten", (_exit_tokens(graph, alt, orig), 0, 1))

    layout = Layout(f"(B,C,1,S) of (B*S,C) rows, B={batch}, S={sequence}", enter, exit)
    _ROWS[layout], _BY_SIZES[key] = (batch if isinstance(batch, int) else key[0], sequence), layout
    return layout


def tokens_of_rows(layout: Layout) -> tuple[Any, int] | None:
    """``(B, S)`` when ``layout`` carries rows of tokens (:func:`rows_of_tokens`), else None."""
    return _ROWS.get(layout)


def conv_layout(layout: Layout) -> bool:
    """Whether a Linear on a value carried in ``layout`` is a 1x1 conv on its counterpart."""
    return layout in CONV_LAYOUTS or layout in _ROWS


def region_layout(x: object) -> Layout | None:
    """The layout that carries a value not yet in one (token layout only): tokens ``(B, S, C)`` as ``(B, C, 1, S)``,
    a channels-last ``(N, H, W, C)`` map as NCHW; None for other ranks."""
    return {3: TOKEN_LAYOUT, 4: NCHW_LAYOUT}.get(len(shape_of(x) or ()))


def from_map(graph: fx.Graph, y: fx.Node, feature: tuple[int, ...], point: Layout) -> fx.Node:
    """A 4-D ``(N, C, H, W)`` map in the ``point`` layout: as is, or ``(1, C, H, N*W)`` with the images side by
    side."""
    if point is POINT_LAYOUT:
        return y
    return graph.call_function(_runtime.maps_side_by_side, (y, feature[0], feature[1]))
