"""Rewrite rules, one module per direction; :data:`RULES` maps a direction to its rule."""

from __future__ import annotations

from fxsurgery.rules._engine import Rewriter, Rule, Skip
from fxsurgery.rules.conv_to_linear import ConvToLinear
from fxsurgery.rules.linear_to_conv import LinearToConv

__all__ = ["RULES", "Rewriter", "Rule", "Skip", "LinearToConv", "ConvToLinear"]

RULES: dict[str, type[Rule]] = {"linear_to_conv": LinearToConv, "conv_to_linear": ConvToLinear}
