"""conv1x1: a 1x1 Conv2d is a Linear at every pixel, carried channels-last (the seed notebook's NumPy conv)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fxsurgery.models import NetworkInNetwork
from tests import reference
from tests.conftest import run_surgery


def test_network_in_network_pointwise_convs_equal_the_numpy_convs():
    model = NetworkInNetwork(8).eval().double()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    res = run_surgery("conv_to_linear", model, x, rewritten=["pointwise1", "pointwise2"])
    assert {s.pattern for s in res.sites} == {"conv1x1"}
    assert isinstance(res.module.get_submodule("pointwise1"), nn.Linear)
    w = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y = model.conv1(x).relu().numpy()  # the 3x3 conv is not a candidate and stays
    y = reference.relu(reference.conv2d(y, w["pointwise1.weight"], w["pointwise1.bias"]))
    expected = reference.relu(reference.conv2d(y, w["pointwise2.weight"], w["pointwise2.bias"]))
    with torch.no_grad():
        np.testing.assert_allclose(res.module(x).numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "conv, reason",
    [
        (nn.Conv2d(4, 6, 1, padding=1), "a padded 1x1 conv adds a border"),
        (nn.Conv2d(4, 6, 1, groups=2), "groups=2"),
        (nn.Conv2d(4, 6, 1, padding="same"), None),  # "same" is no padding on a 1x1 kernel: rewritten
    ],
)
def test_padding_and_groups(conv, reason):
    model = nn.Sequential(conv).eval()
    x = torch.randn(2, 4, 3, 3)
    if reason is None:
        run_surgery("conv_to_linear", model, x, rewritten=["0"])
    else:
        run_surgery("conv_to_linear", model, x, rewritten=[], skipped={"0": reason})
