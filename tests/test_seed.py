"""The seed notebook's claims (../shared/seed/pointwise-conv-notebook.txt), as tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import fxsurgery
from fxsurgery.engine.weights import conv_to_linear_weight, linear_to_conv_weight
from fxsurgery.models import NetworkInNetwork
from tests import reference
from tests.conftest import run_surgery


def test_conv1x1_on_1x1_input_equals_linear():
    """In [1]-[6]: Conv2d(3, 2, 1) on a (1, 3, 1, 1) input equals the Linear with the reshaped weight."""
    torch.manual_seed(42)
    x = torch.randn(1, 3, 1, 1, dtype=torch.float64)
    conv = nn.Conv2d(3, 2, kernel_size=1).double()
    linear = nn.Linear(3, 2).double()
    with torch.no_grad():
        linear.weight.copy_(conv.weight.view(2, 3))
        linear.bias.copy_(conv.bias)
    conv_out = conv(x)
    assert conv_out.shape == (1, 2, 1, 1)
    lin_out = linear(x.view(1, 3))
    torch.testing.assert_close(conv_out.squeeze(), lin_out.squeeze(), rtol=0, atol=1e-15)
    # and the tool's own mapping produces the same Linear weight, as a view (no copy)
    w = conv_to_linear_weight(conv.weight)
    assert torch.equal(w, linear.weight) and w.data_ptr() == conv.weight.data_ptr()


def test_numpy_conv_1x1_matches_manual_loop():
    """In [7]-[10]: the NumPy conv_1x1 equals a manual per-channel sum (independent of torch)."""
    rng = np.random.default_rng(42)
    x, w, b = rng.random((1, 3, 1, 1)), rng.random((2, 3, 1, 1)), rng.random(2)
    manual = np.zeros((1, 2, 1, 1))
    for i in range(2):
        manual[0, i, 0, 0] = np.sum(x[0, :, 0, 0] * w[i, :, 0, 0]) + b[i]
    np.testing.assert_allclose(reference.conv_1x1(x, w, b), manual, rtol=0, atol=1e-15)
    # the generic sliding-window reference agrees, so it can serve for the other rules
    np.testing.assert_allclose(reference.conv2d(x, w, b), manual, rtol=0, atol=1e-15)


def test_torch_conv_matches_numpy_reference_for_linear_weight_view():
    """The conv that replaces a Linear, with kernel = W.view(O, C, 1, 1), equals the NumPy reference."""
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((2, 3)), rng.standard_normal(2)
    x = rng.standard_normal((1, 3, 1, 1))
    kernel = linear_to_conv_weight(torch.from_numpy(w), (3, 1, 1))
    got = torch.nn.functional.conv2d(torch.from_numpy(x), kernel, torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(got, reference.conv_1x1(x, w.reshape(2, 3, 1, 1), b), rtol=0, atol=1e-14)


def test_pointwise_64_to_128_on_32x32_is_a_linear_per_pixel():
    """In [14]: a 64 -> 128 pointwise conv on 32x32 keeps the spatial size and is a Linear at every pixel."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, kernel_size=1).double()
    x = torch.randn(1, 64, 32, 32, dtype=torch.float64)
    assert conv(x).shape == (1, 128, 32, 32)
    ref = reference.linear(x.permute(0, 2, 3, 1).numpy(), conv.weight.detach().view(128, 64).numpy(),
                           conv.bias.detach().numpy()).transpose(0, 3, 1, 2)  # fmt: skip
    res = fxsurgery.conv_to_linear(nn.Sequential(conv), x, precision="float64")
    with torch.no_grad():
        np.testing.assert_allclose(res.module(x).numpy(), ref, rtol=0, atol=1e-12)
    assert isinstance(res.module.get_submodule("0"), nn.Linear)


def test_network_in_network_round_trip():
    """In [18]: the NiN model; conv -> linear -> conv gives back a conv-only model with the same outputs."""
    model = NetworkInNetwork().eval()
    x = torch.randn(1, 3, 32, 32)
    to_linear = run_surgery("conv_to_linear", model, x, rewritten=["pointwise1", "pointwise2"])
    code = to_linear.module.code
    assert sum(n.target == "permute" for n in to_linear.module.graph.nodes) == 2, code  # one layout change in, one out, shared by both pointwise convs
    back = fxsurgery.linear_to_conv(to_linear.module, x, precision="float64")
    assert sorted(s.name for s in back.rewritten) == ["pointwise1", "pointwise2"]
    assert all(isinstance(back.module.get_submodule(n), nn.Conv2d) for n in ("pointwise1", "pointwise2"))
    assert not any(n.target == "permute" for n in back.module.graph.nodes), back.module.code  # permutes cancelled
    with torch.no_grad():
        torch.testing.assert_close(back.module(x), model(x), rtol=1e-5, atol=1e-6)
