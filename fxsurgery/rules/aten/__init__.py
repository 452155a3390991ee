"""The rules for exported graphs (``ExportedProgram.graph_module``'s ATen graph, or ExecuTorch's Edge graph), where
parameters are graph inputs and ops are ATen overloads: run by the one engine through the passes of
:mod:`fxsurgery.engine.passes`. They emit ops in the graph's own dialect and add no parameter (new kernels are views
of the original weights computed in the graph), so the program's state dict is unchanged.

* ``linear->conv`` (:mod:`.linear_to_conv`): ``linear(x, W, b)`` (or ``addmm``/``mm`` with ``permute(W)``) as a
  convolution: HxW on a flattened ``(N, C, H, W)`` map, 1x1 on any other ``(N, C)``.
* ``conv->linear`` (:mod:`.conv_to_linear`): a pointwise ``convolution`` as ``addmm`` on channels-last rows.
* ``qlinear->conv`` and ``qconv->linear`` (:mod:`.quantized`): the same on a quantized graph (PT2E q/dq ops, torchao
  ``dequantize_affine``), with every int8 island ``dq -> op -> q`` kept whole; they are asked first.
"""

from __future__ import annotations

from fxsurgery.engine.rule import RuleSet
from fxsurgery.rules.aten.conv_to_linear import ConvToLinear
from fxsurgery.rules.aten.linear_to_conv import LinearToConv
from fxsurgery.rules.aten.quantized import CONV_PATTERN, LINEAR_PATTERN, QuantizedConvToLinear, QuantizedLinearToConv

__all__ = ["rule_set", "QUANTIZED_PATTERNS"]

#: the patterns of the quantized rules
QUANTIZED_PATTERNS = (LINEAR_PATTERN, CONV_PATTERN)


def rule_set(direction: str) -> RuleSet:
    """The rules of ``direction`` (``"linear_to_conv"`` or ``"conv_to_linear"``) for exported graphs: the quantized
    rule first (it claims the sites whose weight is dequantized), then the float one."""
    if direction == "linear_to_conv":
        return RuleSet(direction, (QuantizedLinearToConv(), LinearToConv()))
    return RuleSet(direction, (QuantizedConvToLinear(), ConvToLinear()))
