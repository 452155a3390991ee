"""What both ATen rules read off a node: the site name, and the match they carry to ``apply``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from fxsurgery.engine.rule import Match

__all__ = ["site_name", "OpMatch", "STEP"]

#: stride, padding, dilation, transposed, output_padding, groups of a plain convolution
STEP = ([1, 1], [0, 0], [1, 1], False, [0, 0], 1)


def site_name(node: fx.Node) -> str:
    """The module path the op ran in (``nn_module_stack``), or the node name for a functional call."""
    stack = node.meta.get("nn_module_stack") or {}
    path = str(list(stack.values())[-1][0]) if stack else ""
    return path.replace("L['self'].", "").replace("L__self___", "") or node.name


@dataclass(frozen=True)
class OpMatch(Match):
    """The operands of the op (``x``, weight ``w``, bias ``b``) and the shapes ``apply`` emits with."""

    x: fx.Node
    w: fx.Node
    b: Any
    shapes: tuple[Any, ...]
