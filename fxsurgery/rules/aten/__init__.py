"""The rules for exported graphs (``ExportedProgram.graph_module``'s ATen graph, or ExecuTorch's Edge graph), where
parameters are graph inputs and ops are ATen overloads: run by the one engine through the passes of
:mod:`fxsurgery.engine.passes`. They emit ops in the graph's own dialect and add no parameter (new kernels are views
of the original weights computed in the graph), so the program's state dict is unchanged.

* ``linear->conv`` (:mod:`.linear_to_conv`): ``linear(x, W, b)`` (or ``addmm``/``mm`` with ``permute(W)``) as a
  convolution: HxW on a flattened ``(N, C, H, W)`` map, 1x1 on any other ``(N, C)``.
* ``conv->linear`` (:mod:`.conv_to_linear`): a pointwise ``convolution`` as ``addmm`` on channels-last rows.
"""

from __future__ import annotations

from fxsurgery.engine.rule import RuleSet
from fxsurgery.rules.aten.conv_to_linear import ConvToLinear
from fxsurgery.rules.aten.linear_to_conv import LinearToConv

__all__ = ["rule_set"]


def rule_set(direction: str) -> RuleSet:
    """The one rule of ``direction`` (``"linear_to_conv"`` or ``"conv_to_linear"``) for exported graphs."""
    rule = LinearToConv() if direction == "linear_to_conv" else ConvToLinear()
    return RuleSet(direction, (rule,))
