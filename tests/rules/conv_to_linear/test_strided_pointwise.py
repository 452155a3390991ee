"""conv1x1-strided: a strided 1x1 conv (a ResNet downsample) reads every s-th pixel, then a Linear."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tests import reference
from tests.conftest import run_surgery


def test_downsample_equals_the_numpy_strided_conv():
    model = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2)).eval().double()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    res = run_surgery("conv_to_linear", model, x, rewritten=["0"])
    assert res.sites[0].pattern == "conv1x1-strided"
    w, b = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    with torch.no_grad():
        np.testing.assert_allclose(res.module(x).numpy(), reference.conv2d(x.numpy(), w, b, stride=2), rtol=0,
                                   atol=1e-12)  # fmt: skip


def test_a_padded_strided_pointwise_conv_is_skipped():
    run_surgery("conv_to_linear", nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, padding=1)).eval(), torch.randn(2, 4, 6, 6),
                rewritten=[], skipped={"0": "padding=(1, 1)"})  # fmt: skip
