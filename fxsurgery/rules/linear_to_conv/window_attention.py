"""``window-attention`` (``token_layout=True``): torchvision's ``shifted_window_attention`` (Swin v1 and v2) on a
``(B, H, W, C)`` map becomes :func:`~fxsurgery._runtime.window_attention_nchw` on NCHW, with its ``qkv`` and ``proj``
Linears as 1x1 ``Conv2d`` modules (kernels ``W.view(O, C, 1, 1)``): the same steps, each window's tokens carried as
``(B*windows, C, 1, S)``. The site is named after the ``qkv`` Linear, so ``exclude=["...attn.qkv"]`` keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from fxsurgery import _runtime
from fxsurgery.engine.layers import conv_viewing_linear
from fxsurgery.engine.nodes import EXACT_LINEAR, bind, is_torchvision, static_shape
from fxsurgery.engine.rule import Match, RuleContext, Skip
from fxsurgery.report import Site
from fxsurgery.rules.linear_to_conv.layouts import NCHW_LAYOUT

__all__ = ["WindowAttention", "PATTERN"]

PATTERN = "window-attention"


@dataclass(frozen=True)
class WindowMatch(Match):
    x: fx.Node
    x_shape: tuple[int, ...]
    linears: dict[str, tuple[str, Any]]


def _linear_of(args: dict[str, Any], role: str, rw: RuleContext) -> tuple[str, Any]:
    """The Linear whose weight (and bias) the call reads for ``role``, as ``(qualified name, module)``."""
    w, b = args.get(f"{role}_weight"), args.get(f"{role}_bias")
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and str(w.target).endswith(".weight")):
        raise Skip(f"the {role} weight is not a Linear's weight")
    owner = str(w.target)[: -len(".weight")]
    # the GraphModule keeps a Linear read only through get_attr as a plain Module holding its parameters
    mod = rw.modules.get(owner)
    weight = getattr(mod, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2 or type(mod) not in (nn.Module, *EXACT_LINEAR):
        raise Skip(f"the {role} weight is not a Linear's weight")
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr" and b.target == f"{owner}.bias"):
        raise Skip(f"the {role} bias is not the same Linear's bias")
    for pname, p in mod.named_parameters(recurse=False):  # type: ignore[union-attr]
        if [o for o in rw.param_owners.get(id(p), []) if o != f"{owner}.{pname}"]:
            raise Skip(f"{owner}.{pname} is shared with another module (tied weights)")
    return owner, mod


class WindowAttention:
    pattern = PATTERN
    timing = "block-only"  # a function of several layers

    def claims(self, node: fx.Node, rw: RuleContext) -> str | None:
        if node.op != "call_function" or not is_torchvision(node.target, "shifted_window_attention"):
            return None
        weight = bind(node).get("qkv_weight")
        return str(weight.target).rsplit(".", 1)[0] if isinstance(weight, fx.Node) else node.name

    def match(self, node: fx.Node, rw: RuleContext) -> WindowMatch | Skip:
        args = bind(node)
        linears = {role: _linear_of(args, role, rw) for role in ("qkv", "proj")}
        x = args.get("input")
        if not isinstance(x, fx.Node) or len(static_shape(x, "the attention input")) != 4:
            return Skip("the input is not a 4-D (B, H, W, C) map")
        carried = rw.carried(x)
        if carried is not None and carried[1] is not NCHW_LAYOUT:
            return Skip(f"the input is carried in layout {carried[1].name}")
        return WindowMatch(node, linears["qkv"][0], x, static_shape(x, "the attention input"), linears)

    def apply(self, m: WindowMatch, rw: RuleContext) -> tuple[Site, Site]:
        src = rw.enter(m.x, NCHW_LAYOUT, m.name)
        for owner, mod in m.linears.values():
            rw.new_modules[owner] = conv_viewing_linear(mod.weight, getattr(mod, "bias", None), mod.training)
        with rw.graph.inserting_before(m.node):
            new = rw.graph.call_function(_runtime.window_attention_nchw, (src, *m.node.args[1:]), dict(m.node.kwargs))
        rw.set_alt(m.node, new, NCHW_LAYOUT)
        (qkv_name, qkv), (proj_name, proj) = m.linears["qkv"], m.linears["proj"]
        c, o_qkv, o_proj = m.x_shape[3], qkv.weight.shape[0], proj.weight.shape[0]
        proj_site = Site(
            proj_name,
            PATTERN,
            "rewritten",
            before=f"Linear({c}->{o_proj}) (window attention output projection)",
            after=f"Conv2d({c}, {o_proj}, kernel=1x1) on windows as (B*nW, C, 1, S)",
            input_shape=m.x_shape,
        )
        qkv_site = Site(
            qkv_name,
            PATTERN,
            "rewritten",
            before=f"Linear({c}->{o_qkv}) in shifted_window_attention on (B, H, W, C)",
            after=f"Conv2d({c}, {o_qkv}, kernel=1x1) in window_attention_nchw on NCHW",
            input_shape=m.x_shape,
        )
        return proj_site, qkv_site
