"""A ``BatchNorm2d`` on a map carried channels-last, whose output reaches another pointwise conv (through elementwise
ops, residual adds, BatchNorms), stays channels-last (:class:`~fxsurgery.engine.layers.ChannelsLastBatchNorm2d`: in eval
mode a per-channel affine ``x * s + t`` on the last dim, ``s = weight / sqrt(var + eps)``, ``t = bias - mean * s``),
so the pointwise convs around it share one conversion instead of converting back and forth."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from fxsurgery.engine.layers import ChannelsLastBatchNorm2d
from fxsurgery.engine.rule import RuleContext, feeds_candidate, module_skip_reason
from fxsurgery.rules.conv_to_linear.layouts import CHANNELS_LAST

__all__ = ["ChannelsLastBatchNorm"]


class ChannelsLastBatchNorm:
    def propagate(self, node: fx.Node, rw: RuleContext) -> bool:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            return False
        carried = rw.carried(node.args[0])
        name = str(node.target)
        mod = rw.modules.get(name)
        if carried is None or type(mod) is not nn.BatchNorm2d or carried[1] is not CHANNELS_LAST[4]:
            return False
        if name in rw.new_modules or module_skip_reason(name, mod, (nn.BatchNorm2d,), rw) is not None:
            return False
        if not feeds_candidate(node, rw, through=(nn.BatchNorm2d,)):
            return False  # a 3x3 conv comes next: converting back before or after the BatchNorm costs the same
        rw.new_modules[name] = ChannelsLastBatchNorm2d.sharing(mod)
        with rw.graph.inserting_before(node):
            rw.set_alt(node, rw.graph.call_module(name, (carried[0],)), carried[1])
        return True
