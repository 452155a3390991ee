"""Propagators that keep a Linear -> conv region carried without conversions.

* :class:`PermuteSeed`: ``z.permute(0, 2, 3, 1)`` that leads to a Linear (through LayerNorms; with the token layout,
  through the reshapes, pads and rolls it carries: timm's Swin) *is* ``z`` in NCHW.
* :class:`SelectToken`: ``x[:, i]`` of tokens carried as ``(B, C, 1, S)`` (ViT's class token) reads
  ``alt[:, :, 0, i]``.
* :class:`TokenRows`: tokens carried as ``(B, C, 1, S)`` reshaped to rows ``(B*S, C)`` stay carried (the rows are
  the same values), and rows viewed back as ``(B, S, C)`` are the tokens again: OPT's MLP runs on rows.
* :class:`StochasticDepth`: torchvision's ``stochastic_depth`` scales per sample (or the whole batch), so it runs in
  any layout that keeps the batch on dim 0.
"""

from __future__ import annotations

import operator
from collections.abc import Collection
from typing import Any

import torch.fx as fx
from torch import nn

from fxsurgery.capture.shapes import shape_of
from fxsurgery.engine.layout import permute_dims
from fxsurgery.engine.nodes import is_torchvision
from fxsurgery.engine.rule import RuleContext, feeds_candidate
from fxsurgery.rules.linear_to_conv.layouts import NCHW_LAYOUT, TOKEN_LAYOUT, rows_of_tokens, tokens_of_rows
from fxsurgery.rules.linear_to_conv.regroup import MOVES

__all__ = ["PermuteSeed", "SelectToken", "StochasticDepth", "TokenRows"]


class PermuteSeed:
    def __init__(self, token_layout: bool = False) -> None:
        # (the token layout carries reshapes: timm's Swin partitions; and its stem's Identity downsample)
        self.moves: Collection[Any] = MOVES if token_layout else ()
        self.through: tuple[type, ...] = (nn.LayerNorm, nn.Identity) if token_layout else (nn.LayerNorm,)

    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if permute_dims(node) != (0, 2, 3, 1) or len(shape_of(node.args[0]) or ()) != 4:
            return False
        if not feeds_candidate(node, rw, through=self.through, moves=self.moves):
            return False
        rw.seed(node, node.args[0], NCHW_LAYOUT)  # type: ignore[arg-type]
        return True


class SelectToken:
    """The result of the select is an ordinary ``(B, C)`` value: the whole sequence is not converted back."""

    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if not (node.op == "call_function" and node.target is operator.getitem):
            return False
        carried = rw.carried(node.args[0])
        index = node.args[1]
        if carried is None or carried[1] is not TOKEN_LAYOUT or not isinstance(index, tuple) or len(index) != 2:
            return False
        if index[0] != slice(None) or not isinstance(index[1], int) or isinstance(index[1], bool):
            return False
        node.args = (carried[0], (slice(None), slice(None), 0, index[1]))
        return True


class StochasticDepth:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if not is_torchvision(node.target, "stochastic_depth") or not node.args:
            return False
        carried = rw.carried(node.args[0])
        if carried is None or carried[1] not in (NCHW_LAYOUT, TOKEN_LAYOUT):
            return False
        alt, layout = carried
        with rw.graph.inserting_before(node):
            new = rw.graph.node_copy(node, lambda a: alt if a is node.args[0] else a)
        new.meta = {}
        rw.set_alt(node, new, layout)
        return True


def _known_equal(a: object, b: object) -> bool:
    """``a == b`` for sizes that may be symbolic (a dynamic batch: ``s0``, ``8*s0``), compared by their expression
    so that no guard is added and sizes of another capture compare by name."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


class TokenRows:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if not (node.op == "call_method" and node.target in ("reshape", "view") and node.args):
            return False
        carried = rw.carried(node.args[0])
        shape, source = shape_of(node), shape_of(node.args[0])
        if carried is None or shape is None or source is None:
            return False
        alt, layout = carried
        rows = tokens_of_rows(layout)
        if layout is TOKEN_LAYOUT and len(source) == 3 and len(shape) == 2 and isinstance(source[1], int):
            if not (_known_equal(shape[0], source[0] * source[1]) and _known_equal(shape[1], source[2])):
                return False
            rw.set_alt(node, alt, rows_of_tokens(source[0], source[1]))
            return True
        if rows is not None and len(source) == 2 and len(shape) == 2:  # rows as rows again (a router's reshape)
            if not (_known_equal(shape[0], source[0]) and shape[1] == source[1]):
                return False
            rw.set_alt(node, alt, layout)
            return True
        if rows is not None and len(source) == 2 and len(shape) == 3:
            if not (_known_equal(shape[0], rows[0]) and shape[1] == rows[1] and _known_equal(shape[2], source[1])):
                return False
            rw.set_alt(node, alt, TOKEN_LAYOUT)
            return True
        return False
