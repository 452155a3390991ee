"""Conv2d -> Linear: pointwise, strided, full-extent, Conv1d, ConvTranspose2d, and the convs that must be skipped."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import fxsurgery
from tests import reference
from tests.conftest import run_surgery


def test_pointwise_stack_shares_one_layout_change():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.SiLU(), nn.Conv2d(16, 4, 1)).eval()
    res = run_surgery("conv_to_linear", model, torch.randn(2, 3, 7, 6), rewritten=["2", "4"])
    permutes = [n for n in res.module.graph.nodes if n.target == "permute"]
    assert len(permutes) == 2, res.module.code
    lin = res.module.get_submodule("2")
    assert isinstance(lin, nn.Linear) and lin.weight.data_ptr() == model[2].weight.data_ptr()


def test_pointwise_matches_numpy_reference():
    conv = nn.Conv2d(5, 3, 1).double().eval()
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    res = fxsurgery.conv_to_linear(nn.Sequential(conv), x)
    expected = reference.conv2d(x.numpy(), conv.weight.detach().numpy(), conv.bias.detach().numpy())
    with torch.no_grad():
        np.testing.assert_allclose(res.module(x).numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("stride, size", [(2, (8, 8)), (2, (7, 5)), (3, (10, 4)), ((2, 1), (6, 6))])
def test_strided_pointwise_is_slice_then_linear(stride, size):
    """ResNet downsample: 1x1 conv with stride s == x[:, :, ::s, ::s] then Linear (odd sizes included)."""
    conv = nn.Conv2d(4, 6, 1, stride=stride, bias=False)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), conv).eval()
    x = torch.randn(2, 4, *size)
    res = run_surgery("conv_to_linear", model, x, rewritten=["2"])
    assert res.sites[0].pattern == "conv1x1-strided"
    s = stride if isinstance(stride, tuple) else (stride, stride)
    m64, x64 = copy.deepcopy(model).double(), x.double()
    with torch.no_grad():
        feat = m64[1](m64[0](x64)).numpy()
        expected = reference.conv2d(feat, m64[2].weight.numpy(), None)[:, :, :: s[0], :: s[1]]
        np.testing.assert_allclose(copy.deepcopy(res.module).double()(x64).numpy(), expected, rtol=0, atol=1e-12)


def test_1x1_map_uses_flat_linear():
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 3, 1)).eval()
    res = run_surgery("conv_to_linear", model, torch.randn(2, 8, 5, 5), rewritten=["1", "3"])
    assert "(N, C)" in res.sites[0].after
    assert not any(n.target == "permute" for n in res.module.graph.nodes)


def test_full_extent_conv_becomes_flatten_linear():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 10, (4, 3))).eval()
    res = run_surgery("conv_to_linear", model, torch.randn(2, 3, 4, 3), rewritten=["1"])
    lin = res.module.get_submodule("1")
    assert isinstance(lin, nn.Linear) and lin.in_features == 6 * 4 * 3
    assert lin.weight.data_ptr() == model[1].weight.data_ptr()
    with pytest.raises(RuntimeError, match="exact only at the traced size"):
        res.module(torch.randn(2, 3, 8, 6))


def test_conv1d_kernel_1():
    model = nn.Sequential(nn.Conv1d(4, 8, 1), nn.GELU(), nn.Conv1d(8, 2, 1)).eval()
    res = run_surgery("conv_to_linear", model, torch.randn(3, 4, 11), rewritten=["0", "2"])
    assert all(s.pattern == "conv1d-k1" for s in res.sites)


def test_conv_transpose_1x1():
    ct = nn.ConvTranspose2d(5, 3, 1)
    model = nn.Sequential(nn.Conv2d(2, 5, 3), ct).eval()
    res = run_surgery("conv_to_linear", model, torch.randn(2, 2, 6, 6), rewritten=["1"])
    lin = res.module.get_submodule("1")
    assert lin.weight.shape == (3, 5) and lin.weight.data_ptr() == ct.weight.data_ptr()  # transposed view


def test_residual_add_stays_in_layout():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(8, 8, 1)
            self.b = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(torch.relu(y)) + y

    res = run_surgery("conv_to_linear", Block().eval(), torch.randn(2, 8, 5, 5), rewritten=["a", "b"])
    assert sum(n.target == "permute" for n in res.module.graph.nodes) == 2, res.module.code


@pytest.mark.parametrize(
    "conv, reason",
    [
        (nn.Conv2d(4, 4, 1, groups=2), "groups=2"),
        (nn.Conv2d(4, 4, 1, padding=1), "padding=(1, 1)"),
        (nn.Conv2d(4, 4, 1, padding=1, padding_mode="reflect"), "padding=(1, 1)"),
        (nn.ConvTranspose2d(4, 4, 1, stride=2), "inserts zeros"),
        (nn.Conv2d(4, 4, 6, padding=1), "padding=(1, 1)"),
    ],
    ids=["groups", "padding", "padding-reflect", "transpose-stride", "full-extent-padded"],
)
def test_unsupported_convs_are_skipped_with_reason(conv, reason):
    model = nn.Sequential(conv).eval()
    run_surgery("conv_to_linear", model, torch.randn(2, 4, 6, 6), rewritten=[], skipped={"0": reason})


def test_dilation_is_irrelevant_for_1x1():
    model = nn.Sequential(nn.Conv2d(4, 4, 1, dilation=3)).eval()
    run_surgery("conv_to_linear", model, torch.randn(2, 4, 5, 5), rewritten=["0"])


def test_3x3_convs_are_not_candidates():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).eval()
    res = run_surgery("conv_to_linear", model, torch.randn(1, 3, 8, 8), rewritten=[], skipped={})
    assert res.sites == []
