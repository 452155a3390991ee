"""pool->linear: a Linear on x.mean([2, 3]) is a mean with keepdim and a 1x1 conv (NumPy float64 reference)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tests import reference
from tests.conftest import run_surgery


class Pooled(nn.Module):
    def __init__(self, dims=(2, 3)):
        super().__init__()
        self.dims = list(dims)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.drop(x.mean(self.dims)))


def test_rewritten_through_elementwise_ops_and_equal_to_the_numpy_linear():
    model = Pooled().eval().double()
    x = torch.randn(3, 6, 5, 4, dtype=torch.float64)
    res = run_surgery("linear_to_conv", model, x, rewritten=["fc"])
    assert [s.pattern for s in res.sites] == ["pool->linear"]
    means = [n for n in res.module.graph.nodes if n.target == "mean"]
    assert means and all(n.kwargs.get("keepdim") for n in means)
    expected = reference.linear(x.numpy().mean(axis=(2, 3)), model.fc.weight.detach().numpy(),
                                model.fc.bias.detach().numpy())  # fmt: skip
    with torch.no_grad():
        np.testing.assert_allclose(res.module(x).numpy(), expected, rtol=0, atol=1e-12)


def test_a_mean_over_other_dims_is_not_a_pooled_head():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x.mean([1, 2]))

    res = run_surgery("linear_to_conv", M().eval(), torch.randn(2, 6, 5, 4), rewritten=[],
                      skipped={"fc": "not a flattened or pooled 4-D feature map"})  # fmt: skip
    assert res.sites[0].pattern == "flatten->linear"  # the last rule says why no rule applies
