"""``conv1x1``: ``Conv2d(C, O, 1)`` with stride 1, padding 0 and groups 1 (dilation is irrelevant for a 1x1 kernel)
is a ``Linear(C -> O)`` with weight ``K.view(O, C)`` applied at every pixel, on the map carried channels-last
``(N, H, W, C)``, or on ``(N, C)`` when the map is 1x1 (flatten, Linear, view back)."""

from __future__ import annotations

from fxsurgery.rules.conv_to_linear._convert import PointwiseRule

__all__ = ["Pointwise", "PATTERN"]

PATTERN = "conv1x1"


class Pointwise(PointwiseRule):
    pattern = PATTERN
    strided = False
