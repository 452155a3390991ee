"""flatten->linear: a Linear on a flattened map is an HxW conv on the map (NumPy float64 reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests import reference
from tests.conftest import run_surgery


class Head(nn.Module):
    def __init__(self, flatten, out=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 2, out)
        self.flatten = flatten

    def forward(self, x):
        return self.fc(self.flatten(self.conv(x)))


@pytest.mark.parametrize("order", ["NCHW", "NHWC"])
def test_rewritten_as_an_hxw_conv_equal_to_the_numpy_linear(order):
    flatten = (lambda y: y.flatten(1)) if order == "NCHW" else (lambda y: y.permute(0, 2, 3, 1).flatten(1))
    model = Head(flatten).eval().double()
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64)
    res = run_surgery("linear_to_conv", model, x, rewritten=["fc"])
    assert [s.pattern for s in res.sites] == ["flatten->linear"]
    conv = res.module.get_submodule("fc")
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 2)
    feature = model.conv(x).detach().numpy()
    flat = feature.reshape(2, -1) if order == "NCHW" else feature.transpose(0, 2, 3, 1).reshape(2, -1)
    expected = reference.linear(flat, model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy())
    with torch.no_grad():
        np.testing.assert_allclose(res.module(x).numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "flatten, reason",
    [
        (lambda y: y.reshape(2, -1), "the reshape hard-codes the batch size (2)"),
        (lambda y: y.mean(3).flatten(1).repeat(1, 2), "is not a flattened or pooled 4-D feature map"),
    ],
)
def test_skipped_with_the_reason(flatten, reason):
    model = Head(flatten).eval()
    res = run_surgery("linear_to_conv", model, torch.randn(2, 3, 3, 2), rewritten=[], skipped={"fc": reason},
                      precision="native")  # fmt: skip
    assert res.sites[0].pattern == "flatten->linear"


def test_a_linear_on_plain_vectors_is_skipped():
    res = run_surgery("linear_to_conv", nn.Sequential(nn.Linear(6, 3)).eval(), torch.randn(2, 6), rewritten=[],
                      skipped={"0": "is not a flattened or pooled 4-D feature map"})  # fmt: skip
    assert not any(isinstance(m, nn.Conv2d) for m in res.module.modules())
