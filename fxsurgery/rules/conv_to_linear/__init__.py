"""Conv2d (and Conv1d, ConvTranspose2d) -> Linear: the rule set, in priority order.

Patterns, each in its own module:

* ``convtranspose1x1``: :mod:`.convtranspose_1x1`
* ``conv1d-k1``: :mod:`.conv1d_k1`
* ``conv-full-extent``: :mod:`.full_extent`
* ``conv1x1-strided``: :mod:`.strided_pointwise`
* ``conv1x1``: :mod:`.pointwise`

Candidates are convolutions with a pointwise kernel or a kernel as large as their input; everything else (groups > 1,
padding on a 1x1 kernel, other kernels, strided transposed convs) is skipped with the reason. Propagators:
:mod:`.batch_norm` (BatchNorm2d stays channels-last between pointwise convs), and the engine's elementwise and
static-rank propagators.
"""

from __future__ import annotations

from fxsurgery.engine.propagate import Elementwise, StaticRank
from fxsurgery.engine.rule import RuleSet
from fxsurgery.rules.conv_to_linear.batch_norm import ChannelsLastBatchNorm
from fxsurgery.rules.conv_to_linear.conv1d_k1 import Conv1dK1
from fxsurgery.rules.conv_to_linear.convtranspose_1x1 import ConvTranspose1x1
from fxsurgery.rules.conv_to_linear.full_extent import FullExtent
from fxsurgery.rules.conv_to_linear.pointwise import Pointwise
from fxsurgery.rules.conv_to_linear.strided_pointwise import StridedPointwise

__all__ = ["rule_set", "DIRECTION"]

DIRECTION = "conv_to_linear"


def rule_set() -> RuleSet:
    """The conv -> Linear rules."""
    rules = (ConvTranspose1x1(), Conv1dK1(), FullExtent(), StridedPointwise(), Pointwise())
    return RuleSet(DIRECTION, rules, (StaticRank(), ChannelsLastBatchNorm(), Elementwise()))
