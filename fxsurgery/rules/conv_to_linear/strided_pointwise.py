"""``conv1x1-strided``: a 1x1 ``Conv2d`` with stride ``s`` (a ResNet downsample) reads only every ``s``-th pixel:
``x[:, :, ::s, ::s]``, then a ``Linear(C -> O)`` with weight ``K.view(O, C)`` as for ``conv1x1``. (Checking the
kernel size alone would be wrong here.)"""

from __future__ import annotations

from fxsurgery.rules.conv_to_linear._convert import PointwiseRule

__all__ = ["StridedPointwise", "PATTERN"]

PATTERN = "conv1x1-strided"


class StridedPointwise(PointwiseRule):
    pattern = PATTERN
    strided = True
