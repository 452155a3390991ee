"""chain-linear: a Linear after a rewritten site is a 1x1 conv on the carried value (NumPy float64 reference)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tests import reference
from tests.conftest import layout_ops, run_surgery


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8 * 2 * 2, 16), nn.ReLU(), nn.Linear(16, 5)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x.flatten(1))))


def test_rewritten_in_the_carried_layout_and_equal_to_the_numpy_mlp():
    model = Classifier().eval().double()
    x = torch.randn(3, 8, 2, 2, dtype=torch.float64)
    res = run_surgery("linear_to_conv", model, x, rewritten=["fc1", "fc2"], batch_layout="batch")
    assert [s.pattern for s in res.sites] == ["flatten->linear", "chain-linear"]
    assert layout_ops(res.module) == 1  # one conversion back at the end, none between the sites
    w = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    hidden = reference.relu(reference.linear(x.numpy().reshape(3, -1), w["fc1.weight"], w["fc1.bias"]))
    expected = reference.linear(hidden, w["fc2.weight"], w["fc2.bias"])
    with torch.no_grad():
        np.testing.assert_allclose(res.module(x).numpy(), expected, rtol=0, atol=1e-12)


def test_a_shared_linear_in_the_chain_is_skipped():
    class Shared(Classifier):
        def forward(self, x):
            h = self.act(self.fc1(x.flatten(1)))
            return self.fc2(h), self.fc2(h * 2)

    res = run_surgery("linear_to_conv", Shared().eval(), torch.randn(3, 8, 2, 2), rewritten=["fc1"],
                      skipped={"fc2": "called 2 times in forward"})  # fmt: skip
    assert {s.name: s.pattern for s in res.sites}["fc2"] == "chain-linear"
