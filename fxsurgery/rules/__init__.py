"""Rewrite rules, one module per pattern, grouped in one rule set per direction.

``linear_to_conv`` (:mod:`fxsurgery.rules.linear_to_conv`) and ``conv_to_linear``
(:mod:`fxsurgery.rules.conv_to_linear`); :func:`rule_set` builds the set a pass uses from its options.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fxsurgery.engine.nodes import CONV_TYPES
from fxsurgery.engine.rule import RuleSet
from fxsurgery.errors import InputError
from fxsurgery.report import Site
from fxsurgery.rules import conv_to_linear, linear_to_conv
from fxsurgery.rules.conv_to_linear import full_extent, pointwise
from fxsurgery.rules.linear_to_conv import flatten_head

if TYPE_CHECKING:
    from fxsurgery.options import Options

__all__ = ["DIRECTIONS", "rule_set", "bare_candidate"]

#: The passes, and the target names the CLI and ``check`` accept for them.
DIRECTIONS = {"conv": linear_to_conv.DIRECTION, "linear": conv_to_linear.DIRECTION}


def rule_set(direction: str, options: Options) -> RuleSet:
    """The rule set of ``direction`` (``"linear_to_conv"`` or ``"conv_to_linear"``) for ``options``, or the caller's
    own ``options.rules``."""
    if options.rules is not None:
        return options.rules
    if direction == linear_to_conv.DIRECTION:
        return linear_to_conv.rule_set(options.batch_layout, options.token_layout, options.quantize is not None)
    if direction == conv_to_linear.DIRECTION:
        return conv_to_linear.rule_set()
    raise InputError(
        f"unknown direction {direction!r}; use one of {sorted(DIRECTIONS.values())} (or 'conv' / 'linear' / 'auto')"
    )


def bare_candidate(
    direction: str, name: str, child: nn.Module, inputs: tuple[torch.Tensor, ...], why: str | None = None
) -> list[Site]:
    """A Linear or pointwise/full-extent conv called directly by code torch.fx cannot trace: listed as a site of
    ``direction``, with why it stays."""
    x = inputs[0] if inputs else None
    kernel: tuple[int, ...] = tuple(child.kernel_size) if isinstance(child, CONV_TYPES) else ()  # type: ignore[arg-type]
    linear = direction == "linear_to_conv" and isinstance(child, nn.Linear)
    conv = (
        direction == "conv_to_linear"
        and bool(kernel)
        and x is not None
        and (all(k == 1 for k in kernel) or tuple(x.shape[2:]) == tuple(kernel))
    )
    if not (linear or conv):
        return []
    why = why or (
        "called directly by code that cannot be traced: what it reads and where its output goes are not "
        "visible to the rewrite; make that code traceable or move the layer into a traceable submodule"
    )
    conv_pattern = pointwise.PATTERN if all(k == 1 for k in kernel) else full_extent.PATTERN
    pattern = flatten_head.PATTERN if linear else conv_pattern
    return [Site(name, pattern, "skipped", why)]
