"""A ``LayerNorm`` over the channels of a value carried with its channels on dim 1 becomes
:func:`~fxsurgery._runtime.layer_norm_channels` (the same normalisation, reduced over dim 1: no transpose).

With ``quantize=`` it becomes :func:`~fxsurgery._runtime.layer_norm_moved` instead: one ``layer_norm`` between two
permutes, which quantizers leave whole (they would quantize each add and multiply of the reductions).

With ``token_layout=True`` a LayerNorm whose output feeds a Linear or an attention is where a region starts: its
input enters the layout (tokens ``(B, S, C)`` as ``(B, C, 1, S)``, a channels-last map as NCHW) here, once.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from fxsurgery import _runtime
from fxsurgery.engine.nodes import as_layer_norm
from fxsurgery.engine.rule import RuleContext, feeds_candidate
from fxsurgery.rules.linear_to_conv.layouts import CONV_LAYOUTS, region_layout

__all__ = ["LayerNormChannels"]


class LayerNormChannels:
    def __init__(self, token_layout: bool = False, one_op: bool = False) -> None:
        self.token_layout = token_layout
        self.norm = _runtime.layer_norm_moved if one_op else _runtime.layer_norm_channels

    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        mod = as_layer_norm(node, rw.modules)
        if mod is None:
            return False
        x = node.args[0]
        assert isinstance(x, fx.Node)
        carried = rw.carried(x)
        if carried is not None:
            alt, layout = carried
            if layout not in CONV_LAYOUTS:
                return False
        else:
            region = region_layout(x) if self.token_layout else None
            if region is None or not feeds_candidate(node, rw, through=(nn.LayerNorm,)):
                return False
            alt, layout = rw.enter(x, region, node.name), region
        with rw.graph.inserting_before(node):
            w = rw.graph.get_attr(f"{node.target}.weight") if mod.weight is not None else None
            b = rw.graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
            rw.set_alt(node, rw.graph.call_function(self.norm, (alt, w, b, mod.eps)), layout)
        return True
