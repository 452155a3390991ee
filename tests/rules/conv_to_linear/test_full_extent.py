"""conv-full-extent: a conv whose kernel covers its input is flatten + Linear (NumPy float64 reference)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tests import reference
from tests.conftest import run_surgery


def test_full_extent_conv_equals_the_numpy_conv():
    model = nn.Sequential(nn.Conv2d(4, 6, (3, 5))).eval().double()
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    res = run_surgery("conv_to_linear", model, x, rewritten=["0"])
    assert res.sites[0].pattern == "conv-full-extent"
    w, b = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    with torch.no_grad():
        np.testing.assert_allclose(res.module(x).numpy(), reference.conv2d(x.numpy(), w, b), rtol=0, atol=1e-12)


def test_padded_or_smaller_kernels_are_not_rewritten():
    padded = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1)).eval()
    run_surgery("conv_to_linear", padded, torch.randn(2, 4, 3, 3), rewritten=[],
                skipped={"0": "kernel 3x3 with padding=(1, 1) is neither pointwise nor the full 3x3 input"})  # fmt: skip
    res = run_surgery("conv_to_linear", nn.Sequential(nn.Conv2d(4, 6, 3)).eval(), torch.randn(2, 4, 5, 5),
                      rewritten=[], skipped={})  # fmt: skip
    assert res.sites == []  # a 3x3 conv on a 5x5 map is no Linear: not even a candidate
