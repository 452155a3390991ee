"""``self-attention`` (``token_layout=True``): ``nn.MultiheadAttention(x, x, x)`` on ``(B, S, C)`` tokens becomes
:class:`~fxsurgery.engine.layers.ConvSelfAttention` on ``(B, C, 1, S)``.

q/k/v is one 1x1 conv with kernel ``in_proj_weight.view(3C, C, 1, 1)``; attention runs per head on
``(B, heads, head_dim, S)`` without transposing the activations; ``out_proj`` is a 1x1 conv with kernel
``out_proj.weight.view(C, C, 1, 1)``. Only unmasked, ``batch_first=True`` self-attention whose attention weights are
unused is rewritten; the rest is skipped with its reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from fxsurgery.engine.layers import ConvSelfAttention
from fxsurgery.engine.nodes import static_shape
from fxsurgery.engine.rule import Match, RuleContext, Skip, module_skip_reason
from fxsurgery.report import Site
from fxsurgery.rules.linear_to_conv.layouts import TOKEN_LAYOUT
from fxsurgery.rules.linear_to_conv.token_linear import PATTERN as TOKEN_PATTERN

__all__ = ["SelfAttention", "PATTERN"]

PATTERN = "self-attention"
_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


@dataclass(frozen=True)
class AttentionMatch(Match):
    module: nn.MultiheadAttention
    x: fx.Node
    x_shape: tuple[int, ...]


class SelfAttention:
    pattern = PATTERN
    timing = "block"
    owns_children = True  # its out_proj

    def claims(self, node: fx.Node, rw: RuleContext) -> str | None:
        if node.op == "call_module" and isinstance(rw.modules.get(str(node.target)), nn.MultiheadAttention):
            return str(node.target)
        return None

    def match(self, node: fx.Node, rw: RuleContext) -> AttentionMatch | Skip:
        name = str(node.target)
        mod = rw.modules[name]
        reason = module_skip_reason(name, mod, (nn.MultiheadAttention,), rw)
        if reason:
            return Skip(reason)
        assert isinstance(mod, nn.MultiheadAttention)
        args = dict(zip(_ARGS, node.args), **node.kwargs)
        x = args.get("query")
        if not isinstance(x, fx.Node) or args.get("key") is not x or args.get("value") is not x:
            return Skip("not self-attention (query, key and value are not one tensor)")
        if any(args.get(k) is not None for k in ("key_padding_mask", "attn_mask")) or args.get("is_causal"):
            return Skip("called with an attention mask; only unmasked self-attention is rewritten")
        if not mod.batch_first:
            return Skip("batch_first=False: tokens are (S, B, C); only batch_first=True attention is rewritten")
        if not mod._qkv_same_embed_dim or mod.in_proj_weight is None:
            return Skip("separate q/k/v projection weights (kdim/vdim differ from embed_dim)")
        if mod.bias_k is not None or mod.add_zero_attn:
            return Skip("add_bias_kv / add_zero_attn attention is not rewritten")
        items = [u.args[1] if u.op == "call_function" and u.target is operator.getitem else None for u in node.users]
        if any(i != 0 and (i != 1 or u.users) for i, u in zip(items, node.users)):
            return Skip("the attention weights it returns are used")  # (``x, _ = mha(...)`` leaves item 1 unused)
        x_shape = static_shape(x, "the attention input")
        if len(x_shape) != 3:
            return Skip(f"input is {len(x_shape)}-D, not (B, S, C) tokens")
        carried = rw.carried(x)
        if carried is not None and carried[1] is not TOKEN_LAYOUT:
            return Skip(f"the input is carried in layout {carried[1].name}")
        return AttentionMatch(node, name, mod, x, x_shape)

    def apply(self, m: AttentionMatch, rw: RuleContext) -> tuple[Site, Site]:
        src = rw.enter(m.x, TOKEN_LAYOUT, m.name)
        rw.new_modules[m.name] = ConvSelfAttention(m.module)
        with rw.graph.inserting_before(m.node):
            out = rw.graph.call_module(m.name, (src,))
        rw.set_alt(m.node, out, TOKEN_LAYOUT)  # a tuple whose only used item is carried: the call goes away
        for u in m.node.users:  # (after the call, so that its items are removed before it)
            rw.set_alt(u, out, TOKEN_LAYOUT)
        c, h, layout = m.module.embed_dim, m.module.num_heads, TOKEN_LAYOUT.name
        out_proj = Site(
            f"{m.name}.out_proj",
            TOKEN_PATTERN,
            "rewritten",
            before=f"Linear({c}->{c}) (output projection, inside MultiheadAttention)",
            after=f"Conv2d({c}, {c}, kernel=1x1) {layout}",
            input_shape=m.x_shape,
        )
        site = Site(
            m.name,
            PATTERN,
            "rewritten",
            before=f"MultiheadAttention({c}, {h} heads) on (B, S, C)",
            after=f"ConvSelfAttention: q/k/v Conv2d({c}, {3 * c}, kernel=1x1) and out_proj Conv2d 1x1 on {layout}",
            input_shape=m.x_shape,
        )
        return out_proj, site
