"""convtranspose1x1: ConvTranspose2d(C, O, 1) is a Linear with the transposed kernel view (NumPy float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import run_surgery


def test_transposed_1x1_equals_the_numpy_product():
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 1)).eval().double()
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    res = run_surgery("conv_to_linear", model, x, rewritten=["0"])
    assert res.sites[0].pattern == "convtranspose1x1"
    k, b = model[0].weight.detach().numpy()[:, :, 0, 0], model[0].bias.detach().numpy()  # (C, O): in-by-out
    expected = np.einsum("nchw,co->nohw", x.numpy(), k) + b[None, :, None, None]
    with torch.no_grad():
        np.testing.assert_allclose(res.module(x).numpy(), expected, rtol=0, atol=1e-12)
    assert res.module.get_submodule("0").weight.data_ptr() == model[0].weight.data_ptr()  # a view, no copy


@pytest.mark.parametrize(
    "conv, shape, reason",
    [
        (nn.ConvTranspose2d(4, 6, 1, stride=2), (2, 4, 3, 3), "a transposed conv inserts zeros"),
        (nn.ConvTranspose2d(4, 6, 3), (2, 4, 3, 3), "kernel 3x3 on a transposed conv"),
    ],
)
def test_strided_or_larger_transposed_convs_are_skipped(conv, shape, reason):
    run_surgery("conv_to_linear", nn.Sequential(conv).eval(), torch.randn(shape), rewritten=[], skipped={"0": reason})
