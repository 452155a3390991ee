"""conv1d-k1: Conv1d(C, O, 1) is a Linear over (N, L, C) (NumPy float64 reference)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tests import reference
from tests.conftest import run_surgery


def test_conv1d_k1_equals_the_numpy_linear_per_position():
    model = nn.Sequential(nn.Conv1d(4, 6, 1), nn.GELU(), nn.Conv1d(6, 3, 1)).eval().double()
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    res = run_surgery("conv_to_linear", model, x, rewritten=["0", "2"])
    assert {s.pattern for s in res.sites} == {"conv1d-k1"}
    w = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    h = reference.linear(x.numpy().transpose(0, 2, 1), w["0.weight"][:, :, 0], w["0.bias"])
    h = torch.nn.functional.gelu(torch.from_numpy(h)).numpy()
    expected = reference.linear(h, w["2.weight"][:, :, 0], w["2.bias"]).transpose(0, 2, 1)
    with torch.no_grad():
        np.testing.assert_allclose(res.module(x).numpy(), expected, rtol=0, atol=1e-12)


def test_a_padded_conv1d_is_skipped():
    run_surgery("conv_to_linear", nn.Sequential(nn.Conv1d(4, 6, 1, padding=2)).eval(), torch.randn(2, 4, 7),
                rewritten=[], skipped={"0": "padding=(2,)"})  # fmt: skip
