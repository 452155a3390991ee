"""token-linear (token_layout=True): Linears on (B, S, C) tokens are 1x1 convs on (B, C, 1, S), from the LayerNorm
that starts the block (NumPy float64 reference)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tests import reference
from tests.conftest import run_surgery


class Mlp(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.ReLU(), nn.Linear(2 * c, c)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def test_block_rewritten_with_one_conversion_in_and_out_and_equal_to_numpy():
    model = Mlp().eval().double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    res = run_surgery("linear_to_conv", model, x, rewritten=["fc1", "fc2"], token_layout=True)
    assert [s.pattern for s in res.sites] == ["token-linear", "token-linear"]
    transposes = [n for n in res.module.graph.nodes if n.target == "transpose"]
    assert len(transposes) == 2, res.module.code
    w = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    h = reference.layer_norm(x.numpy(), -1, w["norm.weight"], w["norm.bias"], 1e-5)
    h = reference.relu(reference.linear(h, w["fc1.weight"], w["fc1.bias"]))
    expected = x.numpy() + reference.linear(h, w["fc2.weight"], w["fc2.bias"])
    with torch.no_grad():
        np.testing.assert_allclose(res.module(x).numpy(), expected, rtol=0, atol=1e-12)


def test_without_the_token_layout_tokens_are_skipped_with_the_option_to_pass():
    run_surgery("linear_to_conv", Mlp().eval(), torch.randn(2, 5, 8), rewritten=[],
                skipped={"fc1": "pass token_layout=True", "fc2": "pass token_layout=True"})  # fmt: skip
