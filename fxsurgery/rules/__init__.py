"""Rewrite rules, one module per pattern, grouped in one rule set per direction.

``linear_to_conv`` (:mod:`fxsurgery.rules.linear_to_conv`) and ``conv_to_linear``
(:mod:`fxsurgery.rules.conv_to_linear`); :func:`rule_set` builds the set a pass uses from its options.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch import nn

from fxsurgery.capture.layers import linear_layers
from fxsurgery.engine.nodes import CONV_TYPES
from fxsurgery.engine.rule import RuleSet
from fxsurgery.errors import InputError
from fxsurgery.report import Site
from fxsurgery.rules import conv_to_linear, linear_to_conv
from fxsurgery.rules.conv_to_linear import full_extent, pointwise
from fxsurgery.rules.linear_to_conv import flatten_head, token_linear

if TYPE_CHECKING:
    from fxsurgery.options import Options

__all__ = ["DIRECTIONS", "rule_set", "bare_candidate", "unlisted_linears"]

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


#: Why a Linear no rule listed stays, when nothing more specific is known.
UNSEEN = "not called in the captured graph: the forward does not use it on the example inputs"
#: ... and when the graph reads its weight.
WEIGHT_ONLY = (
    "not called as a layer: the graph reads its weight in an operation of its own (a functional attention, a "
    "custom product), which no rule rewrites"
)
#: ... and when a module around it is called as one layer of the graph (``nn.MultiheadAttention``'s ``out_proj``).
INSIDE_CALL = "inside {} ({}), which the graph calls as one layer: no rule rewrote that layer"
#: ... and when it is a Linear subclass torch.fx traced through.
TRACED_THROUGH = "its forward is traced through, and its operations are listed as the graph's own"


def unlisted_linears(
    model: nn.Module, rewritten: nn.Module, sites: list[Site], why: Mapping[str, str], token_layout: bool
) -> list[Site]:
    """Every Linear of ``model`` (subclasses and transformers' ``Conv1D`` too) that no listed site is or contains,
    as a skipped site (fused mixture-of-experts layers are listed by :mod:`.linear_to_conv.experts`): its reason from
    ``why`` (the layer's own path, or a submodule around it that was left untouched), else :data:`WEIGHT_ONLY` when
    a graph of ``rewritten`` reads its weight, else :data:`UNSEEN`. Every Linear is a site, always."""
    listed = {s.name for s in sites}
    graph_nodes = [
        (prefix, n)
        for prefix, gm in rewritten.named_modules()
        if isinstance(gm, fx.GraphModule)
        for n in gm.graph.nodes
    ]
    read = {f"{prefix}.{n.target}".lstrip(".") for prefix, n in graph_nodes if n.op == "get_attr"}
    called = {f"{prefix}.{n.target}".lstrip(".") for prefix, n in graph_nodes if n.op == "call_module"}
    kinds = dict(model.named_modules())
    pattern = token_linear.PATTERN if token_layout else flatten_head.PATTERN
    out = []
    for name in linear_layers(model):
        paths = [".".join(name.split(".")[:i]) for i in range(name.count(".") + 1, 0, -1)]  # itself, then outwards
        if any(p in listed for p in paths):
            continue
        weight_read = f"{name}.weight" in read
        reason = next(
            (f"inside {p}, which was left untouched: {why[p]}" for p in paths[1:] if p in why),
            next(
                (INSIDE_CALL.format(p, type(kinds[p]).__name__) for p in paths[1:] if p in called),
                WEIGHT_ONLY if weight_read else UNSEEN,
            ),
        )
        if name in why:  # a subclass kept as it is: torch.fx traced through its forward
            reason = f"{why[name]}; " + (TRACED_THROUGH if weight_read else reason)
        out.append(Site(name, pattern, "skipped", reason))
    return out
