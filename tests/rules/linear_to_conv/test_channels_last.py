"""channels-last-linear: the Linears of a ConvNeXt block (permute, LayerNorm, Linear, GELU, Linear, permute back)
are 1x1 convs on the NCHW map, with no permute left (NumPy float64 reference)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tests import reference
from tests.conftest import run_surgery


class Block(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c)

    def forward(self, x):
        y = self.fc2(self.act(self.fc1(self.norm(x.permute(0, 2, 3, 1)))))
        return x + y.permute(0, 3, 1, 2)


def test_block_rewritten_without_permutes_and_equal_to_the_numpy_block():
    model = Block().eval().double()
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    res = run_surgery("linear_to_conv", model, x, rewritten=["fc1", "fc2"])
    # the LayerNorm (rules/linear_to_conv/layer_norm.py) already carries the region in NCHW: both Linears read a
    # carried value
    assert [s.pattern for s in res.sites] == ["chain-linear", "chain-linear"]
    assert not [n for n in res.module.graph.nodes if n.target == "permute"], res.module.code
    w = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    t = x.numpy().transpose(0, 2, 3, 1)
    h = reference.linear(reference.layer_norm(t, -1, w["norm.weight"], w["norm.bias"], 1e-5), w["fc1.weight"],
                         w["fc1.bias"])  # fmt: skip
    h = torch.nn.functional.gelu(torch.from_numpy(h)).numpy()  # GELU's erf is not NumPy's
    expected = x.numpy() + reference.linear(h, w["fc2.weight"], w["fc2.bias"]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        np.testing.assert_allclose(res.module(x).numpy(), expected, rtol=0, atol=1e-12)


def test_a_linear_reading_the_permute_itself():
    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    res = run_surgery("linear_to_conv", Direct().eval().double(), x, rewritten=["fc"])
    assert res.sites[0].pattern == "channels-last-linear"
    assert not [n for n in res.module.graph.nodes if n.target == "permute"], res.module.code


def test_a_channels_last_map_that_no_permute_feeds_needs_the_token_layout():
    class Swinish(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):  # x is already (N, H, W, C)
            return self.fc(x)

    x = torch.randn(2, 3, 4, 6)
    run_surgery("linear_to_conv", Swinish().eval(), x, rewritten=[], skipped={"fc": "pass token_layout=True"})
    res = run_surgery("linear_to_conv", Swinish().eval(), x, rewritten=["fc"], token_layout=True)
    assert res.sites[0].pattern == "channels-last-linear"
