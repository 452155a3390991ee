"""chain-linear: a Linear after a rewritten site is a 1x1 conv on the carried value (NumPy float64 reference)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import fxsurgery
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


def test_a_shared_linear_in_the_chain_is_one_conv_called_twice():
    class Shared(Classifier):
        def forward(self, x):
            h = self.act(self.fc1(x.flatten(1)))
            return self.fc2(h), self.fc2(h * 2)

    res = run_surgery("linear_to_conv", Shared().eval(), torch.randn(3, 8, 2, 2), rewritten=["fc1", "fc2"])
    site = {s.name: s for s in res.sites}["fc2"]
    assert site.pattern == "chain-linear" and site.after.endswith("(the same at each of its 2 calls)")
    calls = [n.target for n in res.module.graph.nodes if n.op == "call_module"]
    assert calls.count("fc2") == 2 and isinstance(res.module.fc2, nn.Conv2d) and site.calls == 2


def test_the_onnx_check_counts_each_call_of_a_shared_layer(tmp_path):
    class Shared(Classifier):
        def forward(self, x):
            h = self.act(self.fc1(x.flatten(1)))
            return self.fc2(h) + self.fc2(h * 2)

    report = fxsurgery.check(Shared().eval(), torch.randn(3, 8, 2, 2), "conv", tmp_path, batch_layout="batch")
    assert report.onnx.passed and report.passed, report.summary()
    assert "Conv+ConvTranspose +3, Gemm+MatMul+Einsum -3 for 3 rewritten call(s)" in report.onnx.summary()  # fc1 once, fc2 twice


def test_a_shared_linear_also_called_on_a_constant_is_one_conv_and_a_linear_on_its_weight():
    class Shared(Classifier):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.linspace(-1, 1, 16))

        def forward(self, x):
            return self.fc2(self.c) + self.fc2(self.act(self.fc1(x.flatten(1))))  # the first call reads a constant

    model = Shared().eval()
    res = run_surgery("linear_to_conv", model, torch.randn(3, 8, 2, 2), rewritten=["fc1", "fc2"])
    site = {s.name: s for s in res.sites}["fc2"]
    assert site.after.endswith("(one layer for its 2 calls; 1 not rewritten, F.linear on its weight: its input is a "
                               "constant (no model input reaches it, e.g. a relative-position table): export folds it, "
                               "nothing to rewrite)")  # fmt: skip
    assert isinstance(res.module.fc2, nn.Conv2d) and set(res.module.state_dict()) == set(model.state_dict())
    w = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    x = torch.randn(3, 8, 2, 2, dtype=torch.float64)
    hidden = reference.relu(reference.linear(x.numpy().reshape(3, -1), w["fc1.weight"], w["fc1.bias"]))
    expected = reference.linear(w["c"][None], w["fc2.weight"], w["fc2.bias"]) + reference.linear(
        hidden, w["fc2.weight"], w["fc2.bias"]
    )
    with torch.no_grad():
        np.testing.assert_allclose(res.module.double()(x).numpy(), expected, rtol=0, atol=1e-12)
