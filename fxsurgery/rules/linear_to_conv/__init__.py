"""Linear -> Conv2d: the rule set, in priority order.

Patterns (found by graph pattern and propagated shapes, never by layer names), each in its own module:

* ``self-attention`` (token layout): :mod:`.self_attention`
* ``window-attention`` (token layout): :mod:`.window_attention`
* ``channels-last-linear``: :mod:`.channels_last`
* ``token-linear`` (token layout): :mod:`.token_linear`
* ``chain-linear``: :mod:`.chain`
* ``pool->linear``: :mod:`.pool_head`
* ``pool1d->linear``: :mod:`.pool1d_head`
* ``flatten->linear``: :mod:`.flatten_head` (last: it claims every Linear no other rule claimed)

With the token layout, HuggingFace-style attention (``view -> transpose -> SDPA``) is carried per head as
``(B, H, D, S)`` between its projections: :mod:`.heads`.

Propagators carry the regions between sites: :mod:`.carry` (permute seed, class-token select, stochastic depth),
:mod:`.layer_norm` (LayerNorm over channels), and the engine's elementwise and static-rank propagators. Functional
``F.linear(x, w, b)`` sites become ``F.conv2d(x, w.view(...), b)``, so the parameter keeps its 2-D shape.
"""

from __future__ import annotations

from fxsurgery.engine.propagate import Elementwise, StaticRank
from fxsurgery.engine.rule import Propagator, Rule, RuleSet
from fxsurgery.rules.linear_to_conv.carry import PermuteSeed, SelectToken, StochasticDepth, TokenRows
from fxsurgery.rules.linear_to_conv.chain import ChainLinear
from fxsurgery.rules.linear_to_conv.channels_last import ChannelsLastLinear
from fxsurgery.rules.linear_to_conv.decoder import (
    Broadcast,
    Cast,
    Reduce,
    ShapeRead,
    Slice,
)
from fxsurgery.rules.linear_to_conv.decoder_heads import HeadExpand, HeadStack, HeadUnsqueeze
from fxsurgery.rules.linear_to_conv.flatten_head import FlattenHead
from fxsurgery.rules.linear_to_conv.fused_heads import HeadUnbind
from fxsurgery.rules.linear_to_conv.heads import (
    ChannelAttention,
    ChannelMatmul,
    HeadCat,
    HeadMerge,
    HeadPermute,
    HeadSplit,
    SameShape,
    SplitChannels,
)
from fxsurgery.rules.linear_to_conv.layer_norm import LayerNormChannels
from fxsurgery.rules.linear_to_conv.layouts import BATCH_LAYOUTS
from fxsurgery.rules.linear_to_conv.pool1d_head import Pool1dHead
from fxsurgery.rules.linear_to_conv.pool_head import PoolHead
from fxsurgery.rules.linear_to_conv.regroup import Pad, Regroup, Roll
from fxsurgery.rules.linear_to_conv.self_attention import SelfAttention
from fxsurgery.rules.linear_to_conv.token_linear import TokenLinear
from fxsurgery.rules.linear_to_conv.window_attention import WindowAttention

__all__ = ["rule_set", "DIRECTION"]

DIRECTION = "linear_to_conv"


def rule_set(batch_layout: str = "spatial", token_layout: bool = False, quantize: bool = False) -> RuleSet:
    """The Linear -> conv rules for these options (``quantize``: LayerNorms and attention products in the forms
    quantizers keep whole)."""
    point = BATCH_LAYOUTS[batch_layout]
    rules: list[Rule] = [SelfAttention(), WindowAttention()] if token_layout else []
    rules += [
        ChannelsLastLinear(token_layout),
        TokenLinear(token_layout),
        ChainLinear(),
        PoolHead(point),
        Pool1dHead(point),
        FlattenHead(point),
    ]
    propagators: tuple[Propagator, ...] = (
        StaticRank(),
        PermuteSeed(token_layout),
        SelectToken(),
        StochasticDepth(),
        TokenRows(),
        LayerNormChannels(token_layout, one_op=quantize),
    )
    if token_layout:  # attention carried per head (HuggingFace's view -> transpose -> SDPA)
        propagators += (
            SplitChannels(),
            HeadSplit(),
            HeadUnbind(),
            HeadPermute(),
            HeadMerge(),
            SameShape(),
            HeadCat(),
            ChannelAttention(sdpa=quantize),
            ChannelMatmul(matmul=quantize),
        )
        # decoders: RMSNorm over channels, rotary embeddings, grouped-query heads; reshapes, pads and rolls (Swin)
        propagators += (
            Broadcast(),
            Reduce(),
            Cast(),
            Slice(),
            HeadUnsqueeze(),
            HeadExpand(),
            HeadStack(),
            Regroup(),
            Pad(),
            Roll(),
            ShapeRead(),
        )
    return RuleSet(DIRECTION, tuple(rules), propagators + (Elementwise(),))
