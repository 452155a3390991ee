"""A ``LayerNorm`` over the channels of a value carried with its channels on dim 1 becomes
:func:`~fxsurgery._runtime.layer_norm_channels` (the same normalisation, reduced over dim 1: no transpose).

With ``quantize=`` it becomes :func:`~fxsurgery._runtime.layer_norm_moved` instead: one ``layer_norm`` between two
permutes, which quantizers leave whole (they would quantize each add and multiply of the reductions).

With ``token_layout=True`` a LayerNorm whose output feeds a Linear or an attention is where a region starts: its
input enters the layout (tokens ``(B, S, C)`` as ``(B, C, 1, S)``, a channels-last map as NCHW) here, once.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxsurgery import _runtime
from fxsurgery.capture.shapes import shape_of
from fxsurgery.engine.nodes import as_layer_norm
from fxsurgery.engine.rule import RuleContext, feeds_candidate
from fxsurgery.rules.linear_to_conv.layouts import conv_layout, region_layout

__all__ = ["LayerNormChannels"]


class LayerNormChannels:
    def __init__(self, token_layout: bool = False, one_op: bool = False) -> None:
        self.token_layout = token_layout
        self.norm = _runtime.layer_norm_moved if one_op else _runtime.layer_norm_channels

    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        norm = _layer_norm(node, rw)
        if norm is None:
            return False
        x, weight, bias, eps = norm
        carried = rw.carried(x)
        if carried is not None:
            alt, layout = carried
            if not conv_layout(layout):
                return False
        else:
            region = region_layout(x) if self.token_layout else None
            if region is None or not feeds_candidate(node, rw, through=(nn.LayerNorm,)):
                return False
            alt, layout = rw.enter(x, region, node.name), region
        with rw.graph.inserting_before(node):
            w = rw.graph.get_attr(weight) if isinstance(weight, str) else weight
            b = rw.graph.get_attr(bias) if isinstance(bias, str) else bias
            rw.set_alt(node, rw.graph.call_function(self.norm, (alt, w, b, eps)), layout)
        return True


def _layer_norm(node: fx.Node, rw: RuleContext) -> tuple[fx.Node, Any, Any, float] | None:
    """``(x, weight, bias, eps)`` of a LayerNorm over the last dim: an ``nn.LayerNorm`` call (weight and bias as the
    paths of its parameters), or ``F.layer_norm(x, (C,), weight, bias, eps)`` (a subclass traced through, timm's)."""
    mod = as_layer_norm(node, rw.modules)
    if mod is not None:
        source = node.args[0]
        assert isinstance(source, fx.Node)
        path = str(node.target)
        bias_path = f"{path}.bias" if mod.bias is not None else None
        return source, f"{path}.weight" if mod.weight is not None else None, bias_path, mod.eps
    if not (node.op == "call_function" and node.target is F.layer_norm and isinstance(node.args[0], fx.Node)):
        return None
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    args = {**dict(zip(names, node.args)), **node.kwargs}
    x = args["input"]
    assert isinstance(x, fx.Node)
    shape, eps = args.get("normalized_shape"), args.get("eps", 1e-5)
    last = (shape_of(x) or (None,))[-1]
    if not isinstance(shape, (tuple, list)) or len(shape) != 1 or shape[0] != last or not isinstance(eps, float):
        return None
    weight, bias = args.get("weight"), args.get("bias")
    if not all(v is None or (isinstance(v, fx.Node) and v.op == "get_attr") for v in (weight, bias)):
        return None  # a weight computed in the graph: left where it is
    return x, weight, bias, eps
