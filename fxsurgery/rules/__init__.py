"""Rewrite rules, one module per pattern, grouped in one rule set per direction.

``linear_to_conv`` (:mod:`fxsurgery.rules.linear_to_conv`) and ``conv_to_linear``
(:mod:`fxsurgery.rules.conv_to_linear`); :func:`rule_set` builds the set a pass uses from its options.
"""

from __future__ import annotations

from fxsurgery.engine.rule import RuleSet
from fxsurgery.errors import InputError
from fxsurgery.options import Options
from fxsurgery.rules import conv_to_linear, linear_to_conv

__all__ = ["DIRECTIONS", "rule_set"]

#: The passes, and the target names the CLI and ``check`` accept for them.
DIRECTIONS = {"conv": linear_to_conv.DIRECTION, "linear": conv_to_linear.DIRECTION}


def rule_set(direction: str, options: Options) -> RuleSet:
    """The rule set of ``direction`` (``"linear_to_conv"`` or ``"conv_to_linear"``) for ``options``, or the caller's
    own ``options.rules``."""
    if options.rules is not None:
        return options.rules
    if direction == linear_to_conv.DIRECTION:
        return linear_to_conv.rule_set(options.batch_layout, options.token_layout)
    if direction == conv_to_linear.DIRECTION:
        return conv_to_linear.rule_set()
    raise InputError(f"unknown direction {direction!r}; use one of {sorted(DIRECTIONS.values())} (or 'conv' / "
                     "'linear' / 'auto')")  # fmt: skip
