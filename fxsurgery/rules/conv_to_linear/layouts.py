"""The layouts conv -> Linear carries values in: channels-last maps, and ``(N, C, 1, 1)`` values as ``(N, C)``."""

from __future__ import annotations

import torch
import torch.fx as fx

from fxsurgery.engine.emit import guard
from fxsurgery.engine.layout import Layout, permutation_layout
from fxsurgery.engine.nodes import static_shape

__all__ = ["channels_last_layout", "CHANNELS_LAST", "FLAT_LAYOUT"]


def channels_last_layout(rank: int) -> Layout:
    """NC* values carried as N*C (channels last), for tensors of ``rank`` dims."""
    return permutation_layout(f"channels-last/{rank}d", (0, *range(2, rank), 1))


#: Channels-last layouts by rank: ``(N, C, L)`` as ``(N, L, C)``, ``(N, C, H, W)`` as ``(N, H, W, C)``.
CHANNELS_LAST = {3: channels_last_layout(3), 4: channels_last_layout(4)}


def _enter_flat(graph: fx.Graph, x: fx.Node, site: str) -> fx.Node:
    checked = guard(graph, x, (1, 1), site, original_rejects=False)
    return graph.call_function(torch.flatten, (checked, 1))


def _exit_flat(graph: fx.Graph, alt: fx.Node, orig: fx.Node) -> fx.Node:
    return graph.call_method("reshape", (alt, (-1, static_shape(orig, "a flat value")[1], 1, 1)))


#: ``(N, C, 1, 1)`` values carried as ``(N, C)``.
FLAT_LAYOUT = Layout("(N,C)", _enter_flat, _exit_flat)
